"""An admin installs chatmail-relay from our signed repository on a fresh Debian 12 or 13
(the module runs on each: conftest's `suite`), typing README's commands, with preseeded
answers, and the relay works: every service runs, the ports answer, accounts are created
by their first login, and cleartext is refused. On Debian 13 the relay runs Debian's
Dovecot 2.4 with our Lua passdb."""

import json
import re

import pytest

from .container import REPO, REPO_MOUNT

DOMAIN = "_chat.example.org"


def readme_block(name, doc="README.md"):
    """The shell block README (or another document `doc` of the checkout) gives admins
    under the comment `<!-- NAME: ... -->`."""
    readme = (REPO / doc).read_text()
    found = re.search(rf"<!-- {name}[^>]*-->\n```sh\n(.*?)```", readme, re.S)
    assert found, f"{doc} lost its {name} block"
    return found.group(1)


def readme_install_commands():
    """The block README tells admins to type to add the repository and install."""
    return readme_block("install commands")


def readme_repository_commands():
    """The part of README's install block that adds the repository: all but its last
    line, apt's install (other documents point to these commands)."""
    *repository, install = readme_install_commands().rstrip("\n").split("\n")
    assert install.startswith("apt update && apt install chatmail-relay"), install
    return "\n".join(repository) + "\n"


def install_script(domain):
    """README's commands, with preseeded answers and apt's "yes" standing in for the admin
    at the terminal."""
    return f"""
set -e
echo "chatmail-relay chatmail-relay/mail_domain string {domain}" | debconf-set-selections
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
echo 'APT::Get::Assume-Yes "true";' >/etc/apt/apt.conf.d/90test-assume-yes
REPO=file://{REPO_MOUNT}
{readme_install_commands()}
# Not for admins: the load average is the host's, shared by every container and build on
# it, and must not make doveauth refuse the tests' new accounts (max_load_1m, default 5).
chatmail set max_load_1m=100 >/dev/null && chatmail configure >/dev/null
"""


INSTALL = install_script(DOMAIN)

CLIENT = r'''
import imaplib, json, smtplib, ssl, sys
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
domain, password = sys.argv[1:] if len(sys.argv) > 2 else ("{domain}", "correct-horse-battery")
addr = "abcdefghi@" + domain
result = {{}}
imap = imaplib.IMAP4_SSL("127.0.0.1", 993, ssl_context=ctx)
result["login"] = imap.login(addr, password)[0]
result["capabilities"] = imap.capability()[1][0].decode()
imap.logout()
try:
    imaplib.IMAP4_SSL("127.0.0.1", 993, ssl_context=ctx).login(addr, "wrong-password!")
    result["wrong_password"] = "accepted"
except imaplib.IMAP4.error:
    result["wrong_password"] = "refused"
refused = []
# (upper case is not refused: Dovecot lowercases login names before doveauth sees them)
for bad in ("short@" + domain, "waytoolongname@" + domain, "a.b+c/de@" + domain,
            "abcdefghi@other.org"):
    try:
        imaplib.IMAP4_SSL("127.0.0.1", 993, ssl_context=ctx).login(bad, password)
    except imaplib.IMAP4.error:
        refused.append(bad)
result["invalid_names_refused"] = len(refused)
smtp = smtplib.SMTP("127.0.0.1", 587)
smtp.starttls(context=ctx)
smtp.login(addr, password)
try:
    smtp.sendmail(addr, [addr], f"From: {{addr}}\r\nTo: {{addr}}\r\nSubject: hi\r\n\r\nplain\r\n")
    result["cleartext"] = "accepted"
except smtplib.SMTPDataError as e:
    result["cleartext"] = f"{{e.smtp_code}} {{e.smtp_error.decode()}}"
smtp.quit()
plain = smtplib.SMTP("127.0.0.1", 25)
plain.ehlo("client.example")
code, message = plain.mail("someone@example.org")
result["port25_plain"] = f"{{code}} {{message.decode()}}"
print(json.dumps(result))
'''


# What each release's Debian says in /etc/os-release (VERSION_ID), and so the version
# suffix of our packages built for it.
DEBIAN_VERSION = {"bookworm": "12", "trixie": "13"}


