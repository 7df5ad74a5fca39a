"""`chatmail dkim`: the relay's DKIM keys, and their rotation.

A relay signs with one key. Until the first rotation that is the key steps/dkim-key
makes, <dkim_key_dir>/<domain>.private with selector `opendkim`, and nothing here is
written: relays that never rotate keep exactly what they have.

`chatmail dkim rotate` makes a new key under a new selector (dkimYYYYMMDD) next to it and
prints the TXT record to publish. The relay keeps signing with the old key while the new
one is *pending*: a receiver could not verify a signature whose record it cannot find.
Once DNS serves the new record (asked of the domain's authoritative servers, as `chatmail
dns --check` does), a later `chatmail dkim rotate` or `chatmail configure` switches:
the new key becomes *active* and the old one *retired*. A retired key's record stays
needed for a while (mail signed with it may still be on its way or waiting in a queue),
so `chatmail dns` and `chatmail dkim status` say from when on it may be removed:
RETIRED_GRACE after the switch.

`chatmail dkim daily` (the relay's daily job) does the rest without the admin: it
switches once DNS serves the pending key's record, and deletes the private key of a
retired key whose grace period is over (nothing signs with it since the switch; its line
stays, so `chatmail dns` and `chatmail dkim status` go on saying its record can go).

The keys are listed in <state_dir>/dkim-keys, one line each:

    DOMAIN SELECTOR STATE SINCE KEYFILE

STATE is active, pending or retired; SINCE the time (UTC, ISO 8601) it became so.
conf/opendkim/signing-key.j2 reads the active line of the mail domain from it.
"""

import calendar
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..files import write_atomic
from .apply import record_created
from .dnscheck import LookupFailed, Resolver, check_txt
from .dnsrecords import (
    DKIM_SELECTOR,
    DnsError,
    dkim_public_key,
    dkim_record,
    dkim_txt_value,
)
from .host import act

KEYS_FILE = "dkim-keys"
ACTIVE, PENDING, RETIRED = "active", "pending", "retired"
RETIRED_GRACE = 7 * 86400
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
HEADER = ("# The relay's DKIM keys (chatmail dkim rotate): "
          "DOMAIN SELECTOR STATE SINCE KEYFILE\n")


class RotationError(Exception):
    """Something the rotation needs is missing; the message says what to do."""


@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    state: str
    since: int  # seconds since the epoch; 0 for the key made at install
    path: str

    def line(self):
        return f"{self.domain} {self.selector} {self.state} {format_time(self.since)} {self.path}"

    @property
    def record_name(self):
        return f"{self.selector}._domainkey.{self.domain}."

    @property
    def removable_after(self):
        """When a retired key's DNS record may go."""
        return self.since + RETIRED_GRACE


def format_time(seconds):
    return time.strftime(TIME_FORMAT, time.gmtime(seconds))


def parse_time(text):
    return calendar.timegm(time.strptime(text, TIME_FORMAT))


def install_key(config, platform):
    """The key steps/dkim-key makes, which signs until the first rotation."""
    domain = config.mail_domain_bare
    return DkimKey(domain, DKIM_SELECTOR, ACTIVE, 0,
                   f"{platform.dkim_key_dir}/{domain}.private")


def keys_file(platform, host):
    return host.path(f"{platform.state_dir}/{KEYS_FILE}")


