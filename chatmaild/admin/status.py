"""`chatmail status`: is the relay working, and if not, what is wrong.

Looks at the configuration, the certificate, the services, the listening ports, Postfix's
queue and the Dovecot build, and prints one line per finding. Exit status 0 when nothing
failed, 1 with the list of what failed.

Every probe reads a file path or runs a command through `Probes`, so tests can point it at
their own files and answer for a service manager this host does not run.
"""

import ipaddress
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .host import Host, run_command
from .servicemanager import ServiceManagerError, dead_master_pid, service_manager
from .services import relay_services, relay_sockets

OK, INFO, WARN, FAIL = "ok", "", "warn", "FAIL"

# Ports the world reaches: (port, what listens).
PUBLIC_PORTS = [
    (25, "SMTP (Postfix)"),
    (465, "SMTPS submission (Postfix)"),
    (587, "submission (Postfix)"),
    (143, "IMAP (Dovecot)"),
    (993, "IMAPS (Dovecot)"),
    (443, "HTTPS, IMAP and SMTP via ALPN (nginx)"),
    (80, "HTTP (nginx)"),
]
# A certificate closer to its end than this is not being renewed (certbot renews 30 days
# before).
CERT_WARN_DAYS = 14
LARGE_QUEUE = 1000
DAY = 86400


@dataclass
class Finding:
    section: str
    name: str
    level: str
    detail: str
    hint: str = ""  # what to do about it, for WARN and FAIL


@dataclass
class Probes:
    """Where status looks. The defaults are the real system."""

    run: object = run_command
    proc_net_tcp: tuple = ("/proc/net/tcp", "/proc/net/tcp6")
    proc_dir: str = "/proc"
    dovecot_pid_file: str = ""  # default: master.pid in the platform's Dovecot base_dir
    dovecot_instant_idle_plugin: str = ""  # default: the platform's
    dovecot_config: str = ""  # the file Dovecot runs with; default: the platform's
    postfix_pid_file: str = ""  # default: in the platform's Postfix queue directory
    now: object = time.time
    manager: object = None  # a servicemanager; default: the platform's
    manager_paths: dict = field(default_factory=dict)
    host: object = field(default_factory=Host)  # where the list of DKIM keys is


# -- configuration and certificate -----------------------------------------------------


def check_config(config):
    section = "Configuration"
    findings = [
        Finding(section, "mail domain", INFO, config.mail_domain),
        Finding(section, "TLS mode", INFO,
                f"{config.tls_cert_mode} ({describe_path(config.tls_cert_path)})"),
        Finding(section, "privacy settings", INFO,
                "present" if config.privacy_mail else "not set (privacy_* in chatmail.ini)"),
    ]
    if config.unknown_keys:
        findings.append(Finding(
            section, "unknown settings", WARN, ", ".join(config.unknown_keys),
            "no part of the relay reads them: check their spelling in chatmail.ini"))
    findings.append(check_mailboxes(config))
    return findings


def describe_path(path):
    """The path, and where it leads if it is a link (acme mode links to certbot's files
    once there are any)."""
    path = Path(path)
    if path.is_symlink():
        return f"{path} -> {path.resolve()}"
    return str(path)


def check_mailboxes(config):
    path = config.mailboxes_dir
    try:
        count = sum(1 for entry in path.iterdir() if "@" in entry.name)
    except FileNotFoundError:
        return Finding("Configuration", "accounts", FAIL, f"{path} does not exist",
                       "run 'chatmail configure' (chatmail-metadata needs it to start)")
    except OSError as exc:
        return Finding("Configuration", "accounts", INFO, f"cannot count: {exc}")
    return Finding("Configuration", "accounts", INFO, f"{count} in {path}")


@dataclass
class CertificateInfo:
    not_after: float  # unix time
    subject: str
    issuer: str
    matches_domain: bool


