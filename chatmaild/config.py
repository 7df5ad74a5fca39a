"""The relay's configuration: /etc/chatmail/chatmail.ini in upstream's [params] format.

Every key of upstream's Config keeps its name, default and meaning, so that an ini file
written by upstream's cmdeploy loads unchanged and templates can use the same names.
"""

import configparser
import ipaddress
import re
from importlib import resources
from pathlib import Path

DEFAULT_INI_PATH = "/etc/chatmail/chatmail.ini"
ACME_TLS_DIR = "/etc/chatmail/tls"
SECTION = "params"

# key -> (default, parser). Parsers raise ValueError with the expected form.
_HIDDEN_PORTS = (
    "filtermail_smtp_port",
    "filtermail_smtp_port_incoming",
    "filtermail_http_port_incoming",
    "filtermail_lmtp_port_transport",
    "postfix_reinject_port",
    "postfix_reinject_port_incoming",
)

LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class ConfigError(ValueError):
    """A chatmail.ini problem, worded for the admin who has to fix it."""


def parse_bool(value):
    """Upstream semantics: only the string 'true' (any case) is true."""
    return value.strip().lower() == "true"


def parse_int(value):
    try:
        return int(value.strip())
    except ValueError:
        raise ValueError("a whole number, e.g. 60") from None


def parse_positive_int(value):
    number = parse_int(value)
    if number <= 0:
        raise ValueError("a whole number greater than 0")
    return number


def parse_port(value):
    number = parse_int(value)
    if not 0 < number < 65536:
        raise ValueError("a TCP port number between 1 and 65535")
    return number


def parse_float(value):
    try:
        return float(value.strip())
    except ValueError:
        raise ValueError("a number, e.g. 5 or 2.5") from None


def parse_size_mb(value):
    """'500M', '2G', '2GB', '300' (megabytes) -> megabytes as int."""
    text = value.strip().upper()
    if text.endswith("B"):
        text = text[:-1]
    factor = 1
    if text.endswith("G"):
        factor, text = 1024, text[:-1]
    elif text.endswith("M"):
        text = text[:-1]
    if not text.isdigit():
        raise ValueError("a size in megabytes or gigabytes, e.g. 500M or 2G")
    return int(text) * factor


def parse_days(value):
    """Upstream keeps the day counts for expiry as strings; we check they are numbers."""
    text = value.strip()
    if not text.isdigit():
        raise ValueError("a number of days, e.g. 20")
    return text


def is_valid_ipv4(text):
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def check_mail_domain(domain):
    """Return None if `domain` can be a relay's mail domain, else the reason it cannot.

    Accepted: an IPv4 address, or a lower-case fully qualified domain name whose first
    label may start with '_' (upstream's marker for a self-signed test relay).
    """
    if not domain:
        return "the mail domain is empty"
    if is_valid_ipv4(domain):
        return None
    if len(domain) > 253:
        return "a domain name has at most 253 characters"
    if domain != domain.lower():
        return "write the domain in lower case"
    labels = domain.split(".")
    if len(labels) < 2:
        return "use a fully qualified domain name such as chat.example.org"
    first = labels[0][1:] if labels[0].startswith("_") else labels[0]
    for label in [first] + labels[1:]:
        if not LABEL_RE.fullmatch(label):
            return (
                f"{label!r} is not a valid domain label "
                "(letters a-z, digits and inner hyphens, at most 63 characters)"
            )
    if labels[-1].isdigit():
        return "the last label of a domain name cannot be all digits"
    return None


