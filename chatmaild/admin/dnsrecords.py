"""The DNS records a relay needs (upstream's, as cmdeploy dns makes them): required are the
addresses, MX, the DKIM key, www and, with ACME certificates, MTA-STS; recommended are SPF,
DMARC, CAA, ADSP and the SRV records that let clients find the servers. Also the facts
they are made from (this host's addresses, the DKIM key, certbot's ACME account) and the
zone file `chatmail dns` prints. An IPv4 relay (mail_domain is an IP address) needs no
DNS at all.
"""

import ipaddress
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

TTL = 3600
DKIM_SELECTOR = "opendkim"

LETSENCRYPT_DIR = "/etc/letsencrypt"
# certbot keeps accounts per ACME server: accounts/<host><path>/<account id>/regr.json
LETSENCRYPT_SERVER = "acme-v02.api.letsencrypt.org/directory"
TXT_CHUNK = 255  # a TXT record is a list of strings of at most 255 bytes each

# ifa_flags in /proc/net/if_inet6: privacy (temporary) and deprecated addresses change
# or go away; DNS must name a stable one.
IFA_F_TEMPORARY = 0x01
IFA_F_DEPRECATED = 0x20


class DnsError(Exception):
    """Something `chatmail dns` needs is not there; the message says what to do."""


@dataclass(frozen=True)
class Record:
    name: str  # absolute, with the trailing dot
    rtype: str
    value: str  # the record data as written in a zone file
    required: bool
    # Which record among several of one name and type is ours: "spf", "dmarc", "dkim",
    # "adsp", "mta-sts" (TXT) or "" (all records of the name and type).
    kind: str = ""

    def zone_line(self):
        return f"{self.name:<40} {TTL:<6} IN  {self.rtype:<5}  {self.value}"


@dataclass
class RelayFacts:
    """What the records depend on besides chatmail.ini."""

    ipv4: list = field(default_factory=list)
    ipv6: list = field(default_factory=list)
    dkim_public_key: str = ""  # base64 SubjectPublicKeyInfo; "" when unknown
    dkim_selector: str = DKIM_SELECTOR  # of the key the relay signs with
    # (selector, public key) of a new key `chatmail dkim rotate` waits to see in DNS
    dkim_pending: tuple = ()
    # retired keys (dkimrotate.DkimKey) whose records are still published or just removed
    dkim_retired: list = field(default_factory=list)
    sts_id: str = ""
    acme_account_uri: str = ""
    # the CAA issuer of the ACME server certbot uses; "" when we do not know its name
    caa_issuer: str = "letsencrypt.org"


# -- the facts ----------------------------------------------------------------------------


def host_ipv4_addresses(fib_trie="/proc/net/fib_trie"):
    """The host's public IPv4 addresses: the kernel's local /32 routes, without private,
    loopback and other non-global ranges (behind NAT the public address is not here)."""
    found, last = [], None
    try:
        lines = Path(fib_trie).read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        text = line.strip()
        if text.startswith("|-- "):
            last = text[4:]
        elif text.startswith("/32 host LOCAL") and last:
            address = ipaddress.IPv4Address(last)
            if address.is_global and str(address) not in found:
                found.append(str(address))
    return found


def host_ipv6_addresses(if_inet6="/proc/net/if_inet6"):
    """The host's stable global IPv6 addresses (no privacy or deprecated addresses)."""
    found = []
    try:
        lines = Path(if_inet6).read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) < 6:
            continue
        address = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
        flags = int(fields[4], 16)
        if address.is_global and not flags & (IFA_F_TEMPORARY | IFA_F_DEPRECATED):
            found.append(str(address))
    return sorted(set(found), key=found.index)


