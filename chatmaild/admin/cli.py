"""`chatmail`: the relay administrator's command.

    chatmail setup DOMAIN      write a new chatmail.ini for mail domain DOMAIN
    chatmail configure         apply chatmail.ini to the mail server
    chatmail status            show the state of the relay's services
    chatmail dns               show (or --check) the DNS records the relay needs
    chatmail dkim rotate       replace the DKIM key (chatmail dkim status: the keys)
    chatmail backup FILE       save what a relay cannot regenerate (restore FILE: back)
    chatmail import-cmdeploy   move a relay deployed with upstream's cmdeploy onto this one

Exit codes: 0 success, 1 failure, 2 wrong usage, 3 not available in this version.
"""

import argparse
import os
import sys
from pathlib import Path

from .. import __version__
from ..config import (
    DEFAULT_INI_PATH,
    ConfigError,
    check_mail_domain,
    default_config_text,
    implied_tls_mode,
    parse_ini_params,
)
from ..files import write_atomic

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_NOT_AVAILABLE = 0, 1, 2, 3
# Read by the services (vmail), the /new CGI (www-data) and root.
INI_MODE = 0o644

DESCRIPTION = """\
Set up and inspect a chatmail relay, the Postfix + Dovecot mail server for Delta Chat.
All settings live in one file, chatmail.ini (see --config)."""

SETUP_HELP = """\
Write a new chatmail.ini for mail domain DOMAIN with every other setting at its default,
commented so that it can be edited. DOMAIN is the relay's fully qualified domain name (its
addresses look like NAME@DOMAIN); a name starting with '_' (a test relay) or an IPv4
address makes the relay use a self-signed certificate. An existing chatmail.ini for the
same domain is left as it is; one for another domain is never overwritten. Then it
configures the relay, as `chatmail configure` does (not with --no-configure)."""

CONFIGURE_HELP = """\
Apply chatmail.ini to Postfix, Dovecot, nginx, OpenDKIM and the relay's own services,
and reload whatever changed. Run it after editing chatmail.ini. Running it again without
changes changes nothing."""

SET_HELP = """\
Change settings in chatmail.ini, keeping its comments and the admin's other lines. The
result is checked first: if any value is invalid, the file is left unchanged. Run
'chatmail configure' afterwards to apply it."""

GET_HELP = """\
Print the values of settings as chatmail.ini writes them (an empty line for a key it
does not set), one per line."""

CHECK_DOMAIN_HELP = """\
Check that DOMAIN can be a relay's mail domain, as 'chatmail setup' and 'chatmail set'
do. If it can: exit status 0, and the certificate mode it implies when chatmail.ini
names none on standard output (self for a test domain starting with '_' or an IPv4
address, else acme). If not: exit status 1 and the reason on standard output. (The
Debian package's questions use it.)"""

STATUS_HELP = """\
Show whether the relay's services are running, its settings, the certificate and when
it expires, the ports it listens on, Postfix's queue and which Dovecot build runs. Exit
status 0 when nothing is wrong, 1 with a list of what is."""

DNS_HELP = """\
Show the DNS records the relay needs (A/AAAA, MX, SPF, DKIM, DMARC, MTA-STS, SRV,
CAA) as a zone file, to be entered at the domain's DNS provider. With --check, look each
one up and report it as OK, MISSING or WRONG with the record to publish. Reading the DKIM
key needs root. A relay whose mail domain is an IPv4 address needs no DNS."""

DKIM_HELP = """\
The relay's DKIM keys: the one it signs with, a new one waiting for its DNS record, and
replaced ones whose records may be removed after a grace period of 7 days."""

DKIM_ROTATE_HELP = """\
Replace the DKIM key. The first run makes a new key under a new selector (dkimYYYYMMDD)
and prints its TXT record, to be published at the domain's DNS provider; the relay goes
on signing with the old key. A later run (or 'chatmail configure') looks the record up
at the domain's authoritative servers and, once they serve it, switches to the new key.
The old key's record must stay published for 7 more days: 'chatmail dns' and 'chatmail
dkim status' say when it may go. Needs root."""