def test_installed_from_the_repository_with_debians_dovecot_and_the_plugin(relay):
    debian = DEBIAN_VERSION[relay.suite]
    assert relay.run(". /etc/os-release && echo $VERSION_ID").stdout.strip() == debian
    origins = relay.run("apt-cache policy chatmail-relay dovecot-chatmail-instant-idle").stdout
    assert f"file:{REPO_MOUNT} {relay.suite}/main" in origins, origins
    versions = dict(line.split("\t") for line in relay.run(
        "dpkg-query -W chatmail-relay chatmail-archive-keyring dovecot-core dovecot-imapd "
        "dovecot-lmtpd dovecot-chatmail-instant-idle").stdout.splitlines())
    # Dovecot is Debian's own build; the plugin, built for its ABI, makes IDLE instant
    for package in ("dovecot-core", "dovecot-imapd", "dovecot-lmtpd"):
        assert versions[package] == relay.dovecot_version, versions
    assert versions["dovecot-chatmail-instant-idle"].endswith(f"+deb{debian}"), versions
    status = relay.run("chatmail status", check=False).stdout
    assert "instant IDLE: plugin" in status, status


@pytest.mark.only_on("trixie")
def test_debian_13_runs_dovecot_24_with_our_lua_passdb(relay):
    """Dovecot 2.4 asks doveauth through our auth.lua (not 2.3's dict proxy, auth.conf),
    and the configuration declares the 2.4 syntax."""
    assert relay.dovecot_version.startswith("1:2.4.")
    lua = relay.run("dpkg-query -W -f '${Version}' dovecot-auth-lua").stdout
    assert lua == relay.dovecot_version
    relay.run("test -s /etc/dovecot/chatmail/auth.lua")
    relay.run("test ! -e /etc/dovecot/chatmail/auth.conf")
    lua_file = relay.run("doveconf -c /etc/dovecot/chatmail/dovecot.conf -h "
                         "passdb/lua/lua_file").stdout.strip()
    assert lua_file == "/etc/dovecot/chatmail/auth.lua"
    relay.run("grep -qx 'dovecot_config_version = 2.4.1' /etc/dovecot/chatmail/dovecot.conf")


def test_idle_wakes_at_once_with_debians_dovecot_and_the_plugin(relay):
    """apt installed dovecot-chatmail-instant-idle with the relay (Depends), built for
    this release's Dovecot ABI, and the relay's Dovecot loads it: an IDLE-ing client hears
    of a delivery at once instead of after Debian's Dovecot's 500 ms."""
    from bench.common import idle_wakeups

    abi = relay.run("dpkg-query -W -f '${Provides}' dovecot-core").stdout
    depends = relay.run("dpkg-query -W -f '${Depends}' dovecot-chatmail-instant-idle").stdout
    assert depends.split(",")[0] in abi.split(", "), (depends, abi)
    plugins = relay.run("doveconf -c /etc/dovecot/chatmail/dovecot.conf -f protocol=imap "
                        "-h mail_plugins").stdout
    # Dovecot 2.3 lists plugin names, 2.4 one "name = yes" line each
    assert "chatmail_instant_idle" in plugins.replace(" = yes", "").split(), plugins
    waits = sorted(idle_wakeups(relay, DOMAIN, 9))
    assert waits[4] < 0.05 and waits[-1] < 0.6, waits


def test_the_keyring_package_took_over_the_apt_configuration(relay):
    """README's .sources file is adopted (no second one), the pin and the
    unattended-upgrades drop-in are in place."""
    relay.run("test -f /etc/apt/preferences.d/chatmail-relay.pref")
    relay.run("test -f /etc/apt/apt.conf.d/51chatmail-relay-unattended-upgrades")
    sources = relay.run(f"grep -l 'URIs: file://{REPO_MOUNT}$' /etc/apt/sources.list.d/*").stdout
    assert sources.split() == ["/etc/apt/sources.list.d/chatmail-relay.sources"]
    patterns = relay.run("apt-config dump Unattended-Upgrade::Origins-Pattern").stdout
    assert "origin=chatmail-relay,label=chatmail-relay" in patterns


def test_every_unit_active_and_status_all_good(relay):
    status = relay.run("chatmail status", check=False)
    assert status.returncode == 0, status.stdout + status.stderr
    failed = relay.run("systemctl --failed --no-legend").stdout.strip()
    assert failed == ""
    relay.run("test -e /etc/aliases.db")  # built although Postfix had "No configuration"


def test_dovecot_auth_starts_without_waiting_for_a_stale_penalty_socket(relay):
    """The dovecot-core package started Dovecot with Debian's configuration before ours,
    and that one made the login penalty's socket, which ours turns off. Left in /run, it
    made our Dovecot's auth process retry it for 5 s at every start, before any login."""
    relay.run("test ! -e /run/dovecot/anvil-auth-penalty")
    log = relay.run("journalctl -u dovecot --no-pager").stdout
    assert "anvil-auth-penalty" not in log


