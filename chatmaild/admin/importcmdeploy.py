"""`chatmail import-cmdeploy`: move a relay deployed with upstream's cmdeploy onto our
packages, in place, keeping its settings, accounts (passwords, push tokens, mail) and
DKIM key.

What cmdeploy leaves on a relay (github.com/chatmail/relay, cmdeploy/src/cmdeploy/):
- chatmail.ini at /usr/local/lib/chatmaild/chatmail.ini, chatmaild in a virtualenv
  beside it (venv/);
- its units in /etc/systemd/system, where they override the package's units of the same
  names in /lib/systemd/system (doveauth, lastlogin, chatmail-metadata, filtermail,
  filtermail-incoming, chatmail-expire and chatmail-fsreport with their timers), and
  units of programs it downloaded (filtermail-transport, turnserver = chatmail-turn,
  iroh-relay, mtail) or of acmetool; restart drop-ins for Dovecot, Postfix and OpenDKIM;
- /etc/apt/preferences.d/pin-dovecot (priority -1 for every dovecot-* package: no
  security update of Dovecot ever installs, nor our instant-IDLE plugin);
- /etc/nginx/nginx.conf replaced by its own (a stream {} block on port 443 and its
  sites), which collides with the relay's nginx files;
- the DKIM key /etc/dkimkeys/opendkim.private, selector `opendkim`: steps/dkim-key
  adopts it as <domain>.private under the same selector, so the published record stays
  valid;
- acmetool's certificates in /var/lib/acme; unbound as the resolver in /etc/resolv.conf;
- the mailboxes in <mailboxes_dir>/<addr>/ with `password` ({SHA512-CRYPT}$6$..., as
  our doveauth reads it), `enforceE2EEincoming` and metadata.json (push tokens), the
  same layout and formats as ours: they stay where they are.

The import saves every file it removes or replaces in <state_dir>/cmdeploy-import/ and
writes its report there (report.txt).
"""

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import (
    SETTINGS,
    ConfigError,
    Config,
    check_value,
    parse_ini_params,
)
from ..files import write_atomic
from .apply import record_created
from .host import CommandFailed, act

CMDEPLOY_DIR = "/usr/local/lib/chatmaild"
CMDEPLOY_INI = f"{CMDEPLOY_DIR}/chatmail.ini"
CMDEPLOY_VENV = f"{CMDEPLOY_DIR}/venv"
UNIT_DIR = "/etc/systemd/system"
# The units cmdeploy writes into UNIT_DIR (service/*.f, filtermail/, mtail/, acmetool/,
# iroh-relay.service in deployers.py), and older ones it retired itself.
CMDEPLOY_UNITS = (
    "doveauth.service", "chatmail-metadata.service", "lastlogin.service",
    "filtermail.service", "filtermail-incoming.service", "filtermail-transport.service",
    "chatmail-expire.timer", "chatmail-expire.service",
    "chatmail-fsreport.timer", "chatmail-fsreport.service",
    "turnserver.service", "iroh-relay.service", "mtail.service",
    "acmetool-reconcile.timer", "acmetool-reconcile.service", "acmetool-redirector.service",
    "doveauth-dictproxy.service", "mta-sts-daemon.service", "echobot.service",
)
# cmdeploy's restart drop-ins (ours are named chatmail.conf).
CMDEPLOY_DROPINS = (
    "dovecot.service.d/10_restart.conf",
    "postfix@.service.d/10_restart.conf",
    "opendkim.service.d/10-prevent-memory-leak.conf",
)
DOVECOT_PIN = "/etc/apt/preferences.d/pin-dovecot"
NGINX_CONF = "/etc/nginx/nginx.conf"
LEGACY_DKIM_KEY = "opendkim.private"
ADOPTED_KEY_MARKER = ".chatmail-adopted-legacy-key"  # steps/dkim-key's
ACMETOOL_LIVE = "/var/lib/acme/live"
SYSTEM_UNIT_DIRS = ("/usr/lib/systemd/system", "/lib/systemd/system")
IMPORT_DIR = "cmdeploy-import"  # below the platform's state_dir
UNKNOWN_PREFIX = "# not a setting of this relay (chatmail import-cmdeploy): "