class Config:
    """Parsed chatmail.ini with upstream's defaults and derived values."""

    def __init__(self, inipath, params):
        self._inipath = Path(inipath)
        params = dict(params)
        self._params = params
        domain = self._pop("mail_domain", None, str)
        if domain is None:
            raise ConfigError(
                f"{inipath}: mail_domain is missing; add a line "
                "'mail_domain = chat.example.org' to the [params] section"
            )
        domain = domain.strip()
        problem = check_mail_domain(domain)
        if problem:
            raise ConfigError(f"{inipath}: mail_domain = {domain!r}: {problem}")
        self.mail_domain_bare = domain
        if is_valid_ipv4(domain):
            self.ipv4_relay = domain
            self.mail_domain = f"[{domain}]"
            self.postfix_myhostname = ipaddress.IPv4Address(domain).reverse_pointer
        else:
            self.ipv4_relay = None
            self.mail_domain = domain
            self.postfix_myhostname = domain

        pop = self._pop
        self.max_user_send_per_minute = pop("max_user_send_per_minute", "60", parse_positive_int)
        self.max_user_send_burst_size = pop("max_user_send_burst_size", "10", parse_positive_int)
        self.max_mailbox_size = pop("max_mailbox_size", "500M", str).strip()
        self._check("max_mailbox_size", self.max_mailbox_size, parse_size_mb)
        self.max_message_size = pop("max_message_size", "31457280", parse_positive_int)
        self.delete_mails_after = pop("delete_mails_after", "20", parse_days)
        self.delete_large_after = pop("delete_large_after", "7", parse_days)
        self.delete_inactive_users_after = pop("delete_inactive_users_after", "90", parse_int)
        self.username_min_length = pop("username_min_length", "9", parse_positive_int)
        self.username_max_length = pop("username_max_length", "9", parse_positive_int)
        if self.username_min_length > self.username_max_length:
            raise ConfigError(
                f"{inipath}: username_min_length ({self.username_min_length}) is larger "
                f"than username_max_length ({self.username_max_length})"
            )
        self.password_min_length = pop("password_min_length", "9", parse_positive_int)
        self.www_folder = pop("www_folder", "", str).strip()
        for key in _HIDDEN_PORTS:
            default = str(DEFAULT_PORTS[key])
            setattr(self, key, pop(key, default, parse_port))
        self.mtail_address = pop("mtail_address", None, str)
        if self.mtail_address is not None:
            self.mtail_address = self.mtail_address.strip() or None
        self.disable_ipv6 = pop("disable_ipv6", "false", parse_bool)
        self.acme_email = pop("acme_email", "", str).strip()
        self.imap_rawlog = pop("imap_rawlog", "false", parse_bool)
        self.imap_compress = pop("imap_compress", "false", parse_bool)
        self.turn_socket_path = pop("turn_socket_path", "/run/chatmail-turn/turn.socket", str)
        # Ours: coturn's use-auth-secret shared secret, generated per relay at install.
        self.turn_secret_path = pop("turn_secret_path", "/etc/chatmail/turn-secret", str)
        # Ours: where push notifications go; tests point it at a local server.
        self.notification_url = pop(
            "notification_url", "https://notifications.delta.chat/notify", str
        ).strip()
        # Upstream runs its own iroh-relay when the key is absent and announces
        # https://<domain>. Neither Debian nor Alpine packages iroh-relay, so we never run
        # one: absent means announce none (clients then use their built-in default).
        self.iroh_relay = pop("iroh_relay", "", str).strip()
        self.enable_iroh_relay = False
        self.privacy_postal = pop("privacy_postal", None, str)
        self.privacy_mail = pop("privacy_mail", None, str)
        self.privacy_pdo = pop("privacy_pdo", None, str)
        self.privacy_supervisor = pop("privacy_supervisor", None, str)

        self.max_load_1m = pop("max_load_1m", "5", parse_float)
        self.min_available_memory_mb = pop("min_available_memory", "200M", parse_size_mb)
        self.min_free_disk_space_mb = pop("min_free_disk_space", "1G", parse_size_mb)
        self.max_imap_connections = pop("max_imap_connections", "10000", parse_positive_int)
        self.max_smtp_connections = pop("max_smtp_connections", "1000", parse_positive_int)

        self._set_tls(pop("tls_cert_mode", "", str).strip(),
                      pop("tls_external_cert_and_key", "", str).strip())

        mailboxes_dir = pop("mailboxes_dir", f"/home/vmail/mail/{domain}", str)
        self.mailboxes_dir = Path(mailboxes_dir.strip())
        self.passdb_path = Path(pop("passdb_path", "/home/vmail/passdb.sqlite", str).strip())
        self._unused_keys = sorted(params)

    def _pop(self, key, default, parser):
        raw = self._params.pop(key, default)
        if raw is None:
            return None
        return self._check(key, raw, parser)

    def _check(self, key, raw, parser):
        try:
            return parser(raw)
        except ValueError as exc:
            raise ConfigError(f"{self._inipath}: {key} = {raw!r}: expected {exc}") from None

    def _set_tls(self, mode, external):
        """Upstream derives the mode: external paths given, else self-signed for '_'
        domains and IPv4 relays, else ACME. Ours may also be set explicitly
        (tls_cert_mode), e.g. a self-signed certificate for a private relay."""
        implied = "self" if self.mail_domain_bare.startswith("_") or self.ipv4_relay else "acme"
        if mode not in ("", "acme", "self", "external"):
            raise ConfigError(f"{self._inipath}: tls_cert_mode = {mode!r}: expected acme, "
                              "self or external")
        if mode == "external" and not external:
            raise ConfigError(f"{self._inipath}: tls_cert_mode = external needs "
                              "tls_external_cert_and_key = /path/fullchain.pem /path/privkey.pem")
        if mode == "acme" and implied == "self":
            raise ConfigError(f"{self._inipath}: tls_cert_mode = acme: a certificate "
                              f"authority cannot certify {self.mail_domain_bare}; use self")
        mode = mode or ("external" if external else implied)
        if mode == "external":
            parts = external.split()
            if len(parts) != 2:
                raise ConfigError(
                    f"{self._inipath}: tls_external_cert_and_key = {external!r}: expected "
                    "two paths separated by a space: /path/fullchain.pem /path/privkey.pem"
                )
            self.tls_cert_path, self.tls_key_path = parts
        elif mode == "self":
            self.tls_cert_path = "/etc/ssl/certs/mailserver.pem"
            self.tls_key_path = "/etc/ssl/private/mailserver.key"
        else:
            # Services read these stable paths: links to a self-signed bootstrap
            # certificate until certbot has one, then to certbot's live files. So a relay
            # works from the first install on, before DNS and ACME do.
            self.tls_cert_path = f"{ACME_TLS_DIR}/fullchain.pem"
            self.tls_key_path = f"{ACME_TLS_DIR}/privkey.pem"
        self.tls_cert_mode = mode

    @property
    def inipath(self):
        return self._inipath

    @property
    def unknown_keys(self):
        """Keys in the file that no part of the relay reads (upstream: _unused_keys)."""
        return list(self._unused_keys)

    @property
    def max_mailbox_size_mb(self):
        return parse_size_mb(self.max_mailbox_size)

    def mailbox_path(self, addr):
        """The mailbox directory of `addr`, or ValueError for anything that is not a
        plain address of this relay's domain (path separators, '..', control characters).
        """
        check_address(addr, self.mail_domain)
        return self.mailboxes_dir / addr


