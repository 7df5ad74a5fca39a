"""`chatmail import-cmdeploy` on a root directory laid out as upstream's cmdeploy leaves
a relay (our own fixture, from the facts in cmdeploy/src/cmdeploy/): what it finds, the
plan, --dry-run, the refusals, what it changes and saves, the report, and that a second
run has nothing to import. Commands are answered by a stand-in that records them."""

import subprocess
from types import SimpleNamespace

import pytest

from chatmaild.admin import importcmdeploy
from chatmaild.admin.host import Completed, Host
from chatmaild.admin.platform import load_platform
from chatmaild.config import read_config
from chatmaild.doveauth import AuthDictServer
from chatmaild.mailbox import Mailbox
from chatmaild.sha512crypt import verify

DOMAIN = "chat.example.org"
INI = "/etc/chatmail/chatmail.ini"
DATA_DIR = "/usr/share/chatmail-relay"
PASSWORD = "Wo/p\\a's\"s1"
DEBIAN_NGINX_CONF = "include /etc/nginx/modules-enabled/*.conf;\nhttp { }\n"

CMDEPLOY_INI = f"""\
[params]
mail_domain = {DOMAIN}
max_user_send_per_minute = 100
max_mailbox_size = 2G
# an admin's comment
passthrough_senders = bot@example.org
privacy_postal =
    Example Org
    Street 1
privacy_mail = privacy@example.org
privacy_pdo =
privacy_supervisor =
"""
CMDEPLOY_UNIT = """\
[Unit]
Description=cmdeploy's {name}

[Service]
ExecStart=/usr/local/lib/chatmaild/venv/bin/{name} /run/{name}/{name}.socket \
/usr/local/lib/chatmaild/chatmail.ini
User=vmail

[Install]
WantedBy=multi-user.target
"""
NGINX_CONF = """\
load_module modules/ngx_stream_module.so;
user www-data;
events { worker_connections 2048; }
stream {
    map $ssl_preread_alpn_protocols $proxy { default 127.0.0.1:8443; }
    server { listen 443; proxy_pass $proxy; ssl_preread on; }
}
"""
UNITS = ("doveauth.service", "chatmail-metadata.service", "lastlogin.service",
         "filtermail.service", "filtermail-incoming.service", "turnserver.service",
         "iroh-relay.service", "mtail.service", "chatmail-expire.timer",
         "chatmail-expire.service", "acmetool-redirector.service")
OUR_UNITS = ("doveauth.service", "chatmail-metadata.service", "lastlogin.service",
             "filtermail.service", "filtermail-incoming.service", "chatmail-expire.timer",
             "chatmail-expire.service")


def put(root, path, text="", mode=0o644):
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    target.chmod(mode)
    return target


def upstream_hash(password):
    """As upstream's doveauth stores it: crypt(3) SHA-512 ($6$, 5000 rounds) behind
    {SHA512-CRYPT}; openssl is an implementation independent of ours."""
    out = subprocess.run(["openssl", "passwd", "-6", "-stdin"], input=password,
                         capture_output=True, text=True, check=True).stdout.strip()
    return "{SHA512-CRYPT}" + out