def dkim_public_key(key_path):
    """The base64 public key of OpenDKIM's private key, as it goes into the TXT record."""
    try:
        result = subprocess.run(["openssl", "rsa", "-in", str(key_path), "-pubout"],
                                capture_output=True, text=True)
    except FileNotFoundError:
        raise DnsError("openssl is not installed (install the openssl package)") from None
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["openssl failed"])[0]
        if not Path(key_path).exists():
            reason = "it does not exist; 'chatmail configure' creates it"
        elif not _readable(key_path):
            reason = "permission denied; run as root"
        raise DnsError(f"cannot read the DKIM key {key_path}: {reason}")
    return "".join(line for line in result.stdout.splitlines()
                   if line and not line.startswith("-----"))


def _readable(path):
    try:
        with open(path, "rb"):
            return True
    except OSError:
        return False


def acme_account_uri(domain, letsencrypt_dir=LETSENCRYPT_DIR):
    """certbot's Let's Encrypt account URI for the CAA record, or "" if there is none.

    The account of the domain's certificate (renewal/<domain>.conf names it) wins; else
    the only production account there is.
    """
    base = Path(letsencrypt_dir)
    account_id = renewal_account_id(base / "renewal" / f"{domain}.conf")
    accounts = base / "accounts" / LETSENCRYPT_SERVER
    if account_id:
        uri = read_regr_uri(accounts / account_id / "regr.json")
        if uri:
            return uri
    candidates = sorted(accounts.glob("*/regr.json"))
    if len(candidates) == 1:
        return read_regr_uri(candidates[0])
    return ""


def renewal_account_id(conf_path):
    """`account = <id>` from a certbot renewal configuration (configobj syntax)."""
    return renewal_value(conf_path, "account")


def renewal_value(conf_path, key):
    try:
        text = Path(conf_path).read_text()
    except OSError:
        return ""
    match = re.search(rf"(?m)^\s*{key}\s*=\s*(\S+)\s*$", text)
    return match.group(1) if match else ""


def acme_caa_issuer(domain, letsencrypt_dir=LETSENCRYPT_DIR):
    """The CAA issuer name for the ACME server of the domain's certificate: Let's Encrypt's
    (also before certbot has run: it is certbot's default), or "" for another server,
    whose CAA name we cannot know (a record naming Let's Encrypt would block it)."""
    server = renewal_value(Path(letsencrypt_dir) / "renewal" / f"{domain}.conf", "server")
    if server and LETSENCRYPT_SERVER not in server:
        return ""
    return "letsencrypt.org"


def read_regr_uri(path):
    import json

    try:
        return json.loads(Path(path).read_text()).get("uri", "") or ""
    except (OSError, ValueError, AttributeError):
        return ""


def new_sts_id(now=None):
    """A new MTA-STS policy id; upstream's form, the time to the minute (UTC)."""
    return time.strftime("%Y%m%d%H%M", time.gmtime(now))


def sts_id_from_txt(text):
    match = re.search(r"\bid=([A-Za-z0-9]{1,32})", text)
    return match.group(1) if match else ""


# -- the records --------------------------------------------------------------------------


def dkim_txt_value(public_key):
    return f"v=DKIM1;k=rsa;p={public_key};s=email;t=s"


def dkim_record(domain, selector, public_key):
    """DOMAIN with the trailing dot."""
    return Record(f"{selector}._domainkey.{domain}", "TXT",
                  quote_txt(dkim_txt_value(public_key)), True, "dkim")


def quote_txt(text):
    """Zone-file TXT data: one quoted string per 255 characters."""
    chunks = [text[i:i + TXT_CHUNK] for i in range(0, len(text), TXT_CHUNK)] or [""]
    return " ".join(f'"{chunk}"' for chunk in chunks)