def test_ports_answer(relay):
    listening = relay.run("cat /proc/net/tcp /proc/net/tcp6").stdout
    for port in (25, 80, 143, 443, 465, 587, 993):
        assert f":{port:04X} " in listening, f"nothing listens on {port}"


def test_users_login_create_accounts_and_cleartext_is_refused(relay):
    out = relay.python(CLIENT.format(domain=DOMAIN)).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["login"] == "OK"
    assert "XCHATMAIL" in result["capabilities"] and "XDELTAPUSH" in result["capabilities"]
    assert result["wrong_password"] == "refused"
    assert result["invalid_names_refused"] == 4
    assert result["cleartext"] == "523 Encryption Needed: Invalid Unencrypted Mail"
    assert result["port25_plain"].startswith("530 ") and "STARTTLS" in result["port25_plain"]
    assert relay.run(f"test -s /home/vmail/mail/{DOMAIN}/abcdefghi@{DOMAIN}/password").returncode == 0


# Two accounts, each created by its first login; one sends the other an end-to-end
# encrypted message (the form filtermail checks) through submission, Postfix, the filters
# and LMTP into Dovecot, where an IMAP IDLE client is told about it.
EXCHANGE = r'''
import base64, imaplib, json, smtplib, ssl, sys, time
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
domain = sys.argv[1]
alice, bob, password = "alice1234@" + domain, "bobby1234@" + domain, "a-long-password-1234"

reader = imaplib.IMAP4_SSL("127.0.0.1", 993, ssl_context=ctx)
reader.login(bob, password)
reader.select("INBOX")
tag = reader._new_tag().decode()
reader.send(f"{tag} IDLE\r\n".encode())
assert reader.readline().startswith(b"+")

packets = bytes([0xC1, 12]) + bytes(12) + bytes([0xD2, 40, 1]) + bytes(39)
message = (
    f"From: <{alice}>\r\nTo: <{bob}>\r\nSubject: [...]\r\nMIME-Version: 1.0\r\n"
    'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; '
    'boundary="b"\r\n\r\n--b\r\nContent-Type: application/pgp-encrypted\r\n\r\n'
    "Version: 1\r\n\r\n--b\r\nContent-Type: application/octet-stream\r\n\r\n"
    "-----BEGIN PGP MESSAGE-----\r\n\r\n" + base64.b64encode(packets).decode()
    + "\r\n-----END PGP MESSAGE-----\r\n\r\n--b--\r\n")
smtp = smtplib.SMTP("127.0.0.1", 587)
smtp.starttls(context=ctx)
smtp.login(alice, password)
sent = time.monotonic()
smtp.sendmail(alice, [bob], message.encode())
smtp.quit()

reader.sock.settimeout(30)
line = reader.readline()
result = {"idle": line.decode().strip(), "seconds": round(time.monotonic() - sent, 3)}
reader.send(b"DONE\r\n")
while not reader.readline().startswith(tag.encode()):
    pass
typ, data = reader.fetch("1", "(BODY.PEEK[HEADER.FIELDS (FROM CONTENT-TYPE)])")
result["headers"] = data[0][1].decode()
reader.logout()
print(json.dumps(result))
'''


def test_encrypted_mail_reaches_an_idle_client(relay):
    out = relay.run(f"python3 - {DOMAIN}", input=EXCHANGE, timeout=120)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["idle"] == "* 1 EXISTS", result
    assert "multipart/encrypted" in result["headers"]
    assert f"alice1234@{DOMAIN}" in result["headers"]


def test_configure_again_changes_nothing(relay):
    out = relay.run("chatmail configure").stdout
    assert "updated" not in out and "restarting" not in out and "reloading" not in out, out



JOURNALD_FAILS_ONCE = """[Unit]
StartLimitIntervalSec=1min
StartLimitBurst=1
[Service]
ExecStartPre=/bin/sh -c 'if [ -e /run/journald-fails-once ]; then rm /run/journald-fails-once; exit 1; fi'
"""