def read_certificate(path, domain, run=run_command):
    """The facts status needs about the first certificate in PEM file `path`, read with
    openssl (Python's ssl module cannot parse a certificate file without a private API).
    Raises ValueError with openssl's reason."""
    result = run(["openssl", "x509", "-in", str(path), "-noout", "-enddate", "-subject",
                  "-issuer", "-nameopt", "RFC2253", "-checkhost", domain])
    if result.returncode != 0:
        raise ValueError((result.stderr or result.stdout).strip().splitlines()[0]
                         if (result.stderr or result.stdout).strip() else "openssl failed")
    fields, matches = {}, False
    for line in result.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and key in ("notAfter", "subject", "issuer"):
            fields[key] = value.strip()
        elif line.startswith("Hostname "):
            matches = "does match" in line
    return CertificateInfo(
        not_after=ssl.cert_time_to_seconds(fields["notAfter"]),
        subject=fields.get("subject", ""), issuer=fields.get("issuer", ""),
        matches_domain=matches,
    )


def check_certificate(config, platform, probes):
    name, path = "certificate", Path(config.tls_cert_path)
    if not path.exists():
        return [Finding("Configuration", name, FAIL, f"{path} does not exist",
                        missing_certificate_hint(config))]
    try:
        cert = read_certificate(path, config.mail_domain_bare, probes.run)
    except (ValueError, KeyError) as exc:
        return [Finding("Configuration", name, FAIL, f"{path}: cannot read: {exc}")]
    return [certificate_validity(config, platform, cert, probes.now()),
            *certificate_problems(config, platform, cert)]


def check_dkim(config, platform, host):
    """The selector the relay signs with, and a rotation waiting for its DNS record."""
    from .dkimrotate import DomainKeys, format_time

    if config.ipv4_relay:
        return []
    keys = DomainKeys.load(config, platform, host)
    findings = [Finding("Configuration", "DKIM selector", INFO,
                        f"{keys.active.selector} ({keys.active.path})")]
    if keys.pending:
        findings.append(Finding(
            "Configuration", "DKIM rotation", WARN,
            f"new key {keys.pending.selector} waits since {format_time(keys.pending.since)} "
            f"for its DNS record {keys.pending.record_name}",
            "publish it ('chatmail dns'), then run 'chatmail dkim rotate'"))
    return findings


def missing_certificate_hint(config):
    if config.tls_cert_mode == "external":
        return "put your certificate there (tls_external_cert_and_key in chatmail.ini)"
    return "run 'chatmail configure'"


