"""A Debian 12 relay as upstream's cmdeploy leaves it (its chatmail.ini and virtualenv
place, its units in /etc/systemd/system under the names of ours, holding the filters'
ports, its Dovecot pin, its DKIM key with selector `opendkim`, accounts whose passwords
upstream's doveauth hashed) moves onto our packages: the admin follows README's
migration (the pin goes first, or apt cannot install the relay), installs the package
(it leaves the running relay alone) and runs `chatmail import-cmdeploy --yes`. Then the
old accounts log in with their old passwords and exchange mail, the DKIM key and
selector are the old ones, nothing of cmdeploy runs or overrides our units, `chatmail
status` is all good, and a second import has nothing to do."""

import json
import os
import tempfile

import pytest

from ..unit.mailfactory import securejoin_mail
from .conftest import deltachat_clients
from .container import REPO_MOUNT, Container, deltachat_venv
from .test_install import readme_install_commands

DOMAIN = "_chat.example.org"
# alice and bob: the passwords deltachat_pair.py logs in with; carol's has the quotes and
# backslash upstream's generated passwords may have.
ACCOUNTS = {f"alice0001@{DOMAIN}": "alice-password-1",
            f"bobby0002@{DOMAIN}": "bob-password-22",
            f"carol0003@{DOMAIN}": "old\"pass'w\\rd"}
VENV_BIN = "/usr/local/lib/chatmaild/venv/bin"
# (unit, what it runs): cmdeploy's units, each under its real name; the filters hold
# their ports as upstream's do.
HOLD_PORT = "import socket,time;s=socket.socket();s.bind(('127.0.0.1',{}));s.listen();time.sleep(1e9)"
UNITS = {
    "doveauth.service": "sleep infinity",
    "chatmail-metadata.service": "sleep infinity",
    "lastlogin.service": "sleep infinity",
    "filtermail.service": f"python3 -c \"{HOLD_PORT.format(10080)}\"",
    "filtermail-incoming.service": f"python3 -c \"{HOLD_PORT.format(10081)}\"",
    "turnserver.service": "sleep infinity",
    "iroh-relay.service": "sleep infinity",
    "mtail.service": "sleep infinity",
}
TIMERS = ("chatmail-expire", "chatmail-fsreport")
CMDEPLOY_INI = f"""\
[params]
mail_domain = {DOMAIN}
max_user_send_per_minute = 80
# the tests share the host's load average (see test_install)
max_load_1m = 100
passthrough_recipients = echo@{DOMAIN}
privacy_postal =
privacy_mail =
privacy_pdo =
privacy_supervisor =
"""

# What cmdeploy did, as far as a test without the internet can: Debian's Dovecot
# (cmdeploy downloads a patched build), then its files.
CMDEPLOY_LAYOUT = r"""
set -e
apt-get update -qq
apt-get install -y -qq dovecot-core dovecot-imapd dovecot-lmtpd >/dev/null
printf 'Package: dovecot-*\nPin: version *\nPin-Priority: -1\n' >/etc/apt/preferences.d/pin-dovecot
groupadd --system vmail
useradd --system --gid vmail --home-dir /home/vmail --create-home vmail
install -d -o vmail -g vmail -m 700 /home/vmail/mail/{domain}
install -d /usr/local/lib/chatmaild/venv/bin
install -d -o opendkim -g opendkim -m 700 /etc/dkimkeys
su -s /bin/sh opendkim -c '/usr/sbin/opendkim-genkey -D /etc/dkimkeys -d {domain} -s opendkim'
"""