DKIM_DAILY_HELP = """\
What the relay's daily job (chatmail-dkim.timer; /etc/periodic/daily on Alpine) runs:
switch to the new key of a pending rotation once the domain's DNS serves its record (as
'chatmail dkim rotate' would), and delete the private keys of replaced keys whose grace
period of 7 days is over. It never starts a rotation. Needs root."""

DKIM_STATUS_HELP = """\
Show the selector the relay signs with, a pending rotation, and which old DKIM records
may be removed when."""

BACKUP_HELP = """\
Write one archive FILE (tar, gzip-compressed, readable by root only) of what the relay
cannot make again: chatmail.ini, the DKIM keys, the certificate (certbot's account and
certificates, or your external files), the TURN secret, and every account's password and
push tokens; with --with-mail also the mail. The relay keeps running meanwhile. Copy the
file off the host. With --daily (the daily timer), write it into backup_dir of
chatmail.ini, keeping the last 7; nothing when backup_dir is not set."""

RESTORE_HELP = """\
Put a backup made by 'chatmail backup' back, on a fresh install of chatmail-relay (this
host or a new one; the mail domain's DNS must then point here), with the right owners and
modes, then run 'chatmail configure'. Refuses to replace a different relay (another mail
domain, or accounts here that the backup does not have) unless --force is given."""

IMPORT_CMDEPLOY_HELP = """\
Move a relay deployed with upstream's cmdeploy onto this package, in place: adopt its
chatmail.ini (/usr/local/lib/chatmaild/chatmail.ini) as the relay's, commenting out keys
this relay does not read; stop, disable and remove cmdeploy's units in
/etc/systemd/system (they override the package's units of the same names) and its
drop-ins; remove its Dovecot pin (which blocks security updates) and its nginx.conf; then
run 'chatmail configure'. Accounts, passwords, push tokens, mail and the DKIM key
(selector opendkim) stay. It shows the plan and asks first. Files it removes are saved
in /var/lib/chatmail-relay/cmdeploy-import/, with a report of what it did and what it
left (the old virtualenv, acmetool, unbound). Running it again finds nothing to import."""