@pytest.fixture
def relay(tmp_path):
    """The root of a relay as cmdeploy leaves it, with our package installed."""
    root = tmp_path / "root"
    put(root, "/usr/local/lib/chatmaild/chatmail.ini", CMDEPLOY_INI)
    put(root, "/usr/local/lib/chatmaild/venv/bin/doveauth", "#!/bin/sh\n", 0o755)
    for name in UNITS:
        put(root, f"/etc/systemd/system/{name}", CMDEPLOY_UNIT.format(name=name))
    put(root, "/etc/systemd/system/dovecot.service.d/10_restart.conf",
        "[Service]\nRestart=always\n")
    put(root, "/etc/systemd/system/opendkim.service.d/10-prevent-memory-leak.conf",
        "[Service]\nRuntimeMaxSec=1d\n")
    # an admin's own drop-in beside cmdeploy's stays
    put(root, "/etc/systemd/system/dovecot.service.d/local.conf", "[Service]\n")
    put(root, "/etc/apt/preferences.d/pin-dovecot",
        "Package: dovecot-*\nPin: version *\nPin-Priority: -1\n")
    put(root, "/etc/nginx/nginx.conf", NGINX_CONF)
    put(root, "/etc/dkimkeys/opendkim.private", "cmdeploy's key", 0o600)
    put(root, f"/var/lib/acme/live/{DOMAIN}/fullchain", "acmetool certificate")
    put(root, f"/var/lib/acme/live/{DOMAIN}/privkey", "acmetool key", 0o600)
    for user in ("alice0001", "bobby0002"):
        mailbox = f"/home/vmail/mail/{DOMAIN}/{user}@{DOMAIN}"
        put(root, f"{mailbox}/password", upstream_hash(PASSWORD), 0o600)
        put(root, f"{mailbox}/enforceE2EEincoming")
        put(root, f"{mailbox}/metadata.json", '{"devicetoken": {"tok": 1790000000}}')
    # our package
    put(root, f"{DATA_DIR}/steps/dkim-key", "#!/bin/sh\n", 0o755)
    for name in OUR_UNITS:
        put(root, f"/lib/systemd/system/{name}", "[Unit]\n")
    return root


class Commands:
    """Answers the commands the import runs, and records them."""

    def __init__(self, root, package_status="installed"):
        self.root = root
        self.package_status = package_status
        self.ran = []

    def __call__(self, argv, timeout=30, show=False, env=None):
        self.ran.append(list(argv))
        if argv[0] == "dpkg-query":
            return Completed(0, self.package_status)
        if argv[0] == "apt-get" and "nginx-common" in argv:
            put(self.root, "/etc/nginx/nginx.conf", DEBIAN_NGINX_CONF)
        return Completed(0, "")


@pytest.fixture
def platform():
    return load_platform("debian12")


def run_import(root, platform, commands=None, **options):
    commands = commands or Commands(root)
    lines, configured = [], []
    host = Host(root, run=commands, data_dir=DATA_DIR)

    def configure(config, platform, host):
        configured.append(config)

    options.setdefault("ask", lambda prompt: pytest.fail("asked: " + prompt))
    status = importcmdeploy.import_cmdeploy(host, platform, INI, out=lines.append,
                                            configure=configure, **options)
    return SimpleNamespace(status=status, text="\n".join(lines), commands=commands.ran,
                           configured=configured)


def snapshot(root):
    return {str(path.relative_to(root)): path.read_bytes() if path.is_file() else None
            for path in sorted(root.rglob("*"))}


def test_dry_run_shows_the_plan_and_changes_nothing(relay, platform):
    before = snapshot(relay)
    result = run_import(relay, platform, dry_run=True)
    assert result.status == 0
    assert snapshot(relay) == before
    assert result.commands == [["dpkg-query", "-W", "-f=${db:Status-Status}",
                                "chatmail-relay"]]
    assert result.configured == []
    text = result.text
    assert "2 accounts" in text
    assert f"adopt /usr/local/lib/chatmaild/chatmail.ini as {INI}" in text
    assert "comment out passthrough_senders = bot@example.org" in text
    for name in UNITS:
        assert f"stop, disable and remove /etc/systemd/system/{name}" in text
    assert "remove cmdeploy's drop-in /etc/systemd/system/dovecot.service.d/10_restart.conf" \
        in text
    assert "remove /etc/apt/preferences.d/pin-dovecot" in text
    assert "nginx.conf by Debian's" in text
    assert f"keep the DKIM key /etc/dkimkeys/opendkim.private (selector opendkim) as " \
        f"/etc/dkimkeys/{DOMAIN}.private" in text
    assert "acmetool's certificate" in text
    assert "Nothing was changed (--dry-run)." in text