PASSWORD_FILE = r"""
import crypt, json, os, pwd, sys
addr, password = json.load(sys.stdin)
vmail = pwd.getpwnam("vmail")
home = f"/home/vmail/mail/{addr.split('@')[1]}/{addr}"
os.makedirs(home, mode=0o700)
# upstream's doveauth: crypt_r.crypt(password, METHOD_SHA512), behind {SHA512-CRYPT}
with open(f"{home}/password", "w") as f:
    f.write("{SHA512-CRYPT}" + crypt.crypt(password, crypt.METHOD_SHA512))
open(f"{home}/enforceE2EEincoming", "w").close()
with open(f"{home}/metadata.json", "w") as f:
    f.write('{"devicetoken": {"push-token-1": 1790000000}}')
for path in (home, f"{home}/password", f"{home}/enforceE2EEincoming", f"{home}/metadata.json"):
    os.chown(path, vmail.pw_uid, vmail.pw_gid)
"""

# An IMAP login and a message from each account to the other over submission, then each
# reads its inbox.
EXCHANGE = r"""
import imaplib, json, smtplib, ssl, sys, time
ctx = ssl.create_default_context()
ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
accounts = json.loads(sys.argv[1])
messages = json.loads(sys.stdin.read())
result = {}
for addr, password in accounts.items():
    imap = imaplib.IMAP4_SSL("127.0.0.1", 993, ssl_context=ctx)
    result[addr] = {"imap": imap.login(addr, password)[0]}
    imap.logout()
    try:
        imaplib.IMAP4_SSL("127.0.0.1", 993, ssl_context=ctx).login(addr, password + "x")
        result[addr]["wrong"] = "accepted"
    except imaplib.IMAP4.error:
        result[addr]["wrong"] = "refused"
(a, pa), (b, pb) = list(accounts.items())[:2]
for sender, password, recipient in ((a, pa, b), (b, pb, a)):
    smtp = smtplib.SMTP("127.0.0.1", 587)
    smtp.starttls(context=ctx)
    smtp.login(sender, password)
    smtp.sendmail(sender, [recipient], messages[sender].encode())
    smtp.quit()
for addr, password in ((a, pa), (b, pb)):
    for _ in range(60):
        imap = imaplib.IMAP4_SSL("127.0.0.1", 993, ssl_context=ctx)
        imap.login(addr, password)
        imap.select("INBOX")
        found = imap.search(None, "ALL")[1][0].split()
        if found:
            body = imap.fetch(found[-1], "(RFC822)")[1][0][1].decode()
            result[addr]["from"] = [line for line in body.splitlines()
                                    if line.startswith("From:")][0]
            imap.logout()
            break
        imap.logout()
        time.sleep(1)
print(json.dumps(result))
"""


def cmdeploy_units(box):
    for name, command in UNITS.items():
        program = f"{VENV_BIN}/{name.removesuffix('.service')}"
        box.run(f"cat >{program} && chmod 755 {program}",
                input=f"#!/bin/sh\nexec {command}\n")
        box.run(f"cat >/etc/systemd/system/{name}", input=(
            f"[Unit]\nDescription=cmdeploy's {name}\n\n[Service]\nExecStart={program}\n"
            "Restart=always\n\n[Install]\nWantedBy=multi-user.target\n"))
    for name in TIMERS:
        box.run(f"cat >/etc/systemd/system/{name}.service", input=(
            f"[Unit]\nDescription=cmdeploy's {name}\n\n[Service]\nType=oneshot\n"
            f"ExecStart=/bin/true\n"))
        box.run(f"cat >/etc/systemd/system/{name}.timer", input=(
            "[Timer]\nOnCalendar=*-*-* 00:02:00\n\n[Install]\nWantedBy=timers.target\n"))
    box.run("mkdir -p /etc/systemd/system/dovecot.service.d && printf "
            "'[Service]\\nRestart=always\\nRestartSec=30\\n' "
            ">/etc/systemd/system/dovecot.service.d/10_restart.conf")
    units = " ".join([*UNITS, *(f"{name}.timer" for name in TIMERS)])
    box.run(f"systemctl daemon-reload && systemctl enable --now {units}")