def build_parser():
    parser = argparse.ArgumentParser(
        prog="chatmail", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", metavar="PATH", type=Path, default=Path(DEFAULT_INI_PATH),
        help=f"the relay's chatmail.ini (default: {DEFAULT_INI_PATH})",
    )
    parser.add_argument("--version", action="version", version=f"chatmail {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add_command(name, summary, description, handler):
        command = commands.add_parser(
            name, help=summary, description=description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.set_defaults(handler=handler)
        return command

    setup = add_command("setup", "write a new chatmail.ini for a mail domain", SETUP_HELP,
                        cmd_setup)
    setup.add_argument("domain", metavar="DOMAIN",
                       help="the mail domain, e.g. chat.example.org")
    setup.add_argument("--no-configure", action="store_true",
                       help="only write chatmail.ini (to review it before 'chatmail "
                       "configure')")
    configure = add_command("configure", "apply chatmail.ini to the mail server",
                            CONFIGURE_HELP, cmd_configure)
    configure.add_argument("--no-reload", action="store_true",
                           help="write the configuration but do not start or reload services")
    configure.add_argument("--reload", metavar="SERVICE", action="append", default=[],
                           help="also reload SERVICE (e.g. after a new certificate); "
                                "dovecot, opendkim, coturn: whichever service runs it here")
    setting = add_command("set", "change settings in chatmail.ini", SET_HELP, cmd_set)
    setting.add_argument("settings", metavar="KEY=VALUE", nargs="+",
                         help="a setting to change, e.g. max_mailbox_size=1G")
    getting = add_command("get", "print settings from chatmail.ini", GET_HELP, cmd_get)
    getting.add_argument("keys", metavar="KEY", nargs="+", help="a setting, e.g. mail_domain")
    check_domain = add_command("check-domain", "check that a name can be the mail domain",
                               CHECK_DOMAIN_HELP, cmd_check_domain)
    check_domain.add_argument("domain", metavar="DOMAIN")
    add_command("status", "show the state of the relay's services", STATUS_HELP,
                cmd_status)
    dns = add_command("dns", "show the DNS records the relay needs", DNS_HELP, cmd_dns)
    dns.add_argument("--check", action="store_true",
                     help="compare the records with what DNS serves now and report the "
                     "missing or wrong ones (exit status 1 if a required one is)")
    dns.add_argument("--zonefile", metavar="F",
                     help="write the records to file F in zone file format")
    dns.add_argument("--ipv4", metavar="ADDRESS", action="append", type=ipv4_address,
                     help="the relay's public IPv4 address (default: the host's public "
                     "addresses; give it behind NAT); may be repeated")
    dns.add_argument("--ipv6", metavar="ADDRESS", action="append", type=ipv6_address,
                     help="the relay's IPv6 address (default: the host's stable global "
                     "addresses); may be repeated")
    add_nameserver_options(dns)
    dns.add_argument("--dkim-key", metavar="FILE", default=None,
                     help="OpenDKIM's private key (default: DOMAIN.private in the "
                     "platform's DKIM key directory, /etc/dkimkeys on Debian)")
    dkim = add_command("dkim", "show or rotate the DKIM keys", DKIM_HELP, cmd_dkim_status)
    dkim_commands = dkim.add_subparsers(dest="dkim_command", metavar="COMMAND")
    rotate = dkim_commands.add_parser(
        "rotate", help="replace the DKIM key", description=DKIM_ROTATE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    rotate.set_defaults(handler=cmd_dkim_rotate)
    rotate.add_argument("--now", action="store_true",
                        help="switch to the new key at once, without waiting for its "
                        "DNS record (receivers reject the relay's mail until they see it)")
    rotate.add_argument("--dry-run", action="store_true",
                        help="say what would be done, change nothing")
    add_nameserver_options(rotate)
    daily = dkim_commands.add_parser(
        "daily", help="complete a pending rotation, delete keys past their grace period",
        description=DKIM_DAILY_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    daily.set_defaults(handler=cmd_dkim_daily)
    daily.add_argument("--dry-run", action="store_true",
                       help="say what would be done, change nothing")
    add_nameserver_options(daily)
    dkim_commands.add_parser(
        "status", help="show the DKIM keys", description=DKIM_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ).set_defaults(handler=cmd_dkim_status)
    backup = add_command("backup", "save what the relay cannot make again", BACKUP_HELP,
                         cmd_backup)
    backup.add_argument("file", metavar="FILE", nargs="?",
                        help="the archive to write (a new file)")
    backup.add_argument("--with-mail", action="store_true",
                        help="also save the mail in the mailboxes")
    backup.add_argument("--daily", action="store_true",
                        help="write into backup_dir of chatmail.ini, keep the last 7")
    backup.add_argument("--dry-run", action="store_true",
                        help="say what would be saved, write nothing")
    restore = add_command("restore", "put a backup back and configure the relay",
                          RESTORE_HELP, cmd_restore)
    restore.add_argument("file", metavar="FILE", help="an archive of 'chatmail backup'")
    restore.add_argument("--force", action="store_true",
                         help="replace this host's relay even if it is a different one")
    restore.add_argument("--dry-run", action="store_true",
                         help="check the archive and say what would be restored, change "
                         "nothing")
    import_cmdeploy = add_command("import-cmdeploy",
                                  "move a relay deployed with cmdeploy onto this package",
                                  IMPORT_CMDEPLOY_HELP, cmd_import_cmdeploy)
    import_cmdeploy.add_argument("--dry-run", action="store_true",
                                 help="show what would be done, change nothing")
    import_cmdeploy.add_argument("--yes", action="store_true",
                                 help="do not ask before changing anything")
    import_cmdeploy.add_argument("--from", dest="root", metavar="ROOT", default="/",
                                 help="look for cmdeploy's files below ROOT instead of / "
                                 "(a copy of a relay: then it only shows the plan)")
    return parser


def add_nameserver_options(command):
    command.add_argument("--nameserver", metavar="IP", action="append", type=ip_address,
                         help="ask this DNS server (default: the domain's authoritative "
                         "servers); may be repeated")
    command.add_argument("--nameserver-port", metavar="PORT", type=int, default=53,
                         help="the port of --nameserver (default: 53)")


def ip_address(text, version=None):
    import ipaddress

    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {text!r}") from None
    if version and address.version != version:
        raise argparse.ArgumentTypeError(f"not an IPv{version} address: {text!r}")
    return str(address)


def ipv4_address(text):
    return ip_address(text, 4)


def ipv6_address(text):
    return ip_address(text, 6)


def error(message):
    print(f"chatmail: {message}", file=sys.stderr)


def configured_domain(path):
    """The mail_domain written in an existing ini file (None if it has none)."""
    params = parse_ini_params(path.read_text(encoding="utf-8"), path)
    domain = params.get("mail_domain")
    return domain.strip() if domain is not None else None


def cmd_setup(args):
    status = write_new_config(args.config, args.domain)
    if status != EXIT_OK:
        return status
    if args.no_configure:
        print("Review the settings in it, then run 'chatmail configure'.")
        return status
    return cmd_configure(argparse.Namespace(config=args.config, no_reload=False, reload=[]))


def write_new_config(path, domain):
    """chatmail.ini for `domain` at `path`, unless one exists (then it must be for the same
    domain)."""
    problem = check_mail_domain(domain)
    if problem:
        error(f"{domain!r} cannot be a mail domain: {problem}")
        return EXIT_FAILURE
    if path.exists():
        return check_existing_config(path, domain)
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as exc:
        error(f"cannot write {path}: {exc}")
        return EXIT_FAILURE
    try:
        write_atomic(path, default_config_text(domain).encode("utf-8"), INI_MODE, replace=False)
    except FileExistsError:  # created meanwhile
        return check_existing_config(path, domain)
    except OSError as exc:
        error(f"cannot write {path}: {exc}")
        return EXIT_FAILURE
    print(f"Wrote {path} for mail domain {domain}.")
    return EXIT_OK


def check_existing_config(path, domain):
    """setup when chatmail.ini exists: fine for the same domain, refused for another."""
    try:
        existing = configured_domain(path)
    except (OSError, UnicodeDecodeError, ConfigError) as exc:
        error(f"{path} exists but cannot be read ({exc}); not overwriting it. "
              "Fix or move it away, then run 'chatmail setup' again.")
        return EXIT_FAILURE
    if existing == domain:
        print(f"{path} already exists for mail domain {domain}; left unchanged.")
        return EXIT_OK
    error(
        f"{path} already exists for mail domain {existing!r}, not {domain!r}; "
        "not overwriting it. To change the relay's domain, edit mail_domain in that file "
        "(on Debian also 'dpkg-reconfigure chatmail-relay'), then run 'chatmail configure'. "
        "Addresses of the old domain stop working."
    )
    return EXIT_FAILURE


def load_config_or_error(path):
    from ..config import read_config

    try:
        return read_config(path)
    except ConfigError as exc:
        error(str(exc))
        return None


def load_config_and_platform(path):
    """(chatmail.ini, this system's platform facts), or None after saying what is wrong."""
    from .platform import PlatformError, load_platform

    config = load_config_or_error(path)
    if config is None:
        return None
    try:
        return config, load_platform()
    except PlatformError as exc:
        error(str(exc))
        return None


def cmd_configure(args):
    from .configure import ConfigureFailed, configure

    if os.geteuid() != 0:
        error("configure changes system files: run it as root")
        return EXIT_FAILURE
    loaded = load_config_and_platform(args.config)
    if loaded is None:
        return EXIT_FAILURE
    try:
        configure(*loaded, no_reload=args.no_reload, reload=args.reload)
    except ConfigureFailed as exc:
        error(str(exc))
        return EXIT_FAILURE
    print("chatmail configure: done")
    return EXIT_OK


def cmd_set(args):
    from ..config import Config, check_value, set_ini_values

    values = {}
    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            error(f"expected KEY=VALUE, got {item!r}")
            return EXIT_USAGE
        values[key.strip()] = value.strip()
    try:
        # Each value on its own first: a line break in one would add lines to the file.
        for key, value in values.items():
            check_value(key, value, args.config)
        text = args.config.read_text(encoding="utf-8")
        new_text = set_ini_values(text, values)
        Config(args.config, parse_ini_params(new_text, args.config))
    except OSError as exc:
        error(f"cannot read {args.config}: {exc.strerror}")
        return EXIT_FAILURE
    except ConfigError as exc:
        error(f"{exc} (nothing was changed)")
        return EXIT_FAILURE
    if new_text != text:
        write_atomic(args.config, new_text.encode("utf-8"), INI_MODE)
    return EXIT_OK


def cmd_get(args):
    try:
        params = parse_ini_params(args.config.read_text(encoding="utf-8"), args.config)
    except OSError as exc:
        error(f"cannot read {args.config}: {exc.strerror}")
        return EXIT_FAILURE
    except (UnicodeDecodeError, ConfigError) as exc:
        error(str(exc))
        return EXIT_FAILURE
    for key in args.keys:
        print(" ".join(params.get(key, "").split()))
    return EXIT_OK


def cmd_check_domain(args):
    problem = check_mail_domain(args.domain)
    if problem:
        print(problem)
        return EXIT_FAILURE
    print(implied_tls_mode(args.domain))
    return EXIT_OK


def cmd_status(args):
    from . import status

    loaded = load_config_and_platform(args.config)
    if loaded is None:
        return EXIT_FAILURE
    return status.main(*loaded)


def cmd_dns(args):
    from . import dns

    from .dkimrotate import DomainKeys
    from .host import Host

    dkim_key, dkim_keys = args.dkim_key, None
    if dkim_key is None:
        loaded = load_config_and_platform(args.config)
        if loaded is None:
            return EXIT_FAILURE
        config, platform = loaded
        dkim_keys = DomainKeys.load(config, platform, Host())
        dkim_key = dkim_keys.active.path
    else:
        config = load_config_or_error(args.config)
        if config is None:
            return EXIT_FAILURE
    try:
        return dns.run(config, check=args.check, zonefile=args.zonefile, ipv4=args.ipv4,
                       ipv6=args.ipv6, nameservers=args.nameserver,
                       port=args.nameserver_port, dkim_key=dkim_key, dkim_keys=dkim_keys)
    except OSError as exc:
        error(str(exc))
        return EXIT_FAILURE


def cmd_dkim_status(args):
    import time

    from .dkimrotate import DomainKeys, status_lines
    from .host import Host

    loaded = load_config_and_platform(args.config)
    if loaded is None:
        return EXIT_FAILURE
    config, platform = loaded
    if config.ipv4_relay:
        print("This relay's mail domain is an IPv4 address: it has no DKIM key.")
        return EXIT_OK
    for line in status_lines(DomainKeys.load(config, platform, Host()), time.time()):
        print(line)
    return EXIT_OK


def cmd_dkim_rotate(args):
    return run_rotation(args, "rotate", lambda rotation: rotation.rotate(now_switch=args.now))


def cmd_dkim_daily(args):
    return run_rotation(args, "daily", lambda rotation: rotation.daily())


def run_rotation(args, name, act_on):
    """`chatmail dkim NAME`: ACT_ON(the Rotation) returns whether signing switched; then
    OpenDKIM's tables name the new key: they are written and OpenDKIM reloaded."""
    from .configure import ConfigureFailed, configure
    from .dkimrotate import Rotation, RotationError, default_resolver
    from .host import CommandFailed, Host

    if os.geteuid() != 0 and not args.dry_run:
        error(f"dkim {name} makes, switches and deletes keys: run it as root")
        return EXIT_FAILURE
    loaded = load_config_and_platform(args.config)
    if loaded is None:
        return EXIT_FAILURE
    config, platform = loaded
    rotation = Rotation(config, platform, Host(),
                        default_resolver(config, args.nameserver, args.nameserver_port),
                        dry_run=args.dry_run)
    try:
        if act_on(rotation):
            configure(config, platform, steps=["files", "services"])
    except (RotationError, CommandFailed, ConfigureFailed, OSError) as exc:
        error(str(exc))
        return EXIT_FAILURE
    return EXIT_OK


def cmd_backup(args):
    from . import backup

    if (args.file is None) == (not args.daily):
        error("give FILE, or --daily")
        return EXIT_USAGE
    if os.geteuid() != 0:
        error("backup reads keys only root may read: run it as root")
        return EXIT_FAILURE
    loaded = load_config_and_platform(args.config)
    if loaded is None:
        return EXIT_FAILURE
    try:
        if args.dry_run:
            counts = backup.count_backup(*loaded, with_mail=args.with_mail)
            print(f"Would save {backup.summary(counts)}; nothing written (--dry-run).")
        elif args.daily:
            done = backup.daily_backup(*loaded)
            if done is None:
                print("Daily backups are off (backup_dir in chatmail.ini is not set).")
            else:
                print(f"Wrote {done[0]}: {backup.summary(done[1])}.")
        else:
            counts = backup.write_backup(*loaded, args.file, with_mail=args.with_mail)
            print(f"Wrote {args.file}: {backup.summary(counts)}.")
    except (backup.BackupError, OSError) as exc:
        error(str(exc))
        return EXIT_FAILURE
    return EXIT_OK


def cmd_restore(args):
    from . import backup
    from .configure import ConfigureFailed, configure
    from .platform import PlatformError, load_platform

    if os.geteuid() != 0:
        error("restore writes system files: run it as root")
        return EXIT_FAILURE
    try:
        platform = load_platform()
        archive = backup.open_backup(args.file, args.config)
        backup.check_restore(archive, platform, args.config, args.force)
    except (backup.BackupError, PlatformError, OSError) as exc:
        error(str(exc))
        return EXIT_FAILURE
    if args.dry_run:
        print(f"Would restore {len(archive.members)} files of "
              f"{archive.config.mail_domain_bare} and configure the relay; nothing "
              "changed (--dry-run).")
        return EXIT_OK
    try:
        backup.restore(archive, args.config)
        # The keys and certificates changed under the same file names: the daemons that
        # hold them must read them again.
        configure(archive.config, platform,
                  reload=backup.reloaded_after_restore(archive.config))
    except (backup.BackupError, ConfigureFailed, OSError) as exc:
        error(str(exc))
        return EXIT_FAILURE
    print("chatmail restore: done")
    return EXIT_OK


def cmd_import_cmdeploy(args):
    from . import importcmdeploy
    from .configure import configure
    from .host import Host
    from .platform import PlatformError, load_platform

    if os.geteuid() != 0 and not args.dry_run:
        error("import-cmdeploy changes system files: run it as root")
        return EXIT_FAILURE
    try:
        platform = load_platform()
    except PlatformError as exc:
        error(str(exc))
        return EXIT_FAILURE
    host = Host(args.root)
    local = host.root == Path("/")
    if not local:
        print(f"Looking below {args.root}: showing the plan only.")
    return importcmdeploy.import_cmdeploy(
        host, platform, str(args.config), dry_run=args.dry_run or not local,
        yes=args.yes, configure=configure if local else None, check_package=local)


def cmd_not_available(args):
    error(f"'chatmail {args.command}' is not available yet: it arrives with the "
          "chatmail-relay package.")
    return EXIT_NOT_AVAILABLE


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