def certificate_validity(config, platform, cert, now):
    days = int((cert.not_after - now) // DAY)
    until = time.strftime("%Y-%m-%d", time.gmtime(cert.not_after))
    detail = f"valid until {until} ({days} days), issued by {cert.issuer}"
    if cert.not_after <= now:
        return Finding("Configuration", "certificate", FAIL, f"expired on {until}",
                       renewal_hint(config, platform))
    if days < CERT_WARN_DAYS:
        return Finding("Configuration", "certificate", FAIL, detail,
                       renewal_hint(config, platform))
    return Finding("Configuration", "certificate", OK, detail)


def renewal_hint(config, platform):
    if config.tls_cert_mode == "acme":
        return (f"certbot does not renew it: see {certbot_log(platform)} and "
                "'chatmail dns --check'")
    if config.tls_cert_mode == "external":
        return (f"renew {config.tls_cert_path}, then reload {platform.dovecot_service}, "
                "postfix and nginx")
    return f"remove {config.tls_cert_path} and run 'chatmail configure' to make a new one"


def certbot_log(platform):
    """Where certbot's renewal runs leave their errors: the journal of certbot.service
    on Debian, syslog through the daily job on Alpine."""
    if platform.service_manager == "systemd":
        return "'journalctl -u certbot'"
    return "certbot's lines in /var/log/messages"


def certificate_problems(config, platform, cert):
    problems = []
    if not cert.matches_domain:
        problems.append(Finding(
            "Configuration", "certificate name", FAIL,
            f"not valid for {config.mail_domain_bare} (subject {cert.subject})",
            "clients and other relays will refuse it"))
    if config.tls_cert_mode == "acme" and cert.subject == cert.issuer:
        problems.append(Finding(
            "Configuration", "certificate issuer", FAIL,
            "still the self-signed placeholder: certbot has not obtained a certificate",
            "other relays refuse self-signed certificates: check 'chatmail dns --check', "
            f"that port 80 is reachable, and {certbot_log(platform)}"))
    return problems


# -- services ----------------------------------------------------------------------------


def expected_services(config, platform):
    """(name, required) of every service the relay uses on this platform. An optional one
    counts only where it is installed and enabled."""
    names = [(name, True) for name in relay_sockets(platform) + relay_services()]
    names += [(platform.dovecot_service, True), (platform.postfix_instance_service, True),
              ("nginx", True), (platform.fcgiwrap_service, True)]
    if not config.ipv4_relay:
        names.append((platform.opendkim_service, True))
    names += [(timer, True) for timer in platform.relay_timers.split()]
    if config.tls_cert_mode == "acme" and platform.certbot_renewal_service:
        names.append((platform.certbot_renewal_service, True))
    if config.mtail_address:
        names.append(("mtail", True))
    names += [(platform.coturn_service, False), ("unbound", False)]
    return names


def check_services(config, platform, probes):
    manager = probes.manager or service_manager(platform, probes.run, **probes.manager_paths)
    wanted = expected_services(config, platform)
    try:
        states = manager.states([name for name, _ in wanted])
    except ServiceManagerError as exc:
        return [Finding("Services", platform.service_manager, FAIL, f"cannot be asked: {exc}")]
    findings = []
    for name, required in wanted:
        finding = service_finding(states[name], required, platform)
        if name == platform.postfix_instance_service and finding and finding.level == OK:
            finding = dead_postfix_finding(platform, probes) or finding
        if finding:
            findings.append(finding)
    return findings


def dead_postfix_finding(platform, probes):
    """Alpine's postfix init script keeps no pid file of its own: OpenRC goes on calling
    Postfix started after its master process died. Postfix's pid file tells."""
    pid_file = probes.postfix_pid_file or f"{platform.postfix_queue_dir}/pid/master.pid"
    pid = dead_master_pid(pid_file, probes.proc_dir)
    if pid is None:
        return None
    return Finding("Services", platform.postfix_instance_service, FAIL,
                   f"counted as running, but its master process (pid {pid}) is gone",
                   "run 'chatmail configure' to start it")


def service_finding(state, required, platform):
    if not required and not (state.exists and state.enabled):
        return None  # not installed or switched off by the admin: not part of this relay
    if state.active:
        return Finding("Services", state.name, OK, state.text)
    if not state.exists:
        return Finding("Services", state.name, FAIL, "not installed",
                       "install the package that provides it")
    return Finding("Services", state.name, FAIL, state.text, log_hint(state.name, platform))


def log_hint(name, platform):
    if platform.service_manager == "systemd":
        return f"see 'journalctl -u {name}'"
    return f"see 'rc-service {name} status' and /var/log/messages"


# -- ports -------------------------------------------------------------------------------


TCP_LISTEN = "0A"


def parse_proc_net_tcp(text):
    """(address, port) of the listening sockets in /proc/net/tcp or tcp6 text."""
    listening = set()
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != TCP_LISTEN:
            continue
        address, _, port = fields[1].partition(":")
        listening.add((decode_proc_address(address), int(port, 16)))
    return listening


def decode_proc_address(hex_address):
    """The kernel prints addresses as 32-bit words, each in host byte order."""
    raw = bytes.fromhex(hex_address)
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(raw))


def listening_sockets(paths):
    listening = set()
    for path in paths:
        try:
            listening |= parse_proc_net_tcp(Path(path).read_text())
        except FileNotFoundError:  # tcp6 on a kernel without IPv6
            continue
    return listening


def is_loopback(address):
    return ipaddress.ip_address(address).is_loopback