def read_key_lines(path):
    """Every key listed in PATH, of any domain ([] without the file)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    keys = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 5 and not line.startswith("#"):
            domain, selector, state, since, key = fields
            keys.append(DkimKey(domain, selector, state, parse_time(since), key))
    return keys


@dataclass
class DomainKeys:
    """The keys of the mail domain; those of other domains (a relay whose domain
    changed) are kept in the file as they are."""

    active: DkimKey
    pending: DkimKey = None
    retired: tuple = ()
    others: tuple = ()

    @classmethod
    def load(cls, config, platform, host):
        domain = config.mail_domain_bare
        listed = read_key_lines(keys_file(platform, host))
        ours = [key for key in listed if key.domain == domain]
        by_state = {state: [key for key in ours if key.state == state]
                    for state in (ACTIVE, PENDING, RETIRED)}
        active = (by_state[ACTIVE] or [install_key(config, platform)])[0]
        pending = (by_state[PENDING] or [None])[0]
        return cls(active, pending, tuple(by_state[RETIRED]),
                   tuple(key for key in listed if key.domain != domain))

    def save(self, platform, host):
        keys = [*self.others, *self.retired, self.active]
        if self.pending:
            keys.append(self.pending)
        text = HEADER + "".join(key.line() + "\n" for key in keys)
        write_atomic(keys_file(platform, host), text.encode(), 0o644)

    def selectors(self):
        return {key.selector for key in (self.active, self.pending, *self.retired) if key}

    def switched(self, now):
        """The pending key active, the active one retired, both from NOW on."""
        return DomainKeys(replace(self.pending, state=ACTIVE, since=now), None,
                          (*self.retired, replace(self.active, state=RETIRED, since=now)),
                          self.others)


def new_selector(now, taken):
    """dkimYYYYMMDD, with -2, -3 ... on a second rotation of the same day."""
    base = "dkim" + time.strftime("%Y%m%d", time.gmtime(now))
    selector, number = base, 1
    while selector in taken:
        number += 1
        selector = f"{base}-{number}"
    return selector


def make_key(host, platform, key):
    """A new 2048-bit key at key.path, OpenDKIM's own and readable by it only, as
    steps/dkim-key makes the first one."""
    directory = host.path(platform.dkim_key_dir)
    if not directory.is_dir():
        raise RotationError(f"{platform.dkim_key_dir} does not exist: is OpenDKIM "
                            "installed? ('chatmail configure' makes the first key)")
    scratch = Path(tempfile.mkdtemp(prefix=".genkey.", dir=directory))
    try:
        inside = f"{platform.dkim_key_dir}/{scratch.name}"
        act(host.run, ["opendkim-genkey", f"--directory={inside}", f"--domain={key.domain}",
                       f"--selector={key.selector}", "--bits=2048"], "making the DKIM key")
        made = scratch / f"{key.selector}.private"
        uid, gid = host.user_ids(platform.opendkim_user)
        os.chown(made, uid, gid)
        os.chmod(made, 0o600)
        os.replace(made, host.path(key.path))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    record_created(host.path(platform.state_dir), key.path)


def public_key(host, key):
    try:
        return dkim_public_key(host.path(key.path))
    except DnsError as exc:
        raise RotationError(str(exc)) from None


def txt_record(host, key):
    return dkim_record(key.domain + ".", key.selector, public_key(host, key))


def record_published(host, key, resolver):
    """(whether DNS serves KEY's record as it must be, what it serves)."""
    result = check_txt(None, None, [txt_record(host, key)], resolver)
    return result.status == "ok", result.found


def publish_instructions(host, key):
    record = txt_record(host, key)
    return [f"Publish this DNS record at your DNS provider (the new key {key.selector}):",
            "",
            record.zone_line(),
            "",
            "If your DNS provider's form takes the TXT value as one string:",
            dkim_txt_value(public_key(host, key))]


@dataclass
class Rotation:
    """One `chatmail dkim rotate` (or the configure step that completes one)."""

    config: object
    platform: object
    host: object
    resolver_factory: object  # () -> a dnscheck.Resolver, made only when DNS is asked
    out: object = print
    dry_run: bool = False
    now: object = time.time

    def keys(self):
        if self.config.ipv4_relay:
            raise RotationError("this relay's mail domain is an IPv4 address: its mail is "
                                "not DKIM-signed, there is no key to rotate")
        keys = DomainKeys.load(self.config, self.platform, self.host)
        if not self.host.path(keys.active.path).exists():
            raise RotationError(f"the DKIM key {keys.active.path} does not exist; run "
                                "'chatmail configure' first")
        return keys

    def start(self, keys):
        """A new pending key; returns the keys with it."""
        now = int(self.now())
        selector = new_selector(now, keys.selectors())
        pending = DkimKey(keys.active.domain, selector, PENDING, now,
                          f"{self.platform.dkim_key_dir}/{keys.active.domain}.{selector}.private")
        if self.dry_run:
            self.out(f"Would make a new DKIM key with selector {selector} "
                     f"({pending.path}); nothing changed (--dry-run).")
            return None
        make_key(self.host, self.platform, pending)
        keys = replace(keys, pending=pending)
        keys.save(self.platform, self.host)
        self.out(f"Made a new DKIM key with selector {selector}; the relay goes on signing "
                 f"with {keys.active.selector} until DNS serves the new record.")
        return keys

    def published(self, keys):
        """Whether DNS serves the pending key's record; says what it found if not."""
        try:
            seen, found = record_published(self.host, keys.pending,
                                           self.resolver_factory())
        except LookupFailed as exc:
            self.out(f"Cannot look up {keys.pending.record_name}: {exc}")
            return False
        if not seen:
            self.out(f"DNS does not serve the new record yet ({keys.pending.record_name} "
                     f"TXT: {found or 'none'}).")
        return seen

    def switch(self, keys):
        """Sign with the pending key from now on; returns whether it switched."""
        if self.dry_run:
            self.out(f"Would switch signing from {keys.active.selector} to "
                     f"{keys.pending.selector}; nothing changed (--dry-run).")
            return False
        switched = keys.switched(int(self.now()))
        switched.save(self.platform, self.host)
        old = switched.retired[-1]
        self.out(f"Switched: mail is signed with {switched.active.selector} from now on. "
                 f"Keep the record {old.record_name} until "
                 f"{format_time(old.removable_after)}, then remove it.")
        return True

    def complete(self):
        """Switch to a pending key whose record DNS serves; returns whether it switched
        (the configure step: silent when nothing is pending)."""
        if self.config.ipv4_relay:
            return False
        keys = DomainKeys.load(self.config, self.platform, self.host)
        if keys.pending is None or not self.published(keys):
            return False
        return self.switch(keys)

    def prune(self):
        """Delete the private keys of retired keys whose grace period is over; returns
        the keys deleted. A key file the active or pending key also names stays."""
        if self.config.ipv4_relay:
            return []
        keys = DomainKeys.load(self.config, self.platform, self.host)
        in_use = {keys.active.path, keys.pending.path if keys.pending else None}
        now = int(self.now())
        deleted = []
        for key in keys.retired:
            path = self.host.path(key.path)
            if now < key.removable_after or key.path in in_use or not path.exists():
                continue
            if self.dry_run:
                self.out(f"Would delete the retired DKIM key {key.path} (selector "
                         f"{key.selector}); nothing changed (--dry-run).")
                continue
            path.unlink()
            deleted.append(key)
            self.out(f"Deleted the retired DKIM key {key.path} (selector {key.selector}): "
                     f"its grace period ended {format_time(key.removable_after)}. Remove "
                     f"its record {key.record_name} if it is still published.")
        return deleted

    def daily(self):
        """The daily job: switch to a pending key whose record DNS serves, then delete
        retired keys past their grace period; returns whether signing switched."""
        switched = self.complete()
        self.prune()
        return switched

    def rotate(self, now_switch=False):
        """`chatmail dkim rotate`: start a rotation or go on with the pending one;
        returns whether signing switched (the caller then applies the configuration)."""
        keys = self.keys()
        if keys.pending is None:
            keys = self.start(keys)
            if keys is None:
                return False
        else:
            self.out(f"A rotation to {keys.pending.selector} is pending (since "
                     f"{format_time(keys.pending.since)}).")
        if now_switch:
            return self.switch(keys)
        if self.published(keys):
            return self.switch(keys)
        for line in publish_instructions(self.host, keys.pending):
            self.out(line)
        self.out("")
        self.out("Then run 'chatmail dkim rotate' again ('chatmail configure' also "
                 "switches once DNS serves it), or switch at once with --now.")
        return False


def retired_note(key, now):
    """What to do with a retired key's DNS record, as of NOW."""
    when = format_time(key.removable_after)
    if now >= key.removable_after:
        return (f"retired: selector {key.selector}: its record {key.record_name} is no "
                f"longer needed since {when}: remove it")
    return f"retired: selector {key.selector}: keep its record {key.record_name} until {when}"


def status_lines(keys, now):
    """What `chatmail dkim status` shows."""
    lines = [f"signing with selector {keys.active.selector} ({keys.active.path})"]
    if keys.pending:
        lines.append(f"pending: selector {keys.pending.selector} since "
                     f"{format_time(keys.pending.since)}, waiting for its DNS record "
                     f"{keys.pending.record_name}")
    lines += [retired_note(key, now) for key in keys.retired]
    return lines


def default_resolver(config, nameservers=None, port=53):
    return lambda: Resolver(config.mail_domain_bare + ".", nameservers, port)