def test_import_moves_the_relay_and_a_second_run_finds_nothing(relay, platform):
    result = run_import(relay, platform, yes=True)
    assert result.status == 0, result.text

    # the ini: the admin's settings and comments kept, the unknown key commented out
    ini = (relay / INI.lstrip("/")).read_text()
    assert "max_user_send_per_minute = 100" in ini
    assert "# an admin's comment" in ini
    assert "\n# not a setting of this relay (chatmail import-cmdeploy): " \
        "passthrough_senders = bot@example.org\n" in ini
    config = read_config(relay / INI.lstrip("/"))
    assert config.unknown_keys == []
    assert config.max_user_send_per_minute == 100
    assert config.max_mailbox_size_mb == 2048
    assert config.privacy_postal == "Example Org\nStreet 1"
    assert [c.mail_domain for c in result.configured] == [DOMAIN]
    assert not (relay / "usr/local/lib/chatmaild/chatmail.ini").exists()

    # cmdeploy's units stopped, disabled, removed and saved; ours of the same names enabled
    saved = relay / "var/lib/chatmail-relay/cmdeploy-import"
    for name in UNITS:
        assert not (relay / "etc/systemd/system" / name).exists()
        assert ["systemctl", "disable", "--now", name] in result.commands
        assert (saved / name).read_text() == CMDEPLOY_UNIT.format(name=name)
    reload_at = result.commands.index(["systemctl", "daemon-reload"])
    enable = result.commands[reload_at + 1]
    assert enable[:2] == ["systemctl", "enable"] and sorted(enable[2:]) == sorted(OUR_UNITS)
    assert not (relay / "etc/systemd/system/dovecot.service.d/10_restart.conf").exists()
    assert (relay / "etc/systemd/system/dovecot.service.d/local.conf").exists()
    assert not (relay / "etc/systemd/system/opendkim.service.d").exists()

    # the pin and cmdeploy's nginx.conf gone (saved)
    assert not (relay / "etc/apt/preferences.d/pin-dovecot").exists()
    assert (saved / "pin-dovecot").exists()
    assert (relay / "etc/nginx/nginx.conf").read_text() == DEBIAN_NGINX_CONF
    assert (saved / "nginx.conf").read_text() == NGINX_CONF

    # DKIM key and accounts untouched; acmetool's certificate serves meanwhile
    assert (relay / "etc/dkimkeys/opendkim.private").read_text() == "cmdeploy's key"
    tls = relay / "etc/chatmail/tls"
    assert (tls / "bootstrap-cert.pem").read_text() == "acmetool certificate"
    assert (tls / "bootstrap-key.pem").stat().st_mode & 0o777 == 0o600
    created = (relay / "var/lib/chatmail-relay/created.list").read_text().split()
    assert "/etc/chatmail/tls/bootstrap-cert.pem" in created

    # the report, on stdout and in a file
    report = (saved / "report.txt").read_text()
    for text in (report, result.text):
        assert "Left untouched:" in text
        assert "/usr/local/lib/chatmaild/venv" in text
        assert "/var/lib/acme" in text and "unbound" in text
        assert "removed /etc/apt/preferences.d/pin-dovecot" in text

    again = run_import(relay, platform, yes=True)
    assert again.status == 0
    assert "nothing to import: the relay was imported already" in again.text
    assert again.configured == []


def test_upstream_accounts_log_in_with_our_doveauth(relay, platform):
    """The password files stay as they are: our doveauth hands Dovecot upstream's hash,
    which checks the old password against it."""
    assert run_import(relay, platform, yes=True).status == 0
    config = read_config(relay / INI.lstrip("/"))
    config.mailboxes_dir = relay / str(config.mailboxes_dir).lstrip("/")
    addr = f"alice0001@{DOMAIN}"
    fields = AuthDictServer(config, nocreate_file=relay / "nocreate").lookup_passdb(
        addr, PASSWORD)
    assert fields["password"].startswith("{SHA512-CRYPT}$6$")
    assert verify(PASSWORD, fields["password"].removeprefix("{SHA512-CRYPT}"))
    assert not verify("wrong", fields["password"].removeprefix("{SHA512-CRYPT}"))
    assert Mailbox(config, addr).metadata.read()["devicetoken"] == {"tok": 1790000000}