# README: on a relay deployed with cmdeploy, the pin goes before apt can install the relay.
INSTALL = f"""
set -e
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
echo 'APT::Get::Assume-Yes "true";' >/etc/apt/apt.conf.d/90test-assume-yes
rm -f /etc/apt/preferences.d/pin-dovecot
REPO=file://{REPO_MOUNT}
{readme_install_commands()}
"""


@pytest.fixture(scope="module")
def suite():
    """cmdeploy deploys onto Debian 12 only."""
    return "bookworm"


@pytest.fixture(scope="module")
def relay(rootfs):
    venv = deltachat_venv()
    box = Container(f"import-{os.getpid()}", rootfs,
                    tempfile.mkdtemp(prefix="chatmail-system-", dir="/var/tmp"),
                    binds=[(venv, venv)])
    try:
        box.boot()
        box.run(CMDEPLOY_LAYOUT.format(domain=DOMAIN), timeout=600)
        box.run("cat >/usr/local/lib/chatmaild/chatmail.ini", input=CMDEPLOY_INI)
        box.run("cat >/root/account.py", input=PASSWORD_FILE)
        for account in ACCOUNTS.items():
            box.run("python3 /root/account.py", input=json.dumps(account))
        cmdeploy_units(box)
        box.old_key = (box.root / "etc/dkimkeys/opendkim.private").read_text()
        box.old_record = (box.root / "etc/dkimkeys/opendkim.txt").read_text()
        installed = box.run(INSTALL, check=False, timeout=900)
        assert installed.returncode == 0, installed.stdout[-4000:] + installed.stderr[-4000:]
        box.install_output = installed.stdout + installed.stderr
        box.clients = deltachat_clients(box, venv)
        yield box
    finally:
        box.stop()


def test_the_package_installs_beside_the_running_relay_and_leaves_it_alone(relay):
    assert "Run 'chatmail import-cmdeploy'" in relay.install_output
    # its domain is the install's answer
    ini = relay.run("chatmail get mail_domain").stdout.strip()
    assert ini == DOMAIN
    for name in UNITS:
        relay.run(f"systemctl is-active --quiet {name}")
    shown = relay.run("systemctl show -p FragmentPath doveauth.service").stdout
    assert "/etc/systemd/system/doveauth.service" in shown


def test_dry_run_shows_the_plan_and_changes_nothing(relay):
    out = relay.run("chatmail import-cmdeploy --dry-run").stdout
    assert "stop, disable and remove /etc/systemd/system/doveauth.service" in out
    assert "Nothing was changed (--dry-run)." in out
    relay.run("test -f /usr/local/lib/chatmaild/chatmail.ini")
    relay.run("systemctl is-active --quiet filtermail.service")