# What the import leaves alone, and why (the report's second half).
UNTOUCHED = (
    (CMDEPLOY_VENV, "cmdeploy's chatmaild; nothing runs it any more. Remove it with "
     f"'rm -r {CMDEPLOY_DIR}' once you no longer need it."),
    ("/usr/local/bin (filtermail, chatmail-turn, iroh-relay, mtail)",
     "binaries cmdeploy downloaded; their units are gone, nothing runs them. Remove them "
     "by hand."),
    ("/var/lib/acme, the acmetool package",
     "acmetool's account and certificates; the relay now uses certbot "
     "(/etc/letsencrypt). The acmetool units were removed, so it renews nothing; "
     "'apt purge acmetool' and 'rm -r /var/lib/acme' once certbot has a certificate."),
    ("/etc/resolv.conf, unbound",
     "cmdeploy made unbound the resolver (nameserver 127.0.0.1, 9.9.9.9), purged "
     "resolvconf and masked systemd-resolved; the relay works with that resolver, so it "
     "stays."),
    ("/etc/dovecot/dovecot.conf, /etc/opendkim.conf",
     "conffiles cmdeploy replaced; the relay runs Dovecot and OpenDKIM with its own files "
     "(/etc/dovecot/chatmail/, /etc/opendkim/chatmail.conf) and never reads these. A "
     "Dovecot or OpenDKIM upgrade may ask about them."),
    ("/etc/systemd/journald.conf, /etc/apt/apt.conf.d/00InstallRecommends, "
     "/etc/environment (TZ), /etc/mailname",
     "system settings cmdeploy wrote; harmless. With 00InstallRecommends, apt leaves out "
     "the relay's Recommends (certbot, coturn, chatmail-archive-keyring): install them "
     "by name."),
    ("/usr/lib/cgi-bin/newemail.py", "cmdeploy's /new script; nginx now runs ours."),
    ("the mailboxes", "accounts, passwords, push tokens and mail are in the layout and "
     "formats the relay reads: they stay where they are."),
)


class ImportError_(Exception):
    """Nothing can be imported, or the import cannot go on: the message says why."""


@dataclass
class Found:
    """What of cmdeploy is on the host (absolute paths as the host sees them)."""

    ini: str | None = None
    units: list = field(default_factory=list)
    dropins: list = field(default_factory=list)
    pin: str | None = None
    nginx_conf: str | None = None
    venv: str | None = None
    acmetool: bool = False
    legacy_dkim_key: str | None = None
    mailboxes: int = 0

    def anything(self):
        return bool(self.ini or self.units or self.dropins or self.pin or self.nginx_conf)


def find_cmdeploy(host, platform):
    """What cmdeploy left on HOST that the import acts on or reports."""
    found = Found()
    if host.path(CMDEPLOY_INI).is_file():
        found.ini = CMDEPLOY_INI
    for name in CMDEPLOY_UNITS:
        path = host.path(f"{UNIT_DIR}/{name}")
        # a link (to /dev/null: masked) is the admin's doing, not cmdeploy's
        if path.is_file() and not path.is_symlink():
            found.units.append(name)
    found.dropins = [f"{UNIT_DIR}/{d}" for d in CMDEPLOY_DROPINS
                     if host.path(f"{UNIT_DIR}/{d}").is_file()]
    if host.path(DOVECOT_PIN).is_file():
        found.pin = DOVECOT_PIN
    if is_cmdeploy_nginx_conf(host):
        found.nginx_conf = NGINX_CONF
    if host.path(CMDEPLOY_VENV).is_dir():
        found.venv = CMDEPLOY_VENV
    found.acmetool = host.path(ACMETOOL_LIVE).is_dir()
    key = f"{platform.dkim_key_dir}/{LEGACY_DKIM_KEY}"
    try:
        if host.path(key).is_file():
            found.legacy_dkim_key = key
    except PermissionError:  # --dry-run without root: OpenDKIM's directory is closed
        found.legacy_dkim_key = f"{key} (if there: only root may look)"
    return found


def is_cmdeploy_nginx_conf(host):
    """cmdeploy's nginx.conf loads the stream module itself and multiplexes port 443 in
    its own stream {} block (nginx/nginx.conf.j2); Debian's includes modules-enabled/."""
    try:
        text = host.path(NGINX_CONF).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return "ngx_stream_module.so" in text and "ssl_preread" in text


def count_mailboxes(host, config):
    directory = host.path(config.mailboxes_dir)
    try:
        return sum(1 for entry in directory.iterdir()
                   if "@" in entry.name and (entry / "password").is_file())
    except PermissionError:
        return None  # not root: vmail's directory is closed
    except OSError:
        return 0


# -- the ini


@dataclass
class AdoptedIni:
    text: str
    config: Config
    unknown: dict  # key -> value, commented out
    domain: str


