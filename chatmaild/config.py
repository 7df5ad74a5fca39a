"""The relay's configuration: /etc/chatmail/chatmail.ini in upstream's [params] format.

Every key of upstream's Config keeps its name, default and meaning, so that an ini file
written by upstream's cmdeploy loads unchanged and templates can use the same names.
"""

import configparser
import ipaddress
import re
import unicodedata
from collections import namedtuple
from pathlib import Path

DEFAULT_INI_PATH = "/etc/chatmail/chatmail.ini"
ACME_TLS_DIR = "/etc/chatmail/tls"
SECTION = "params"
# Longer values are typing accidents; none of the forms below needs as many characters.
MAX_VALUE_LENGTH = 1000

LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# Characters of paths: none of them is special in the Dovecot, Postfix and nginx files they
# are written into, nor to a shell (and an absolute path never starts with '-', so no
# command takes one for an option).
PATH_RE = re.compile(r"[\w./+-]+")
URL_RE = re.compile(r"https?://(\[[0-9a-f:.]+\]|[^/?#:]+)(:[0-9]{1,5})?([/?#][\w./?#%+=&~:-]*)?",
                    re.IGNORECASE)
EMAIL_LOCALPART_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,63}")
# Jinja's delimiters: harmless in a value today, but no contact detail needs them, and
# refusing them keeps the texts inert wherever a page is built from them.
TEMPLATE_SYNTAX_RE = re.compile(r"\{[{%#]|[}%#]\}")


class ConfigError(ValueError):
    """A chatmail.ini problem, worded for the admin who has to fix it."""


# -- the forms of values: each turns the text of a value into the value, or raises
# ValueError saying which form was expected.


def parse_bool(value):
    """Upstream semantics: only 'true' (any case) is true. The other words people write
    for a yes/no setting load as false, as they do on upstream relays, so that a
    chatmail.ini from cmdeploy means the same here; anything else is a mistake."""
    word = value.lower()
    if word not in ("true", "false", "yes", "no", "on", "off", "1", "0", ""):
        raise ValueError("expected true or false")
    return word == "true"


def whole_number(low, high, form=None):
    """A parser for whole numbers from `low` to `high`."""
    form = form or (f"a whole number greater than 0 and at most {high}, e.g. 60" if low == 1
                    else f"a whole number from {low} to {high}")

    def parse(value):
        if not re.fullmatch(r"[0-9]{1,10}", value) or not low <= int(value) <= high:
            raise ValueError(f"expected {form}")
        return int(value)

    return parse


parse_port = whole_number(1, 65535, "a TCP port number between 1 and 65535")
parse_count = whole_number(1, 1_000_000)
parse_days = whole_number(0, 36500, "a number of days, e.g. 20")


def days_as_text(value):
    """Upstream keeps these day counts as strings."""
    return str(parse_days(value))


def parse_load(value):
    """Read by doveauth only; a negative limit (upstream takes any float) stops every
    registration."""
    if not re.fullmatch(r"-?[0-9]{1,6}(\.[0-9]{1,6})?", value):
        raise ValueError("expected a number, e.g. 5 or 2.5")
    return float(value)


def parse_size_mb(value):
    """'500M', '2G', '2GB', '300' (megabytes) -> megabytes as int."""
    match = re.fullmatch(r"([0-9]{1,9})([MG]?)B?", value.strip().upper())
    if not match:
        raise ValueError("expected a size in megabytes or gigabytes, e.g. 500M or 2G")
    return int(match.group(1)) * (1024 if match.group(2) == "G" else 1)


def size_as_text(value):
    """Upstream keeps max_mailbox_size as written (max_mailbox_size_mb converts it)."""
    parse_size_mb(value)
    return value


def one_of(*words):
    def parse(value):
        if value not in words:
            raise ValueError(f"expected {', '.join(words[:-1])} or {words[-1]}")
        return value

    return parse