def test_a_domain_key_made_by_an_earlier_configure_gives_way(relay, platform):
    """The package's own install configured another domain first and used up the one
    adoption of opendkim.private: the import gives the key its chance again."""
    put(relay, "/etc/dkimkeys/.chatmail-adopted-legacy-key")
    put(relay, "/etc/dkimkeys/other.example.org.private", "adopted for the wrong domain")
    put(relay, INI, "[params]\nmail_domain = other.example.org\n")
    result = run_import(relay, platform, yes=True)
    assert result.status == 0
    assert not (relay / "etc/dkimkeys/.chatmail-adopted-legacy-key").exists()
    saved = relay / "var/lib/chatmail-relay/cmdeploy-import/chatmail.ini.before-import"
    assert "other.example.org" in saved.read_text()
    assert f"mail_domain = {DOMAIN}" in (relay / INI.lstrip("/")).read_text()


def test_refuses_without_cmdeploy(tmp_path, platform):
    root = tmp_path / "root"
    put(root, f"{DATA_DIR}/steps/dkim-key")
    result = run_import(root, platform, yes=True)
    assert result.status == 1
    assert "no relay deployed by cmdeploy found" in result.text


def test_refuses_without_the_package(relay, platform):
    (relay / DATA_DIR.lstrip("/") / "steps/dkim-key").unlink()
    before = snapshot(relay)
    result = run_import(relay, platform, yes=True)
    assert result.status == 1
    assert "the chatmail-relay package is not installed" in result.text
    assert snapshot(relay) == before

    put(relay, f"{DATA_DIR}/steps/dkim-key")
    result = run_import(relay, platform, Commands(relay, "config-files"), yes=True)
    assert result.status == 1
    assert "not installed" in result.text


def test_a_value_the_relay_refuses_stops_before_anything_changes(relay, platform):
    put(relay, "/usr/local/lib/chatmaild/chatmail.ini",
        CMDEPLOY_INI + "max_message_size = lots\n")
    before = snapshot(relay)
    result = run_import(relay, platform, yes=True)
    assert result.status == 1
    assert "max_message_size" in result.text and "run 'chatmail import-cmdeploy' again" \
        in result.text
    assert snapshot(relay) == before


def test_asks_first(relay, platform):
    before = snapshot(relay)
    result = run_import(relay, platform, ask=lambda prompt: "n")
    assert result.status == 1
    assert snapshot(relay) == before
    result = run_import(relay, platform, ask=lambda prompt: "y")
    assert result.status == 0
    assert not (relay / "etc/apt/preferences.d/pin-dovecot").exists()


def test_a_failed_configure_is_reported(relay, platform):
    lines = []

    def configure(config, platform, host):
        raise RuntimeError("postfix: broken")

    host = Host(relay, run=Commands(relay), data_dir=DATA_DIR)
    status = importcmdeploy.import_cmdeploy(host, platform, INI, yes=True,
                                            out=lines.append, configure=configure)
    assert status == 1
    report = (relay / "var/lib/chatmail-relay/cmdeploy-import/report.txt").read_text()
    assert "FAILED: postfix: broken" in report
    assert "run 'chatmail configure'" in "\n".join(lines)


def test_masked_units_are_the_admins(relay, platform):
    unit = relay / "etc/systemd/system/mtail.service"
    unit.unlink()
    unit.symlink_to("/dev/null")
    result = run_import(relay, platform, yes=True)
    assert result.status == 0
    assert unit.is_symlink()
    assert ["systemctl", "disable", "--now", "mtail.service"] not in result.commands


def test_cli_answers_help_and_from_root_only_shows_the_plan(relay, capsys):
    from chatmaild.admin.cli import main

    with pytest.raises(SystemExit):
        main(["import-cmdeploy", "--help"])
    assert "--dry-run" in capsys.readouterr().out
    before = snapshot(relay)
    assert main(["import-cmdeploy", "--from", str(relay)]) == 0
    out = capsys.readouterr().out
    assert "showing the plan only" in out and "Nothing was changed" in out
    assert snapshot(relay) == before