def test_journald_that_refuses_a_restart_is_started_again(relay):
    """journald's settings are not the relay's to fail on. Here its restart fails once (as
    it did once under load, cause unseen), and a start after it would hit systemd's start
    limit (one a minute): configure still succeeds, journald and its sockets run again,
    and nothing stays pending."""
    dropin = "/etc/systemd/system/systemd-journald.service.d/test-fails-once.conf"
    relay.run(f"mkdir -p {dropin.rsplit('/', 1)[0]} && cat >{dropin}", input=JOURNALD_FAILS_ONCE)
    relay.run("rm /etc/systemd/journald.conf.d/chatmail.conf && touch /run/journald-fails-once")
    try:
        result = relay.run("chatmail configure 2>&1", check=False)
        assert result.returncode == 0, result.stdout
        assert "systemd-journald did not restart; started it again" in result.stdout, \
            result.stdout
        assert relay.run("systemctl is-active systemd-journald").stdout.strip() == "active"
        # and its sockets with it: the system's log reaches the journal again
        relay.run("logger journald-is-back && sleep 1")
        assert "journald-is-back" in relay.run("journalctl -n 20 --no-pager").stdout
        state = json.loads(relay.run("cat /var/lib/chatmail-relay/configure-state.json").stdout)
        assert state["pending_restarts"] == []
    finally:
        relay.run(f"rm -f {dropin} /run/journald-fails-once && systemctl daemon-reload")


REFUSALS = r'''
import json, smtplib, ssl, sys
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
domain = sys.argv[1]
addr, password = "abcdefghi@" + domain, "correct-horse-battery"
other = "zyxwvutsr@" + domain
result = {}

def submission():
    smtp = smtplib.SMTP("127.0.0.1", 587)
    smtp.starttls(context=ctx)
    smtp.login(addr, password)
    return smtp

def reply(call):
    try:
        call()
        return "250"
    except smtplib.SMTPRecipientsRefused as e:
        code, text = list(e.recipients.values())[0]
        return f"{code} {text.decode()}"
    except smtplib.SMTPResponseException as e:
        return f"{e.smtp_code} {e.smtp_error.decode()}"

smtp = submission()
forged = f"From: {other}\r\nTo: {addr}\r\nSubject: x\r\n\r\nx\r\n"
result["forged_from"] = reply(lambda: smtp.sendmail(addr, [addr], forged))
smtp.quit()
smtp = submission()
result["login_mismatch"] = reply(lambda: smtp.sendmail("someone@example.org", [addr], forged))
smtp.quit()

plain = smtplib.SMTP("127.0.0.1", 587)
plain.ehlo("client.example")
result["auth_offered_without_tls"] = plain.has_extn("auth")
plain.quit()

mx = smtplib.SMTP("127.0.0.1", 25)
mx.starttls(context=ctx)
# To an address without a mailbox, so the cleartext rule does not answer first.
nobody = "nobodyhere@" + domain
mail = f"From: sender@example.org\r\nTo: {nobody}\r\nSubject: x\r\n\r\nx\r\n"
result["no_dkim"] = reply(lambda: mx.sendmail("sender@example.org", [nobody], mail))
mx.quit()

smtp = submission()
codes, refusal = [], ""
for _ in range(15):
    # Postfix hands MAIL FROM to the filter when the first recipient is accepted.
    smtp.mail(addr)
    code, text = smtp.rcpt(addr)
    codes.append(code)
    refusal = refusal or (text.decode() if code == 450 else "")
    smtp.rset()
result["rate_codes"], result["rate_refusal"] = codes, refusal
smtp.quit()
print(json.dumps(result))
'''


def test_refuses_what_it_must_with_upstreams_reply_codes(relay):
    out = relay.run(f"python3 - {DOMAIN}", input=REFUSALS)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["forged_from"].startswith("500 Invalid FROM")
    assert result["login_mismatch"].startswith("553 ")
    assert result["auth_offered_without_tls"] is False
    assert result["no_dkim"] == "554 5.7.1 No DKIM signature found"
    # a burst of max_user_send_burst_size (10; earlier tests used some), then refusals
    codes = result["rate_codes"]
    assert codes[:5] == [250] * 5 and codes[-1] == 450
    assert result["rate_refusal"] == f"4.7.1: Too much mail from abcdefghi@{DOMAIN}"