DEFAULT_PORTS = {
    "filtermail_smtp_port": 10080,
    "filtermail_smtp_port_incoming": 10081,
    "filtermail_http_port_incoming": 10082,
    "filtermail_lmtp_port_transport": 10083,
    "postfix_reinject_port": 10025,
    "postfix_reinject_port_incoming": 10026,
}

# Characters Dovecot lets through auth_username_chars, minus '@' handled separately.
ADDRESS_LOCALPART_RE = re.compile(r"^[A-Za-z0-9._+-]+$")


def check_address(addr, mail_domain):
    """Raise ValueError unless `addr` is localpart@mail_domain and safe as a file name."""
    if not isinstance(addr, str) or len(addr) > 320:
        raise ValueError(f"invalid address {addr!r}")
    localpart, at, domain = addr.rpartition("@")
    if not at or domain != mail_domain or "@" in localpart:
        raise ValueError(f"not an address of {mail_domain}: {addr!r}")
    if not ADDRESS_LOCALPART_RE.fullmatch(localpart) or localpart.strip(".") == "":
        raise ValueError(f"invalid characters in address {addr!r}")


def read_config(inipath=DEFAULT_INI_PATH):
    """Read chatmail.ini; ConfigError names the file, the key and what is expected."""
    inipath = Path(inipath)
    try:
        text = inipath.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{inipath} does not exist; create it with 'chatmail setup DOMAIN' "
            "(on Debian also 'dpkg-reconfigure chatmail-relay')"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{inipath}: cannot read: {exc}") from None
    return Config(inipath, parse_ini_params(text, inipath))


def parse_ini_params(text, inipath="chatmail.ini"):
    """The [params] section as a dict of raw strings (no interpolation, names kept)."""
    parser = configparser.RawConfigParser(
        comment_prefixes=("#", ";"), inline_comment_prefixes=None, strict=True,
        default_section="\x00no-default-section",
    )
    parser.optionxform = str
    try:
        parser.read_string(text, source=str(inipath))
    except configparser.MissingSectionHeaderError:
        raise ConfigError(
            f"{inipath}: no [{SECTION}] section; the file must start with [{SECTION}]"
        ) from None
    except configparser.Error as exc:
        message = " ".join(str(exc).split())
        raise ConfigError(f"{inipath}: malformed ini file: {message}") from None
    if not parser.has_section(SECTION):
        raise ConfigError(f"{inipath}: no [{SECTION}] section; the file must start with [{SECTION}]")
    return dict(parser.items(SECTION))


def default_config_text(mail_domain, **overrides):
    """Our annotated chatmail.ini for a new relay, with `overrides` set (key = value)."""
    template = resources.files(__package__).joinpath("ini", "chatmail.ini.in").read_text()
    return set_ini_values(template.replace("@MAIL_DOMAIN@", mail_domain), overrides)


def set_ini_values(text, values):
    """Return ini `text` with each key of `values` set, keeping comments and order.

    An active `key = ...` line is replaced; else a commented-out '#key =' line is
    uncommented; else the key is appended. Everything else is left as the admin wrote it.
    """
    pending = {key: str(value) for key, value in values.items()}
    lines = text.splitlines()
    for pattern in (r"^\s*({})\s*[=:]", r"^\s*#\s*({})\s*="):
        for index, line in enumerate(lines):
            for key in list(pending):
                if re.match(pattern.format(re.escape(key)), line):
                    lines[index] = f"{key} = {pending.pop(key)}"
    lines.extend(f"{key} = {value}" for key, value in pending.items())
    return "\n".join(lines) + "\n"