def or_empty(parse):
    """`parse`, except that an empty value stays empty (the setting is off)."""
    return lambda value: parse(value) if value else ""


def parse_mail_domain(value):
    problem = check_mail_domain(value)
    if problem:
        raise ValueError(problem)
    return value


def parse_email(value):
    """An address that Dovecot (mail_server_admin = mailto:...), certbot (--email=...) and
    the web pages take as it is: no quoting, nothing a shell or template treats specially."""
    localpart, _, domain = value.rpartition("@")
    if (not EMAIL_LOCALPART_RE.fullmatch(localpart) or ".." in localpart
            or host_name_problem(domain.lower())):
        raise ValueError("expected an e-mail address such as admin@example.org (letters, "
                         "digits and . _ + - before the @)")
    return value


def absolute_path(value):
    """The path with '.' components and repeated or trailing '/' removed."""
    parts = [part for part in value.split("/") if part not in ("", ".")]
    if not value.startswith("/") or ".." in parts or not parts or not PATH_RE.fullmatch(value):
        raise ValueError("expected an absolute path such as /srv/chatmail, without '..' "
                         "(letters, digits and . _ + - between the '/')")
    return "/" + "/".join(parts)


def path_object(value):
    return Path(absolute_path(value))


def cert_and_key_paths(value):
    paths = value.split()
    if len(paths) == 2:
        try:
            return tuple(map(absolute_path, paths))
        except ValueError:
            pass
    raise ValueError("expected two paths separated by a space, each absolute: "
                     "/path/fullchain.pem /path/privkey.pem")


def web_folder(value):
    """An absolute path is the admin's own pages, served by nginx. Upstream's cmdeploy also
    takes a folder relative to its checkout, or a missing one to build no pages: here any
    relative value only turns the relay's own pages off, and is never used as a path."""
    if value.startswith("/"):
        return absolute_path(value)
    if not PATH_RE.fullmatch(value) or value.startswith("-"):
        raise ValueError("expected the absolute path of your own web pages, e.g. "
                         "/var/www/chatmail")
    return value


def host_name_problem(name, test_marker=False):
    """None if `name` is a fully qualified lower-case host name, else what is wrong. With
    `test_marker`, its first label may start with '_'."""
    if len(name) > 253:
        return "a domain name has at most 253 characters"
    labels = name.split(".")
    if test_marker and labels[0].startswith("_"):
        labels[0] = labels[0][1:]
    if len(labels) < 2:
        return "use a fully qualified domain name such as chat.example.org"
    for label in labels:
        if not LABEL_RE.fullmatch(label):
            return (f"{label!r} is not a valid domain label "
                    "(letters a-z, digits and inner hyphens, at most 63 characters)")
    if labels[-1].isdigit():
        return "the last label of a domain name cannot be all digits"
    return None


def is_url_host(host):
    """A host in a URL: a name, an IPv4 address or a bracketed IPv6 address."""
    if host.startswith("[") and host.endswith("]"):
        return is_ip_address(host[1:-1], version=6)
    return host == "localhost" or is_ip_address(host) or not host_name_problem(host.lower())


def parse_web_url(value):
    match = URL_RE.fullmatch(value)
    port = match and match.group(2)
    if not match or not is_url_host(match.group(1)) or port and not 0 < int(port[1:]) < 65536:
        raise ValueError("expected an https:// or http:// URL such as https://example.org/path")
    return value


def listen_address(value):
    """Where the metrics are served (ports 3903 and 3904): an address of this host."""
    if value == "localhost" or is_ip_address(value):
        return value
    if value:
        raise ValueError("expected an IP address of this host such as 127.0.0.1, or "
                         "localhost")
    return None


def contact_text(value):
    """A contact detail for the privacy page, one or more lines (as upstream's postal
    addresses are written): printable, each line stripped. The pages escape it for HTML."""
    if TEMPLATE_SYNTAX_RE.search(value):
        raise ValueError("expected plain text: no template syntax such as {{, {% or {#")
    return "\n".join(line.strip() for line in value.splitlines() if line.strip())