TURN = r'''
import imaplib, re, ssl, subprocess, sys
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
imaplib.Commands["GETMETADATA"] = ("AUTH", "SELECTED")
imap = imaplib.IMAP4_SSL("127.0.0.1", 993, ssl_context=ctx)
imap.login("abcdefghi@" + sys.argv[1], "correct-horse-battery")
typ, data = imap._simple_command("GETMETADATA", '""', "/shared/vendor/deltachat/turn")
_, untagged = imap._untagged_response(typ, data, "METADATA")
answer = b" ".join(part if isinstance(part, bytes) else b" ".join(part)
                   for part in untagged if part)
# the value is "<mail domain>:3478:<expiry>:<password>"
match = re.search(rb'([^\s"(){}]+):(3478):(\d+):([^\s"(){}]+)', answer)
assert match, answer
host, port, user, password = match.groups()

def allocate(password):
    return subprocess.run(["turnutils_uclient", "-u", user.decode(), "-w", password,
                           "-n", "1", "-m", "1", "-c", "-z", "1", "-y", "-e", "127.0.0.1",
                           "127.0.0.1"], capture_output=True, text=True, timeout=30)

good, bad = allocate(password.decode()), allocate("not-the-password")
print(host.decode(), port.decode())
print("GOOD", "Cannot complete Allocation" not in good.stdout + good.stderr)
print("BAD", "Cannot complete Allocation" in bad.stdout + bad.stderr)
'''


def test_turn_credentials_from_imap_metadata_are_accepted_by_coturn(relay):
    relay.run("systemctl is-active coturn")
    out = relay.run(f"python3 - {DOMAIN}", input=TURN).stdout.splitlines()
    assert out[0] == f"{DOMAIN} 3478"
    assert "GOOD True" in out and "BAD True" in out


NEW_DOMAIN = "_new.example.org"


def test_reconfigure_noninteractive_to_a_new_domain(relay):
    relay.run(f'echo "chatmail-relay chatmail-relay/mail_domain string {NEW_DOMAIN}" '
              "| debconf-set-selections && dpkg-reconfigure -f noninteractive chatmail-relay",
              timeout=600)
    assert f"mail_domain = {NEW_DOMAIN}" in relay.run("cat /etc/chatmail/chatmail.ini").stdout
    out = relay.python(CLIENT.format(domain=NEW_DOMAIN)).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["login"] == "OK"
    assert result["cleartext"] == "523 Encryption Needed: Invalid Unencrypted Mail"
    # the old domain's mailboxes stay; the new domain has its own DKIM key
    relay.run(f"test -s /home/vmail/mail/{DOMAIN}/abcdefghi@{DOMAIN}/password")
    relay.run(f"test -s /etc/dkimkeys/{NEW_DOMAIN}.private")
    assert relay.run("chatmail status", check=False).returncode == 0


def test_an_edit_of_chatmail_ini_wins_over_the_stored_answer(relay):
    relay.run("chatmail set max_mailbox_size=1G && dpkg-reconfigure -f noninteractive chatmail-relay")
    ini = relay.run("cat /etc/chatmail/chatmail.ini").stdout
    assert "max_mailbox_size = 1G" in ini and f"mail_domain = {NEW_DOMAIN}" in ini


def test_remove_keeps_data_purge_removes_what_we_generated_reinstall_works(relay):
    relay.run("apt-get remove -y -q chatmail-relay")
    relay.run("test -f /etc/chatmail/chatmail.ini")
    relay.run(f"test -s /home/vmail/mail/{NEW_DOMAIN}/abcdefghi@{NEW_DOMAIN}/password")
    assert relay.run("systemctl is-active doveauth", check=False).stdout.strip() != "active"

    relay.run("apt-get purge -y -q chatmail-relay")
    for gone in ("/etc/chatmail", "/etc/dovecot/chatmail/dovecot.conf",
                 f"/etc/dkimkeys/{NEW_DOMAIN}.private", "/var/lib/chatmail-relay",
                 "/etc/systemd/system/dovecot.service.d/chatmail.conf"):
        assert relay.run(f"test -e {gone}", check=False).returncode != 0, f"{gone} survived purge"
    # Postfix is back to what it was before the relay: no filters, no SASL services
    assert "10080" not in relay.run("postconf -P").stdout
    assert relay.run("postconf -n").stdout.count("mua_") == 0
    # mailboxes are kept unless the admin said otherwise
    relay.run(f"test -s /home/vmail/mail/{NEW_DOMAIN}/abcdefghi@{NEW_DOMAIN}/password")

    result = relay.run(INSTALL, check=False, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    assert relay.run("chatmail status", check=False).returncode == 0


def test_setup_writes_chatmail_ini_and_configures_in_one_command(relay):
    """What Alpine admins do, who get no install-time question: with no chatmail.ini,
    `chatmail setup DOMAIN` writes one and configures the relay."""
    relay.run("mv /etc/chatmail/chatmail.ini /root/chatmail.ini.before-setup")
    out = relay.run(f"chatmail setup {DOMAIN}").stdout
    assert "Wrote /etc/chatmail/chatmail.ini" in out and "chatmail configure: done" in out, out
    assert relay.run("chatmail status", check=False).returncode == 0