def adopt_ini(text, source, target):
    """cmdeploy's chatmail.ini TEXT as our chatmail.ini: every line as the admin wrote
    it, except keys this relay does not read, which are commented out (and returned).
    A value the relay would refuse stops the import (ImportError_) with the reason."""
    try:
        params = parse_ini_params(text, source)
    except ConfigError as exc:
        raise ImportError_(str(exc)) from None
    unknown = {key: value for key, value in params.items() if key not in SETTINGS}
    for key, value in params.items():
        if key in SETTINGS:
            try:
                check_value(key, value, source)
            except ConfigError as exc:
                raise ImportError_(f"{exc}. Correct it in {source}, then run "
                                   "'chatmail import-cmdeploy' again.") from None
    lines = text.splitlines()
    out, skipping = [], False
    for line in lines:
        key = line.split("=", 1)[0].strip() if "=" in line and not line[:1].isspace() \
            else None
        if key in unknown and not line.lstrip().startswith(("#", ";")):
            out.append(UNKNOWN_PREFIX + line)
            skipping = True
            continue
        if skipping and line[:1].isspace() and line.strip():
            out.append(UNKNOWN_PREFIX + line)
            continue
        skipping = False
        out.append(line)
    new_text = "\n".join(out) + "\n"
    try:
        config = Config(target, parse_ini_params(new_text, target))
    except ConfigError as exc:
        raise ImportError_(f"{exc}. Correct it in {source}, then run "
                           "'chatmail import-cmdeploy' again.") from None
    return AdoptedIni(new_text, config, unknown, config.mail_domain_bare)


# -- the plan


def make_plan(found, adopted, platform, ini_path, existing_ini):
    """The steps, as lines for the admin."""
    plan = []
    if found.ini:
        line = f"adopt {found.ini} as {ini_path} (mail domain {adopted.domain})"
        if existing_ini is not None:
            line += f"; the present {ini_path} is saved"
        plan.append(line)
        for key, value in adopted.unknown.items():
            plan.append(f"  comment out {key} = {' '.join(value.split())}: not a setting "
                        "of this relay")
    for name in found.units:
        plan.append(f"stop, disable and remove {UNIT_DIR}/{name}")
    for path in found.dropins:
        plan.append(f"remove cmdeploy's drop-in {path}")
    if found.units or found.dropins:
        plan.append("systemctl daemon-reload; enable the relay's units of the same names")
    if found.pin:
        plan.append(f"remove {found.pin} (it blocks every Dovecot security update)")
    if found.nginx_conf:
        plan.append(f"replace cmdeploy's {found.nginx_conf} by Debian's (apt-get "
                    "--reinstall nginx-common); the relay adds its own nginx files")
    if found.legacy_dkim_key and adopted is not None and not adopted.config.ipv4_relay:
        plan.append(f"keep the DKIM key {found.legacy_dkim_key} (selector opendkim) as "
                    f"{platform.dkim_key_dir}/{adopted.domain}.private")
    if found.acmetool and adopted is not None and adopted.config.tls_cert_mode == "acme":
        plan.append("serve acmetool's certificate until certbot has one")
    plan.append("run 'chatmail configure'")
    return plan


# -- the steps


