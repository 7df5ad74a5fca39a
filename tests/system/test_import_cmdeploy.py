"""A Debian 12 relay as upstream's cmdeploy leaves it (its chatmail.ini and virtualenv
place, its units in /etc/systemd/system under the names of ours, its Dovecot build and
the pin that holds it, its DKIM key with selector `opendkim`, accounts whose passwords
upstream's doveauth hashed) moves onto our packages.

Before the move the relay serves mail as cmdeploy's did: its Dovecot 2.3.21 build
(stand-ins with its version and ABI, installed with dpkg as cmdeploy installs the .debs
it downloads: repos.cmdeploy_dovecot) and Debian's Postfix with the files cmdeploy
writes in their places (/etc/dovecot/dovecot.conf, main.cf,
master.cf, acmetool's certificate), accounts looked up by a doveauth that runs from
cmdeploy's virtualenv under cmdeploy's unit. That doveauth is this repository's chatmaild
(upstream's is not packaged; both speak the same dict protocol over the same socket); the
other chatmaild services and the filters are stand-ins that only hold their names and
ports, and OpenDKIM does not sign yet: mail before the move stays on the relay. Two Delta
Chat accounts are configured against it and verify each other.

The relay sits on the test network (internet.py) with the DKIM record cmdeploy's admin
published (opendkim-genkey's opendkim.txt, selector `opendkim`) served by nsd before the
move; its apt sees Debian 12's archive and security archive (stand-ins, the latter with
a newer Dovecot than the former, as Debian's are now). Then the admin types docs/admin.md's
install commands for a cmdeploy relay as they are written (the pin goes, the repository
comes, Debian's Dovecot replaces cmdeploy's, the package installs and leaves the running
relay alone); apt refuses the package while cmdeploy's Dovecot is installed. Then
`chatmail import-cmdeploy --yes`. Afterwards Debian's Dovecot (its security update) runs
with the instant-IDLE plugin, the same Delta Chat accounts (not configured again) log in
and chat, the old accounts log in with their old passwords, mail from the relay passes
another relay's DKIM check against the old record, nothing of cmdeploy runs or overrides
our units, `chatmail status` is all good, and a second import has nothing to do."""

import json
import re
import shutil
import threading

import pytest

from ..unit.mailfactory import securejoin_mail
from .conftest import deltachat_clients
from .container import REPO, REPO_MOUNT, deltachat_venv
from .repos import (
    CMDEPLOY_DOVECOT_VERSION,
    DOVECOT_PACKAGES,
    cmdeploy_dovecot,
    debian_security_dovecot,
    stand_in_sources,
)
from .test_backup_restore import talk
from .test_dkim_rotation import PASSWORD, account, delivery
from .test_federation import (  # noqa: F401 (internet: a fixture)
    RELAYS,
    assert_installed,
    bootstrap_records,
    install_acme_relay,
    internet,
    journal,
    network_container,
    publish_dns,
    trust_test_network,
)
from .test_install import readme_block, readme_repository_commands
from .test_upgrade import installed_versions

pytestmark = pytest.mark.skipif(
    not shutil.which("pebble") or not shutil.which("nsd"),
    reason="the imported relay's mail is checked on the federation test network (apt "
           "install nsd pebble)")

DOMAIN = "_chat.example.org"
ADDRESS = "10.231.0.20"  # on the test network, beside RELAYS' a and b
# alice and bob: the passwords deltachat_pair.py logs in with; carol's has the quotes and
# backslash upstream's generated passwords may have.
ACCOUNTS = {f"alice0001@{DOMAIN}": "alice-password-1",
            f"bobby0002@{DOMAIN}": "bob-password-22",
            f"carol0003@{DOMAIN}": "old\"pass'w\\rd"}