def internal_ports(config):
    return [
        (config.filtermail_smtp_port, "outgoing filter (filtermail)"),
        (config.filtermail_smtp_port_incoming, "incoming filter (filtermail-incoming)"),
        (config.postfix_reinject_port, "reinjection of outgoing mail (Postfix)"),
        (config.postfix_reinject_port_incoming, "reinjection of incoming mail (Postfix)"),
    ]


def check_ports(config, probes):
    listening = listening_sockets(probes.proc_net_tcp)
    findings = []
    for port, what in PUBLIC_PORTS:
        addresses = sorted({addr for addr, p in listening if p == port})
        public = [addr for addr in addresses if not is_loopback(addr)]
        if public:
            findings.append(Finding("Ports", f"{port}/tcp", OK, f"{what} on {', '.join(public)}"))
        elif addresses:
            findings.append(Finding("Ports", f"{port}/tcp", FAIL,
                                    f"{what}: only on {', '.join(addresses)}",
                                    "nothing outside this host can reach it"))
        else:
            findings.append(Finding("Ports", f"{port}/tcp", FAIL, f"{what}: nobody listens",
                                    "see the services above"))
    for port, what in internal_ports(config):
        if any(p == port for _, p in listening):
            findings.append(Finding("Ports", f"{port}/tcp", OK, what))
        else:
            findings.append(Finding("Ports", f"{port}/tcp", FAIL, f"{what}: nobody listens",
                                    "see the services above"))
    return findings


# -- Postfix queue and Dovecot build -----------------------------------------------------


def check_postfix_queue(probes):
    # One JSON object per line, one line per queued message.
    result = probes.run(["postqueue", "-j"])
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["postqueue failed"])[-1]
        return Finding("Mail", "Postfix queue", INFO, f"unknown ({reason})")
    count = sum(1 for line in result.stdout.splitlines() if line.strip())
    detail = f"{count} message{'s' if count != 1 else ''}"
    if count > LARGE_QUEUE:
        return Finding("Mail", "Postfix queue", WARN, detail,
                       "see 'postqueue -p' for why they wait")
    return Finding("Mail", "Postfix queue", INFO, detail)


def dovecot_package_version(platform, run):
    """The installed package's version, or None."""
    if platform.package_manager == "dpkg":
        result = run(["dpkg-query", "-W", "-f=${Version}", "dovecot-core"])
        return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else None
    if platform.package_manager == "apk":
        result = run(["apk", "list", "--installed", "dovecot"])
        for line in result.stdout.splitlines():
            if line.startswith("dovecot-"):
                return line.split()[0][len("dovecot-"):]
    return None


# what `chatmail status` suggests when neither the plugin nor the patched build gives
# instant IDLE
NO_INSTANT_IDLE_HINTS = {
    "dpkg": "Install the instant-IDLE plugin, 'apt install dovecot-chatmail-instant-idle' "
            "(from the chatmail repository; the relay then loads it by itself)",
    "apk": "Install the instant-IDLE plugin, 'apk add dovecot-chatmail-instant-idle' "
           "(from the chatmail repository, built for this Alpine's Dovecot; the relay "
           "then loads it by itself)",
}
# the instant-IDLE plugin's name in mail_plugins (dovecot/plugin)
INSTANT_IDLE_PLUGIN = "chatmail_instant_idle"


def is_patched_dovecot(package):
    """Our rebuild of Debian's Dovecot (releases before the plugin) says so in its
    version, "+chatmail1"."""
    return bool(package) and "chatmail" in package


def imap_mail_plugins(platform, probes):
    """The plugins Dovecot's configuration loads for IMAP, by name ([] if doveconf fails).
    doveconf prints 2.3's list as words, 2.4's boolean list as "NAME = yes" lines."""
    config = probes.dovecot_config or platform.dovecot_main_config
    result = probes.run(["doveconf", "-c", config, "-f", "protocol=imap", "-h",
                         "mail_plugins"])
    if result.returncode != 0:
        return []
    names = []
    for line in result.stdout.splitlines():
        name, equals, value = line.partition(" = ")
        names += ([name] if value.strip() == "yes" else []) if equals else line.split()
    return names