class Importer:
    def __init__(self, host, platform, ini_path, out=print, configure=None):
        self.host = host
        self.platform = platform
        self.ini_path = str(ini_path)
        self.out = out
        self.configure = configure
        self.save_dir = f"{platform.state_dir}/{IMPORT_DIR}"
        self.done = []

    def say(self, line):
        self.out(f"chatmail import-cmdeploy: {line}")

    def note(self, line):
        self.done.append(line)
        self.say(line)

    def save(self, path, name=None):
        """Copy PATH into the save directory (keeping an earlier copy); its copy's path."""
        target_dir = self.host.path(self.save_dir)
        target_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        name = name or Path(path).name
        target = target_dir / name
        if target.exists():
            target = target_dir / f"{name}.{int(time.time())}"
        shutil.copy2(self.host.path(path), target, follow_symlinks=False)
        return f"{self.save_dir}/{target.name}"

    def systemctl(self, *args, check=True):
        argv = ["systemctl", *args]
        if check:
            act(self.host.run, argv, " ".join(argv))
        else:
            self.host.run(argv)

    def write_ini(self, found, adopted):
        target = self.host.path(self.ini_path)
        if target.exists():
            if target.read_text(encoding="utf-8", errors="replace") == adopted.text:
                return
            copy = self.save(self.ini_path, "chatmail.ini.before-import")
            self.note(f"saved the present {self.ini_path} as {copy}")
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        write_atomic(target, adopted.text.encode("utf-8"), 0o644)
        self.note(f"wrote {self.ini_path} from {found.ini} (mail domain {adopted.domain})")
        for key in adopted.unknown:
            self.note(f"  {key}: not a setting of this relay, commented out")

    def remove_units(self, found):
        for name in found.units:
            self.systemctl("disable", "--now", name, check=False)
            copy = self.save(f"{UNIT_DIR}/{name}")
            self.host.path(f"{UNIT_DIR}/{name}").unlink()
            self.note(f"stopped, disabled and removed {UNIT_DIR}/{name} (saved as {copy})")
        for path in found.dropins:
            copy = self.save(path, path.split("/")[-2] + "-" + Path(path).name)
            self.host.path(path).unlink()
            try:
                self.host.path(path).parent.rmdir()
            except OSError:
                pass
            self.note(f"removed {path} (saved as {copy})")
        if not (found.units or found.dropins):
            return
        self.systemctl("daemon-reload")
        ours = [name for name in found.units if self.has_system_unit(name)]
        if ours:
            # deb-systemd-helper enabled these by cmdeploy's files, now gone.
            self.systemctl("enable", *ours)
            self.note(f"enabled the relay's {', '.join(ours)}")

    def has_system_unit(self, name):
        return any(self.host.path(f"{d}/{name}").is_file() for d in SYSTEM_UNIT_DIRS)

    def remove_pin(self, found):
        if not found.pin:
            return
        copy = self.save(found.pin)
        self.host.path(found.pin).unlink()
        self.note(f"removed {found.pin} (saved as {copy}); apt installs Dovecot's "
                  "security updates again")

    def restore_nginx_conf(self, found):
        if not found.nginx_conf:
            return
        copy = self.save(found.nginx_conf, "nginx.conf")
        self.host.path(found.nginx_conf).unlink()
        env = {"DEBIAN_FRONTEND": "noninteractive",
               "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        try:
            act(self.host.run, ["apt-get", "-y", "-o", "Dpkg::Options::=--force-confmiss",
                                "install", "--reinstall", "nginx-common"],
                "reinstalling Debian's nginx.conf", env=env)
        except CommandFailed:
            shutil.copy2(self.host.path(copy), self.host.path(found.nginx_conf))
            raise
        self.note(f"replaced cmdeploy's {found.nginx_conf} by Debian's (cmdeploy's saved "
                  f"as {copy})")

    def prepare_dkim_key(self, found, adopted):
        """steps/dkim-key adopts opendkim.private for the domain once; if an earlier
        `chatmail configure` (the package's install, with another domain) used that
        chance, give the key its chance again for this domain."""
        if not found.legacy_dkim_key or adopted.config.ipv4_relay:
            return
        key_dir = self.platform.dkim_key_dir
        if self.host.path(f"{key_dir}/{adopted.domain}.private").exists():
            return
        self.host.path(f"{key_dir}/{ADOPTED_KEY_MARKER}").unlink(missing_ok=True)

    def bootstrap_certificate(self, adopted):
        """In acme mode the services read a self-signed certificate until certbot has one;
        acmetool's (still valid, for the same names) serves better meanwhile."""
        config = adopted.config
        if config.tls_cert_mode != "acme":
            return
        if self.host.path(f"{self.platform.certbot_live_dir}/{adopted.domain}"
                          "/fullchain.pem").exists():
            return
        live = f"{ACMETOOL_LIVE}/{adopted.domain}"
        cert, key = self.host.path(f"{live}/fullchain"), self.host.path(f"{live}/privkey")
        if not (cert.is_file() and key.is_file()):
            return
        tls_dir = self.host.path(Path(config.tls_cert_path).parent)
        tls_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        write_atomic(tls_dir / "bootstrap-key.pem", key.read_bytes(), 0o600)
        write_atomic(tls_dir / "bootstrap-cert.pem", cert.read_bytes(), 0o644)
        # copies of ours, as the self-signed ones they stand for: purge removes them
        state_dir = self.host.path(self.platform.state_dir)
        state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        for name in ("bootstrap-key.pem", "bootstrap-cert.pem"):
            record_created(state_dir, f"{Path(config.tls_cert_path).parent}/{name}")
        self.note(f"copied acmetool's certificate for {adopted.domain} to {tls_dir}; the "
                  "relay serves it until certbot has its own")

    def retire_ini(self, found):
        copy = self.save(found.ini)
        self.host.path(found.ini).unlink()
        self.note(f"moved {found.ini} to {copy}: {self.ini_path} is the relay's "
                  "configuration now")

    def run(self, found, adopted):
        if found.ini:
            self.write_ini(found, adopted)
        self.remove_units(found)
        self.remove_pin(found)
        self.restore_nginx_conf(found)
        if adopted is not None:
            self.prepare_dkim_key(found, adopted)
            self.bootstrap_certificate(adopted)
        if found.ini:
            self.retire_ini(found)


# -- the report


def report_text(done, found, host, platform, when):
    lines = [f"chatmail import-cmdeploy, {when}", "", "Done:"]
    lines += [f"  {line}" for line in done] or ["  nothing"]
    lines += ["", "Left untouched:"]
    for what, why in UNTOUCHED:
        if what == CMDEPLOY_VENV and not found.venv:
            continue
        lines.append(f"  {what}: {why}")
    lines += ["", f"Every file removed or replaced is saved in {platform.state_dir}/"
              f"{IMPORT_DIR}/."]
    return "\n".join(lines) + "\n"


def write_report(host, platform, text):
    path = f"{platform.state_dir}/{IMPORT_DIR}/report.txt"
    directory = host.path(path).parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(host.path(path), text.encode("utf-8"), 0o600)
    return path


# -- the command


def package_missing(host):
    """Why the relay's package cannot do the import here, or None."""
    if not host.path(f"{host.data_dir}/steps/dkim-key").is_file():
        return (f"the chatmail-relay package is not installed ({host.data_dir} is "
                "missing): install it first (see README: 'From a relay deployed with "
                "cmdeploy')")
    result = host.run(["dpkg-query", "-W", "-f=${db:Status-Status}", "chatmail-relay"])
    if result.returncode == 0 and result.stdout.strip() in ("not-installed", "config-files"):
        return "the chatmail-relay package is not installed: install it first"
    return None


def import_cmdeploy(host, platform, ini_path, dry_run=False, yes=False, ask=input,
                    out=print, configure=None, check_package=True):
    """The command; returns its exit status (0 done or nothing to do, 1 refused or
    failed). CONFIGURE(config, platform, host): `chatmail configure`'s pipeline."""
    def error(message):
        out(f"chatmail import-cmdeploy: {message}")
        return 1

    if platform.service_manager != "systemd":
        return error("cmdeploy deploys Debian relays only; this system runs "
                     f"{platform.service_manager}")
    problem = check_package and package_missing(host)
    if problem:
        return error(problem)
    found = find_cmdeploy(host, platform)
    if not found.anything():
        report = f"{platform.state_dir}/{IMPORT_DIR}/report.txt"
        if host.path(report).exists():
            out(f"chatmail import-cmdeploy: nothing to import: the relay was imported "
                f"already (report: {report}).")
            return 0
        return error(f"no relay deployed by cmdeploy found: no {CMDEPLOY_INI}, none of "
                     f"its units in {UNIT_DIR}, no {DOVECOT_PIN}. Nothing to import.")
    adopted = None
    if found.ini:
        try:
            adopted = adopt_ini(host.path(found.ini).read_text(encoding="utf-8"),
                                found.ini, ini_path)
        except (ImportError_, OSError, UnicodeDecodeError) as exc:
            return error(str(exc))
        found.mailboxes = count_mailboxes(host, adopted.config)
    existing = ini_path if host.path(ini_path).exists() else None
    accounts = "The" if found.mailboxes is None else f"{found.mailboxes}"
    out("A relay deployed with cmdeploy is here."
        + (f" {accounts} accounts in {adopted.config.mailboxes_dir} stay as they "
           "are (passwords, push tokens, mail)." if adopted else ""))
    out("The import will:")
    for line in make_plan(found, adopted, platform, ini_path, existing):
        out(f"  - {line}")
    if adopted is None:
        out(f"  (no {CMDEPLOY_INI}: {ini_path} is used as it is)")
    if dry_run:
        out("Nothing was changed (--dry-run).")
        return 0
    if not yes:
        answer = ask("Go ahead? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            out("Nothing was changed.")
            return 1
    importer = Importer(host, platform, ini_path, out, configure)
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    try:
        importer.run(found, adopted)
        config = adopted.config if adopted else None
        if configure is not None:
            if config is None:
                from ..config import read_config
                config = read_config(host.path(ini_path))
            importer.say("running 'chatmail configure'")
            configure(config, platform, host)
            importer.note("ran 'chatmail configure'")
    except Exception as exc:  # reported with what was done; the admin takes over
        text = report_text(importer.done + [f"FAILED: {exc}"], found, host, platform, when)
        path = write_report(host, platform, text)
        return error(f"{exc}\nWhat was done is in {path}. Fix the problem, then run "
                     "'chatmail configure' (or this command again).")
    text = report_text(importer.done, found, host, platform, when)
    path = write_report(host, platform, text)
    out("")
    out(text.rstrip("\n"))
    out(f"(this report is also in {path})")
    return 0