CMDEPLOY_DIR = "/usr/local/lib/chatmaild"
VENV_BIN = f"{CMDEPLOY_DIR}/venv/bin"
VENV_SITE = f"{CMDEPLOY_DIR}/venv/lib/python3.11/site-packages"  # Debian 12
# (unit, what it runs): cmdeploy's units, each under its real name; the filters hold
# their ports as upstream's do.
HOLD_PORT = "import socket,time;s=socket.socket();s.bind(('127.0.0.1',{}));s.listen();time.sleep(1e9)"
UNITS = {
    # the one that serves: chatmaild's doveauth from the virtualenv, as cmdeploy runs it
    "doveauth.service": f"env PYTHONPATH={VENV_SITE} python3 -m chatmaild.doveauth \"$@\"",
    "chatmail-metadata.service": "sleep infinity",
    "lastlogin.service": "sleep infinity",
    "filtermail.service": f"python3 -c \"{HOLD_PORT.format(10080)}\"",
    "filtermail-incoming.service": f"python3 -c \"{HOLD_PORT.format(10081)}\"",
    "turnserver.service": "sleep infinity",
    "iroh-relay.service": "sleep infinity",
    "mtail.service": "sleep infinity",
}
# What cmdeploy's service/doveauth.service.f adds: its arguments, user and socket place.
UNIT_EXTRAS = {
    "doveauth.service": (f" /run/doveauth/doveauth.socket {CMDEPLOY_DIR}/chatmail.ini",
                         "User=vmail\nRuntimeDirectory=doveauth\nRuntimeDirectoryMode=0755\n"
                         "UMask=0022\n"),
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
ACME_LIVE = f"/var/lib/acme/live/{DOMAIN}"

# What cmdeploy did, as far as a test without the internet can: apt without Recommends,
# its Dovecot, installed as its dovecot deployer installs the .debs it downloaded into
# /root (stand-ins here), with the pin that keeps apt from replacing them, acmetool's
# certificate (self-signed here), then its files.
CMDEPLOY_LAYOUT = r"""
set -e
echo 'APT::Install-Recommends "false";' >/etc/apt/apt.conf.d/00InstallRecommends
apt-get update -qq
cd /root
dpkg --force-confdef --force-confold -i {dovecot_debs} >/dev/null 2>&1 || true
apt-get -y --fix-broken install >/dev/null
dpkg --force-confdef --force-confold -i {dovecot_debs} >/dev/null
printf 'Package: dovecot-*\nPin: version *\nPin-Priority: -1\n' >/etc/apt/preferences.d/pin-dovecot
groupadd --system vmail
useradd --system --gid vmail --home-dir /home/vmail --create-home vmail
install -d -o vmail -g vmail -m 700 /home/vmail/mail/{domain}
install -d {venv_bin} {venv_site}
install -d -o opendkim -g opendkim -m 700 /etc/dkimkeys
su -s /bin/sh opendkim -c '/usr/sbin/opendkim-genkey -D /etc/dkimkeys -d {domain} -s opendkim'
install -d -m 700 {acme_live}
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -noenc -days 2 \
    -keyout {acme_live}/privkey -out {acme_live}/fullchain -subj /CN={domain} 2>/dev/null
"""

# cmdeploy's /etc/dovecot/dovecot.conf, cut to what serves IMAP, LMTP and Postfix's SASL:
# accounts from doveauth (dict protocol; its socket is vmail's, so the auth worker runs as
# vmail), mail in <mailboxes_dir>/<addr>/ as Maildir.
DOVECOT_CONF = """\
protocols = imap lmtp
listen = *
ssl = required
ssl_cert = <{acme_live}/fullchain
ssl_key = <{acme_live}/privkey
ssl_dh = </usr/share/dovecot/dh.pem
auth_mechanisms = plain
first_valid_uid = 100
mail_uid = vmail
mail_gid = vmail
mail_location = maildir:/home/vmail/mail/{domain}/%u
passdb {{
  driver = dict
  args = /etc/dovecot/auth.conf
}}
userdb {{
  driver = dict
  args = /etc/dovecot/auth.conf
}}
service auth {{
  unix_listener /var/spool/postfix/private/auth {{
    mode = 0660
    user = postfix
    group = postfix
  }}
}}
service auth-worker {{
  user = vmail
}}
service lmtp {{
  unix_listener /var/spool/postfix/private/dovecot-lmtp {{
    mode = 0600
    user = postfix
    group = postfix
  }}
}}
"""
DOVECOT_AUTH = """\
uri = proxy:/run/doveauth/doveauth.socket:auth
iterate_disable = no
iterate_prefix = userdb/
default_pass_scheme = plain
password_key = passdb/%Ew"%Eu
user_key = userdb/%Eu
"""
# cmdeploy's main.cf and master.cf, cut the same way: the domain's mail to Dovecot's LMTP,
# submission on 587 and 465 with Dovecot's SASL. (cmdeploy's pass through its filters,
# whose stand-ins here hold the ports only.)
POSTFIX = r"""
set -e
cat >/etc/postfix/main.cf <<EOF
myhostname = {domain}
mydestination =
virtual_mailbox_domains = {domain}
virtual_transport = lmtp:unix:private/dovecot-lmtp
smtpd_tls_cert_file = {acme_live}/fullchain
smtpd_tls_key_file = {acme_live}/privkey
smtpd_tls_security_level = may
smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination
compatibility_level = 3.6
inet_protocols = ipv4
EOF
cp /usr/share/postfix/master.cf.dist /etc/postfix/master.cf
postconf -M 'submission/inet=submission inet n - y - - smtpd'
postconf -M 'smtps/inet=smtps inet n - y - - smtpd'
for service in submission smtps; do
    postconf -P "$service/inet/smtpd_sasl_auth_enable=yes" \
        "$service/inet/smtpd_sasl_type=dovecot" "$service/inet/smtpd_sasl_path=private/auth" \
        "$service/inet/smtpd_tls_auth_only=yes" "$service/inet/smtpd_tls_security_level=encrypt"
done
postconf -P smtps/inet/smtpd_tls_wrappermode=yes
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
        arguments, settings = UNIT_EXTRAS.get(name, ("", ""))
        box.run(f"cat >{program} && chmod 755 {program}",
                input=f"#!/bin/sh\nexec {command}\n")
        box.run(f"cat >/etc/systemd/system/{name}", input=(
            f"[Unit]\nDescription=cmdeploy's {name}\n\n[Service]\n"
            f"ExecStart={program}{arguments}\n{settings}"
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


def lay_out_cmdeploy_relay(box):
    """What `cmdeploy run` leaves: its files, accounts, units, and Dovecot and Postfix
    serving the domain with cmdeploy's configuration."""
    debs = cmdeploy_dovecot(box.root / "root")
    names = {"domain": DOMAIN, "venv_bin": VENV_BIN, "venv_site": VENV_SITE,
             "acme_live": ACME_LIVE, "dovecot_debs": " ".join(deb.name for deb in debs)}
    box.run(CMDEPLOY_LAYOUT.format(**names), timeout=600)
    box.run(f"cat >{CMDEPLOY_DIR}/chatmail.ini", input=CMDEPLOY_INI)
    # cmdeploy pip-installs chatmaild into its virtualenv
    shutil.copytree(REPO / "chatmaild", box.root / VENV_SITE.lstrip("/") / "chatmaild",
                    ignore=shutil.ignore_patterns("__pycache__"))
    box.run("cat >/root/account.py", input=PASSWORD_FILE)
    for address_and_password in ACCOUNTS.items():
        box.run("python3 /root/account.py", input=json.dumps(address_and_password))
    box.run("cat >/etc/dovecot/dovecot.conf", input=DOVECOT_CONF.format(**names))
    box.run("cat >/etc/dovecot/auth.conf", input=DOVECOT_AUTH)
    box.run(POSTFIX.format(**names))
    cmdeploy_units(box)
    box.run("systemctl restart dovecot postfix")


# Debian 12's security archive, as a relay's apt sees it beside Debian's archive (both
# stand-ins here; containers reach no archive).
SECURITY_DIR = "/srv/debian-security-stand-in"
# apt's "yes" standing in for the admin at the terminal, and the repository's address.
ADMIN = f"""
set -e
echo 'APT::Get::Assume-Yes "true";' >/etc/apt/apt.conf.d/90test-assume-yes
REPO=file://{REPO_MOUNT}
"""


def migration_commands():
    """docs/admin.md's commands that install the package on a relay cmdeploy set up, as
    written, README's repository commands in place of the comment that points to them;
    in two parts, before the line that goes back to Debian's Dovecot and from it on."""
    block = readme_block("cmdeploy install commands", "docs/admin.md")
    pointer = next(line for line in block.splitlines()
                   if line.startswith("# add the repository"))
    block = block.replace(pointer + "\n", readme_repository_commands())
    before, downgrade, rest = block.partition("apt install --allow-downgrades")
    assert downgrade, block
    return before, downgrade + rest


def debian_security_stand_in(box):
    """Debian 12's security archive with a Dovecot newer than the stand-in for Debian's
    archive has (as now: bookworm's and bookworm-security's differ), in the box's apt
    sources; the version it offers."""
    _, version = debian_security_dovecot(box.root / SECURITY_DIR.lstrip("/"),
                                         box.dovecot_version)
    box.run(stand_in_sources("debian-security-stand-in", f"{SECURITY_DIR}/security",
                             "bookworm-security"))
    return version


def install_as_admin_md_says(box):
    """docs/admin.md's install commands, typed by the admin; between the repository and
    the Dovecot downgrade, whether apt would install the package without the downgrade
    (box.refused). The install's result (box.install_output)."""
    before, rest = migration_commands()
    box.run(ADMIN + before, timeout=300)
    box.refused = box.run("apt-get install --simulate chatmail-relay", check=False)
    installed = box.run(ADMIN + rest, check=False, timeout=900)
    assert installed.returncode == 0, installed.stdout[-4000:] + installed.stderr[-4000:]
    box.install_output = installed.stdout + installed.stderr


@pytest.fixture(scope="module")
def suite():
    """cmdeploy deploys onto Debian 12 only."""
    return "bookworm"


@pytest.fixture(scope="module")
def relay_b(internet):
    """Another relay (our normal install: RELAYS' b, ACME) on the test network, booted and
    installed in a thread while the cmdeploy relay is laid out and moved. relay_b()
    waits for it and publishes its records."""
    domain, address, suite = RELAYS["b"]
    box = network_container(internet, "relay-b", domain, address, suite, deltachat_venv())
    internet.set_zone(domain, bootstrap_records(domain, address))
    results = {}

    def start():
        try:
            box.boot()
            trust_test_network(box, internet)
            results["install"] = install_acme_relay(box, internet)
        except BaseException as exc:  # raised again in the test's thread by ready()
            results["error"] = exc

    thread = threading.Thread(target=start, daemon=True)
    thread.start()

    def ready():
        thread.join()
        if "error" in results:
            raise results["error"]
        assert_installed("b", results.get("install"))
        if not hasattr(box, "zone"):
            box.zone = publish_dns({"b": box}, internet)["b"]
        return box

    try:
        yield ready
    finally:
        thread.join(900)
        box.stop()


@pytest.fixture(scope="module")
def relay(suite, internet, relay_b):
    venv = deltachat_venv()
    box = network_container(internet, "cmdeploy", DOMAIN, ADDRESS, suite, venv)
    try:
        box.boot()
        trust_test_network(box, internet)
        lay_out_cmdeploy_relay(box)
        box.old_key = (box.root / "etc/dkimkeys/opendkim.private").read_text()
        box.old_record = (box.root / "etc/dkimkeys/opendkim.txt").read_text()
        # what cmdeploy's admin published: opendkim-genkey's record, as it wrote it
        internet.set_zone(DOMAIN, f"{DOMAIN}. 60 IN A {ADDRESS}\n{box.old_record}")
        box.security_dovecot = debian_security_stand_in(box)
        box.clients = deltachat_clients(box, venv)
        # alice and bob log in with their old passwords, verify each other and write
        talk(box, "setup")
        box.dovecot_before = installed_versions(box, *DOVECOT_PACKAGES)
        box.abi_before = box.run("dpkg-query -W -f '${Provides}' dovecot-core").stdout
        install_as_admin_md_says(box)
        yield box
    finally:
        box.stop()


def test_delta_chat_accounts_were_configured_against_cmdeploys_relay(relay):
    # they logged in through cmdeploy's doveauth, which still runs from its virtualenv
    assert "chatmaild.doveauth" in relay.run("ps -eo args").stdout
    log = relay.run("journalctl -u dovecot --no-pager -o cat").stdout
    for addr in list(ACCOUNTS)[:2]:
        assert re.search(rf"imap-login: Login: user=<{re.escape(addr)}>", log), log[-3000:]


def test_cmdeploys_dovecot_served_the_relay_before_the_move(relay):
    assert relay.dovecot_before == dict.fromkeys(DOVECOT_PACKAGES, CMDEPLOY_DOVECOT_VERSION)
    assert "dovecot-abi-2.3.abiv21" in relay.abi_before, relay.abi_before


def test_apt_refuses_the_package_while_cmdeploys_dovecot_is_installed(relay):
    """Without admin.md's downgrade line: the plugin needs Debian 12's Dovecot ABI, and apt
    never downgrades by itself."""
    out = relay.refused.stdout + relay.refused.stderr
    assert relay.refused.returncode != 0, out
    assert "unmet dependencies" in out, out
    assert re.search(r"dovecot-chatmail-instant-idle : Depends: dovecot-abi-2\.3\.abiv19",
                     out), out


def test_debians_dovecot_replaced_cmdeploys(relay):
    """Debian's newest Dovecot (the security archive's), from Debian's archives, and
    apt's candidate from now on: security updates install."""
    versions = installed_versions(relay, *DOVECOT_PACKAGES)
    assert versions == dict.fromkeys(DOVECOT_PACKAGES, relay.security_dovecot), versions
    policy = relay.run("apt-cache policy dovecot-core").stdout
    assert f"Candidate: {relay.security_dovecot}" in policy, policy
    assert f"file:{SECURITY_DIR}/security bookworm-security/main" in policy, policy


def test_the_package_installs_beside_the_running_relay_and_leaves_it_alone(relay):
    assert "Run 'chatmail import-cmdeploy'" in relay.install_output
    # admin.md's --install-recommends, against cmdeploy's 00InstallRecommends: the
    # Recommends our repository brings (the others are in the test's root file system)
    keyring = relay.run("dpkg-query -W -f '${Status}' chatmail-archive-keyring",
                        check=False).stdout
    assert keyring == "install ok installed", keyring
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
    # Debian's Dovecot with the plugin built for it, in its configuration; IMAP (which
    # loads it) served the tests before this one
    assert "instant IDLE: plugin" in status.stdout, status.stdout
    assert relay.run("systemctl --failed --no-legend").stdout.strip() == ""
    again = relay.run("chatmail import-cmdeploy --yes")
    assert "nothing to import" in again.stdout


def test_the_same_delta_chat_accounts_chat_after_the_move(relay):
    """The accounts configured against cmdeploy's relay, as they are (not configured
    again, verified with each other since before the move), log in to the moved relay
    and write end-to-end encrypted."""
    talk(relay, "after-move")


# Submits argv[3] (a message) from account argv[1] (password argv[2]) to argv[4] at the
# relay's submission port, as a client of the relay does.
SUBMIT = r"""
import smtplib, ssl, sys
ctx = ssl.create_default_context()
ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
sender, password, recipient = sys.argv[1:4]
with smtplib.SMTP("127.0.0.1", 587) as smtp:
    smtp.starttls(context=ctx)
    smtp.login(sender, password)
    smtp.sendmail(sender, [recipient], sys.stdin.read().encode())
"""


# The messages in an account's INBOX, as they are stored.
READ_INBOX = r"""
import imaplib, ssl, sys
ctx = ssl.create_default_context()
ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
imap = imaplib.IMAP4_SSL("127.0.0.1", 993, ssl_context=ctx)
imap.login(sys.argv[1], sys.argv[2])
imap.select("INBOX", readonly=True)
for number in imap.search(None, "ALL")[1][0].split():
    print(imap.fetch(number, "(RFC822)")[1][0][1].decode(errors="replace"))
"""


def test_mail_from_the_moved_relay_verifies_at_another_relay_against_the_old_record(
        relay, relay_b, internet):
    b = relay_b()
    # DNS still serves only what cmdeploy's admin published
    public = "".join(relay.old_record.split('"')[1::2]).split("p=")[1]
    served = internet.query(f"opendkim._domainkey.{DOMAIN}.", "TXT")
    assert public in "".join(served.split('"')[1::2]), served
    recipient = account(b, "fromold01")
    alice, password = next(iter(ACCOUNTS.items()))
    relay.run("cat >/root/submit.py", input=SUBMIT)
    quoted = password.replace("'", "'\\''")
    relay.run(f"python3 /root/submit.py {alice} '{quoted}' {recipient}",
              input=securejoin_mail(alice, recipient).decode())

    _, reply = delivery(relay, recipient, timeout=90)
    assert reply.startswith("250"), reply
    # signed with the old key, under the old selector
    assert f"DKIM-Signature field added (s=opendkim, d={DOMAIN})" in journal(
        relay, "DKIM-Signature field added")
    # relay b's incoming filter verified it with the record published before the move
    assert (f"DKIM signature of d={DOMAIN} verified with key opendkim._domainkey.{DOMAIN}."
            in journal(b, "DKIM signature of d=")), journal(b, "DKIM|Incoming")
    # and it is in the recipient's mailbox, From alice (read over IMAP: relay b stores
    # mail compressed)
    inbox = b.run(f"python3 - {recipient} {PASSWORD}", input=READ_INBOX).stdout
    assert "Secure-Join: vc-request" in inbox and f"From: <{alice}>" in inbox, inbox