def instant_idle_finding(platform, probes, label, package):
    """Which mechanism tells IDLE-ing clients about new mail at once: the plugin
    (installed and in Dovecot's configuration), our patched Dovecot, or none."""
    patched = is_patched_dovecot(package)
    if patched:
        label += " (chatmail build)"
    plugin = probes.dovecot_instant_idle_plugin or platform.dovecot_instant_idle_plugin
    if Path(plugin).exists():
        if INSTANT_IDLE_PLUGIN in imap_mail_plugins(platform, probes):
            return Finding("Mail", "Dovecot", INFO, f"{label}, instant IDLE: plugin")
        return Finding("Mail", "Dovecot", WARN,
                       f"{label}: the instant-IDLE plugin is installed but not configured",
                       "run 'chatmail configure'")
    if patched:
        return Finding("Mail", "Dovecot", INFO, f"{label}, instant IDLE: patched build")
    return Finding(
        "Mail", "Dovecot", WARN,
        f"{label}: without the chatmail patch or the instant-IDLE plugin",
        "IMAP IDLE notifications come 0.5 s late. "
        + NO_INSTANT_IDLE_HINTS[platform.package_manager])


def check_dovecot_build(platform, probes):
    result = probes.run(["dovecot", "--version"])
    if result.returncode != 0:
        return [Finding("Mail", "Dovecot", FAIL, "dovecot --version failed: "
                        + (result.stderr.strip() or "not installed"))]
    package = dovecot_package_version(platform, probes.run)
    label = f"{result.stdout.strip()}, package {package or 'unknown'}"
    findings = [instant_idle_finding(platform, probes, label, package)]
    stale = check_dovecot_binary(probes, platform)
    if stale:
        findings.append(stale)
    return findings


def check_dovecot_binary(probes, platform):
    """A Dovecot still running the binary an upgrade replaced keeps the old code (and any
    fixed security hole) until restarted."""
    pid_file = probes.dovecot_pid_file or f"{platform.dovecot_base_dir}/master.pid"
    try:
        pid = int(Path(pid_file).read_text().split()[0])
        exe = (Path(probes.proc_dir) / str(pid) / "exe").readlink()
    except (OSError, ValueError, IndexError):
        return None  # not running, or not ours to look at (needs root)
    if str(exe).endswith(" (deleted)"):
        return Finding("Mail", "Dovecot binary", FAIL,
                       f"the running Dovecot (pid {pid}) uses a replaced binary",
                       f"restart the {platform.dovecot_service} service")
    return None


# -- report ------------------------------------------------------------------------------


def collect(config, platform, probes=None):
    probes = probes or Probes()
    return [
        *check_config(config),
        *check_certificate(config, platform, probes),
        *check_dkim(config, platform, probes.host),
        *check_services(config, platform, probes),
        *check_ports(config, probes),
        check_postfix_queue(probes),
        *check_dovecot_build(platform, probes),
    ]


def format_report(config, findings):
    lines = [f"chatmail relay {config.mail_domain} ({config.inipath})"]
    section = None
    for finding in findings:
        if finding.section != section:
            section = finding.section
            lines += ["", section]
        lines.append(f"  {finding.level:<5} {finding.name:<24} {finding.detail}".rstrip())
    failed = [f for f in findings if f.level == FAIL]
    warned = [f for f in findings if f.level == WARN]
    for title, items in (("Problems", failed), ("Warnings", warned)):
        if items:
            lines += ["", f"{title}:"]
            lines += [f"  - {f.name}: {f.detail}" + (f" ({f.hint})" if f.hint else "")
                      for f in items]
    if not failed:
        lines += ["", "No problems found."]
    return "\n".join(lines) + "\n"


def exit_status(findings):
    return 1 if any(f.level == FAIL for f in findings) else 0


def main(config, platform, probes=None, out=print):
    findings = collect(config, platform, probes)
    out(format_report(config, findings).rstrip("\n"))
    return exit_status(findings)