def test_import(relay):
    result = relay.run("chatmail import-cmdeploy --yes", check=False, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    out = result.stdout
    assert "Left untouched:" in out and "/usr/local/lib/chatmaild/venv" in out
    relay.run("test -s /var/lib/chatmail-relay/cmdeploy-import/report.txt")
    relay.import_output = out


def test_nothing_of_cmdeploy_runs_or_overrides_ours(relay):
    units = [*UNITS, *(f"{n}.{kind}" for n in TIMERS for kind in ("service", "timer"))]
    for name in units:
        assert not (relay.root / "etc/systemd/system" / name).exists(), name
    relay.run("test ! -e /etc/systemd/system/dovecot.service.d/10_restart.conf")
    relay.run("test ! -e /etc/apt/preferences.d/pin-dovecot")
    for name in ("doveauth.service", "filtermail.service", "chatmail-expire.timer"):
        shown = relay.run(f"systemctl show -p FragmentPath -p UnitFileState {name}").stdout
        assert "FragmentPath=/etc/" not in shown and "/lib/systemd/system/" in shown, shown
        assert "UnitFileState=enabled" in shown, shown
    for name in ("turnserver.service", "iroh-relay.service", "mtail.service"):
        state = relay.run(f"systemctl is-active {name}", check=False).stdout.strip()
        assert state in ("inactive", "unknown"), (name, state)
    processes = relay.run("ps -eo args").stdout
    assert "/usr/local/lib/chatmaild" not in processes, processes
    # the filters' ports are ours now
    for name in ("filtermail.socket", "filtermail-incoming.socket"):
        relay.run(f"systemctl is-active --quiet {name}")


def test_the_ini_keeps_the_admins_settings(relay):
    ini = (relay.root / "etc/chatmail/chatmail.ini").read_text()
    assert "max_user_send_per_minute = 80" in ini
    assert "# not a setting of this relay (chatmail import-cmdeploy): " \
        f"passthrough_recipients = echo@{DOMAIN}" in ini
    relay.run("test ! -e /usr/local/lib/chatmaild/chatmail.ini")


def test_dkim_selector_and_key_stay(relay):
    key = (relay.root / f"etc/dkimkeys/{DOMAIN}.private").read_text()
    assert key == relay.old_key
    status = relay.run("chatmail dkim status").stdout
    assert f"signing with selector opendkim (/etc/dkimkeys/{DOMAIN}.private)" in status, \
        status
    public = "".join(part for part in relay.old_record.split('"')[1::2]).split("p=")[1]
    dns = relay.run("chatmail dns").stdout
    zone_line = next(line for line in dns.splitlines() if "opendkim._domainkey" in line)
    assert public in "".join(dns.split("opendkim._domainkey", 1)[1].split('"')[1::2]), \
        zone_line


def test_old_accounts_log_in_with_old_passwords_and_exchange_mail(relay):
    (alice, _), (bob, _), (carol, _) = ACCOUNTS.items()
    messages = {alice: securejoin_mail(alice, bob).decode(),
                bob: securejoin_mail(bob, alice).decode()}
    relay.run("cat >/root/exchange.py", input=EXCHANGE)
    accounts = json.dumps(ACCOUNTS).replace("'", "'\\''")
    out = relay.run(f"python3 /root/exchange.py '{accounts}'", input=json.dumps(messages),
                    timeout=180)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {
        alice: {"imap": "OK", "wrong": "refused", "from": f"From: <{bob}>"},
        bob: {"imap": "OK", "wrong": "refused", "from": f"From: <{alice}>"},
        carol: {"imap": "OK", "wrong": "refused"},
    }, result
    # push tokens are where the relay's metadata service reads them
    tokens = json.loads((relay.root / f"home/vmail/mail/{DOMAIN}/{alice}/metadata.json")
                        .read_text())
    assert "push-token-1" in tokens["devicetoken"]


def test_status_all_good_and_a_second_import_has_nothing_to_do(relay):
    status = relay.run("chatmail status", check=False)
    assert status.returncode == 0, status.stdout + status.stderr
    assert relay.run("systemctl --failed --no-legend").stdout.strip() == ""
    again = relay.run("chatmail import-cmdeploy --yes")
    assert "nothing to import" in again.stdout


# The old accounts in Delta Chat: logged in with their old passwords (dclogin), verified
# with each other, they write end-to-end encrypted through the imported relay.
DELTACHAT = r'''
import json
with open_rpc(VENV, WORKDIR) as rpc:
    alice, bob = verified_pair(rpc, DOMAIN)
    alice.create_chat(bob).send_text("hello bob")
    msg = bob.wait_for_incoming_msg().get_snapshot()
    result = {"to_bob": [msg.text, msg.show_padlock]}
    bob.create_chat(alice).send_text("hello alice")
    msg = alice.wait_for_incoming_msg().get_snapshot()
    result["to_alice"] = [msg.text, msg.show_padlock]
print(json.dumps(result))
'''


def test_old_accounts_chat_in_delta_chat(relay):
    out = relay.clients(DELTACHAT, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"to_bob": ["hello bob", True], "to_alice": ["hello alice", True]}