def is_ip_address(text, version=None):
    """Without an IPv6 scope (fe80::1%eth0): Python takes any text after the '%'."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return "%" not in text and version in (None, address.version)


def is_valid_ipv4(text):
    return is_ip_address(text, version=4)


def check_mail_domain(domain):
    """Return None if `domain` can be a relay's mail domain, else the reason it cannot.

    Accepted: an IPv4 address, or a lower-case fully qualified domain name whose first
    label may start with '_' (upstream's marker for a self-signed test relay).
    """
    if not domain:
        return "the mail domain is empty"
    if is_valid_ipv4(domain):
        return None
    if domain != domain.lower():
        return "write the domain in lower case"
    return host_name_problem(domain, test_marker=True)


def implied_tls_mode(domain):
    """The certificate mode of a relay whose chatmail.ini names none (as upstream's):
    self-signed for a test domain ('_' first) or an IPv4 address, else ACME."""
    return "self" if domain.startswith("_") or is_valid_ipv4(domain) else "acme"


# A key of chatmail.ini: its default (None: absent means none), its form (the parser of
# its text), the Config attribute when its name differs, and whether it may go on in
# indented lines (upstream's postal addresses). A collections.namedtuple, not a
# typing.NamedTuple: every daemon reads its configuration, and typing would cost each of
# them 0.5 MB of memory for nothing else (bench/README.md, footprint).
Setting = namedtuple("Setting", "default parse attribute multiline", defaults=(None, False))


# Every key the relay reads, with upstream's default. A default may name {mail_domain}.
SETTINGS = {
    "mail_domain": Setting(None, parse_mail_domain),
    "max_user_send_per_minute": Setting("60", parse_count),
    "max_user_send_burst_size": Setting("10", parse_count),
    "max_mailbox_size": Setting("500M", size_as_text),
    "max_message_size": Setting("31457280", whole_number(1, 2**31 - 1)),
    "delete_mails_after": Setting("20", days_as_text),
    "delete_large_after": Setting("7", days_as_text),
    "delete_inactive_users_after": Setting("90", parse_days),
    # a local part has at most 64 characters
    "username_min_length": Setting("9", whole_number(1, 64)),
    "username_max_length": Setting("9", whole_number(1, 64)),
    "password_min_length": Setting("9", whole_number(1, 1000)),
    "max_load_1m": Setting("5", parse_load),
    "min_available_memory": Setting("200M", parse_size_mb, "min_available_memory_mb"),
    "min_free_disk_space": Setting("1G", parse_size_mb, "min_free_disk_space_mb"),
    "max_imap_connections": Setting("10000", parse_count),
    "max_smtp_connections": Setting("1000", parse_count),
    "filtermail_smtp_port": Setting("10080", parse_port),
    "filtermail_smtp_port_incoming": Setting("10081", parse_port),
    "filtermail_http_port_incoming": Setting("10082", parse_port),
    "filtermail_lmtp_port_transport": Setting("10083", parse_port),
    "postfix_reinject_port": Setting("10025", parse_port),
    "postfix_reinject_port_incoming": Setting("10026", parse_port),
    # Ours: how the certificate is obtained; empty: derived as upstream does (_set_tls).
    "tls_cert_mode": Setting("", or_empty(one_of("acme", "self", "external"))),
    "tls_external_cert_and_key": Setting("", or_empty(cert_and_key_paths)),
    "acme_email": Setting("", or_empty(parse_email)),
    "www_folder": Setting("", or_empty(web_folder)),
    "mtail_address": Setting(None, listen_address),
    "disable_ipv6": Setting("false", parse_bool),
    "imap_rawlog": Setting("false", parse_bool),
    "imap_compress": Setting("false", parse_bool),
    # Upstream runs its own iroh-relay when the key is absent and announces
    # https://<domain>. Neither Debian nor Alpine packages iroh-relay, so we never run
    # one: absent means announce none (clients then use their built-in default).
    "iroh_relay": Setting("", or_empty(parse_web_url)),
    # Ours: where push notifications go; tests point it at a local server.
    "notification_url": Setting("https://notifications.delta.chat/notify", parse_web_url),
    "turn_socket_path": Setting("/run/chatmail-turn/turn.socket", absolute_path),
    # Ours: coturn's use-auth-secret shared secret, generated per relay at install.
    "turn_secret_path": Setting("/etc/chatmail/turn-secret", absolute_path),
    # Ours: where the daily `chatmail backup --daily` keeps its archives (empty: no daily
    # backup).
    "backup_dir": Setting("", or_empty(absolute_path)),
    "mailboxes_dir": Setting("/home/vmail/mail/{mail_domain}", path_object),
    "passdb_path": Setting("/home/vmail/passdb.sqlite", path_object),
    "privacy_postal": Setting(None, contact_text, multiline=True),
    "privacy_mail": Setting(None, or_empty(parse_email)),
    "privacy_pdo": Setting(None, contact_text, multiline=True),
    "privacy_supervisor": Setting(None, contact_text, multiline=True),
}


def shown(value):
    """`value` as an error message quotes it: overlong ones shortened."""
    return repr(value if len(value) <= 80 else value[:60] + "...")


def character_problem(value, multiline):
    """What makes `value` unfit for any configuration file or command line, or None."""
    if len(value) > MAX_VALUE_LENGTH:
        return f"it has {len(value)} characters, more than {MAX_VALUE_LENGTH}"
    for char in value:
        if char == "\n" and multiline:
            continue
        if unicodedata.category(char)[0] == "C" or char in "\u2028\u2029":
            name = {"\n": "a line break", "\r": "a carriage return", "\t": "a tab"}.get(
                char, f"the control character U+{ord(char):04X}")
            return f"it contains {name}; write the value on one line, in plain text"
    return None


def check_value(key, value, where):
    """The value of `key` from its text, or ConfigError saying what is expected."""
    setting = SETTINGS.get(key)
    if setting is None:
        raise ConfigError(f"{where}: {key!r} is not a setting of the relay; the settings are "
                          f"{', '.join(sorted(SETTINGS))}")
    problem = character_problem(value, setting.multiline)
    if problem is None:
        try:
            return setting.parse(value.strip())
        except ValueError as exc:
            problem = str(exc)
    raise ConfigError(f"{where}: {key} = {shown(value)}: {problem}")


class Config:
    """Parsed chatmail.ini with upstream's defaults and derived values. Every value is
    checked against its form in SETTINGS; templates see nothing else."""

    def __init__(self, inipath, params):
        self._inipath = Path(inipath)
        params = dict(params)
        if "mail_domain" not in params:
            raise ConfigError(
                f"{inipath}: mail_domain is missing; add a line "
                "'mail_domain = chat.example.org' to the [params] section"
            )
        domain = check_value("mail_domain", params["mail_domain"], inipath)
        for key, setting in SETTINGS.items():
            if key in params:
                value = check_value(key, params.pop(key), inipath)
            elif setting.default is not None:
                value = check_value(key, setting.default.format(mail_domain=domain), inipath)
            else:
                value = None
            setattr(self, setting.attribute or key, value)
        self._unused_keys = sorted(params)

        self.mail_domain_bare = domain
        if is_valid_ipv4(domain):
            self.ipv4_relay = domain
            self.mail_domain = f"[{domain}]"
            self.postfix_myhostname = ipaddress.IPv4Address(domain).reverse_pointer
        else:
            self.ipv4_relay = None
            self.postfix_myhostname = domain
        if self.username_min_length > self.username_max_length:
            raise ConfigError(
                f"{inipath}: username_min_length ({self.username_min_length}) is larger "
                f"than username_max_length ({self.username_max_length})"
            )
        self.enable_iroh_relay = False
        self._set_tls()

    def _set_tls(self):
        """Upstream derives the mode: external paths given, else self-signed for '_'
        domains and IPv4 relays, else ACME. Ours may also be set explicitly
        (tls_cert_mode), e.g. a self-signed certificate for a private relay."""
        mode, external = self.tls_cert_mode, self.tls_external_cert_and_key
        implied = implied_tls_mode(self.mail_domain_bare)
        if mode == "external" and not external:
            raise ConfigError(f"{self._inipath}: tls_cert_mode = external needs "
                              "tls_external_cert_and_key = /path/fullchain.pem /path/privkey.pem")
        if mode == "acme" and implied == "self":
            raise ConfigError(f"{self._inipath}: tls_cert_mode = acme: a certificate "
                              f"authority cannot certify {self.mail_domain_bare}; use self")
        mode = mode or ("external" if external else implied)
        if mode == "external":
            self.tls_cert_path, self.tls_key_path = external
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
    params = dict(parser.items(SECTION))
    for key, value in params.items():
        if "\n" in value and key in SETTINGS and not SETTINGS[key].multiline:
            refuse_continuation(text, inipath, key)
    return params


def refuse_continuation(text, inipath, key):
    """An indented line continues the value above it: `ssl = no` under privacy_mail would
    become part of that value, and of every file it is written into."""
    number = continuation_line(text, key)
    where = f"{inipath}, line {number}" if number else str(inipath)
    raise ConfigError(
        f"{where}: this indented line continues the value of {key} (an indented line "
        f"belongs to the setting above it). Write {key} on one line, and start every "
        "setting at the beginning of a line."
    )


def is_continuation(line):
    """An indented line that configparser joins to the value of the key above it."""
    stripped = line.strip()
    return line[:1].isspace() and stripped != "" and stripped[0] not in "#;"


def continuation_line(text, key):
    """The number of the first line that continues the value of `key`, or None."""
    current = None
    for number, line in enumerate(text.split("\n"), 1):
        if is_continuation(line):
            if current == key:
                return number
        elif line.strip() and line.strip()[0] not in "#;":
            current = re.split(r"[=:]", line, maxsplit=1)[0].strip()
    return None


def default_config_text(mail_domain, **overrides):
    """Our annotated chatmail.ini for a new relay, with `overrides` set (key = value)."""
    # Imported here: only `chatmail` writes a new chatmail.ini, the daemons never do, and
    # importlib.resources would cost each of them 1 MB of memory (bench/README.md).
    from importlib import resources

    template = resources.files(__package__).joinpath("ini", "chatmail.ini.in").read_text()
    return set_ini_values(template.replace("@MAIL_DOMAIN@", mail_domain), overrides)


def set_ini_values(text, values):
    """Return ini `text` with each key of `values` set, keeping comments and order.

    An active `key = ...` line is replaced; else a commented-out '#key =' line is
    uncommented; else the key is appended. Everything else is left as the admin wrote it.
    """
    pending = dict(values)
    lines = text.splitlines()
    for pattern in (ACTIVE_KEY, COMMENTED_KEY):
        for key in list(pending):
            index = next((index for index, line in enumerate(lines)
                          if re.match(pattern.format(re.escape(key)), line)), None)
            if index is None:
                continue
            end = index + 1
            # the old value's continuation lines go with it
            while pattern == ACTIVE_KEY and end < len(lines) and is_continuation(lines[end]):
                end += 1
            lines[index:end] = ini_lines(key, pending.pop(key))
    for key, value in pending.items():
        lines += ini_lines(key, value)
    return "\n".join(lines) + "\n"


ACTIVE_KEY, COMMENTED_KEY = r"\s*({})\s*[=:]", r"\s*#\s*({})\s*="


def ini_lines(key, value):
    """`key = value` as ini lines; further lines of a value are indented, which makes them
    continuation lines."""
    first, *more = str(value).split("\n")
    return [f"{key} = {first}"] + [f"    {line}" for line in more]