def relay_records(config, facts):
    """Every record of the relay, required ones first, in upstream's order."""
    d = config.mail_domain_bare + "."
    acme = config.tls_cert_mode == "acme"
    records = [Record(d, "A", ip, True) for ip in facts.ipv4]
    if not config.disable_ipv6:
        records += [Record(d, "AAAA", ip, True) for ip in facts.ipv6]
    records.append(Record(d, "MX", f"10 {d}", True))
    if acme:
        # Sending relays fetch the policy from https://mta-sts.<domain>/ (our certificate
        # covers that name) and insist on TLS with a valid certificate.
        records.append(Record(f"_mta-sts.{d}", "TXT", f'"v=STSv1; id={facts.sts_id}"',
                              True, "mta-sts"))
        records.append(Record(f"mta-sts.{d}", "CNAME", d, True))
    records.append(Record(f"www.{d}", "CNAME", d, True))
    if facts.dkim_public_key:
        records.append(dkim_record(d, facts.dkim_selector, facts.dkim_public_key))
    if facts.dkim_pending:
        records.append(dkim_record(d, *facts.dkim_pending))
    records += [
        Record(d, "TXT", '"v=spf1 a ~all"', False, "spf"),
        Record(f"_dmarc.{d}", "TXT", '"v=DMARC1;p=reject;adkim=s;aspf=s"', False, "dmarc"),
    ]
    if acme and facts.caa_issuer:
        issuer = facts.caa_issuer
        if facts.acme_account_uri:
            issuer += f";accounturi={facts.acme_account_uri}"
        records.append(Record(d, "CAA", f'0 issue "{issuer}"', False))
    records.append(Record(f"_adsp._domainkey.{d}", "TXT", '"dkim=discardable"', False, "adsp"))
    for service, port in (("submission", 587), ("submissions", 465), ("imap", 143),
                          ("imaps", 993)):
        records.append(Record(f"_{service}._tcp.{d}", "SRV", f"0 1 {port} {d}", False))
    return records


def zone_text(config, facts, records):
    lines = ["; Required DNS entries"]
    lines += [r.zone_line() for r in records if r.required]
    lines += missing_fact_notes(config, facts)
    lines += ["", "; Recommended DNS entries"]
    lines += [r.zone_line() for r in records if not r.required]
    if facts.dkim_public_key:
        lines += ["", "; If your DNS provider's form takes the DKIM TXT value as one string:",
                  f"; {dkim_txt_value(facts.dkim_public_key)}"]
    if facts.dkim_pending:
        lines += [f"; ... and the new key's (chatmail dkim rotate): "
                  f"{dkim_txt_value(facts.dkim_pending[1])}"]
    lines += retired_dkim_notes(facts.dkim_retired, time.time())
    return "\n".join(lines) + "\n"


def retired_dkim_notes(retired, now):
    """When the records of keys replaced by `chatmail dkim rotate` may go: mail signed
    with them may still be on its way for a while."""
    notes = []
    for key in retired:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(key.removable_after))
        if now >= key.removable_after:
            notes.append(f"; No longer needed, remove it: {key.record_name} TXT "
                         f"(the key it names was replaced; since {when})")
        else:
            notes.append(f"; Replaced, but keep it until {when}: {key.record_name} TXT")
    return [""] + notes if notes else []


def missing_fact_notes(config, facts):
    d = config.mail_domain_bare
    notes = []
    if not facts.ipv4:
        notes.append(f"; No public IPv4 address found on this host. Add '{d}. A <address>' "
                     "if it has one (behind NAT: the public one), or pass --ipv4.")
    if not facts.ipv6 and not config.disable_ipv6:
        notes.append("; No global IPv6 address found on this host (pass --ipv6 if it has one).")
    if not facts.dkim_public_key:
        notes.append("; The DKIM record is missing: the DKIM key could not be read.")
    return notes


def ipv4_relay_text(config):
    ip = config.ipv4_relay
    return (
        f"The mail domain is the IPv4 address {ip}: this relay needs no DNS records.\n"
        f"Its addresses look like name@[{ip}]; other relays connect to {ip} directly,\n"
        "and clients are set up with a dclogin: link or QR code from its web page.\n"
    )
