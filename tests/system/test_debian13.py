"""The relay on Debian 13: a fresh Debian 13 installs our packages built there (make
debs-trixie) from our repository with README's commands, with Debian 13's own Dovecot
2.4, so our Dovecot 2.4 configuration (auth.lua asking doveauth) runs in a real system.

Debian's dovecot packages come from a stand-in for Debian's archive (its origin, label and
suite), since the containers are offline. Most checks are test_install's, run again here
against this module's relay."""

import contextlib
import json
import os
import tempfile

import pytest

from . import test_deltachat, test_install
from .conftest import deltachat_clients
from .container import REPO, REPO_MOUNT, Container, build_rootfs, deltachat_venv
from .test_install import DOMAIN, INSTALL

SUITE = "trixie"
@contextlib.contextmanager
def debian13_container(binds=()):
    """A booted fresh Debian 13 with our repository (its suite trixie) at REPO_MOUNT and a
    stand-in for Debian's archive with Debian's Dovecot (its `dovecot_version` attribute),
    configured in apt; nothing installed yet."""
    if not (REPO / "dist" / "repo" / "dists" / SUITE).is_dir():
        raise RuntimeError("no Debian 13 suite in dist/repo: run `make build`")
    workdir = tempfile.mkdtemp(prefix="chatmail-debian13-", dir="/var/tmp")
    box = Container(f"trixie-{os.getpid()}", build_rootfs(SUITE), workdir,
                    binds=list(binds), suite=SUITE)
    try:
        box.boot()
        yield box
    finally:
        box.stop()


@pytest.fixture(scope="module")
def relay():
    venv = deltachat_venv()
    with debian13_container(binds=[(venv, venv)]) as box:
        result = box.run(INSTALL, check=False, timeout=900)
        journal = box.run("journalctl -b --no-pager -n 60 -u dovecot -u doveauth",
                          check=False).stdout
        assert result.returncode == 0, (result.stdout[-5000:] + result.stderr[-3000:]
                                        + journal)
        box.clients = deltachat_clients(box, venv)
        yield box


def test_debian_13_with_its_dovecot_24_and_our_lua_passdb(relay):
    assert relay.run(". /etc/os-release && echo $VERSION_ID").stdout.strip() == "13"
    installed = relay.run("dpkg-query -W -f '${Version}' dovecot-core dovecot-auth-lua").stdout
    assert installed == relay.dovecot_version * 2
    assert relay.dovecot_version.startswith("1:2.4.")
    origins = relay.run("apt-cache policy chatmail-relay").stdout
    assert f"file:{REPO_MOUNT} {SUITE}/main" in origins, origins
    relay.run("test -s /etc/dovecot/chatmail/auth.lua")
    relay.run("test ! -e /etc/dovecot/chatmail/auth.conf")
    lua_file = relay.run("doveconf -c /etc/dovecot/chatmail/dovecot.conf -h "
                         "passdb/lua/lua_file").stdout.strip()
    assert lua_file == "/etc/dovecot/chatmail/auth.lua"
    relay.run("grep -qx 'dovecot_config_version = 2.4.1' /etc/dovecot/chatmail/dovecot.conf")
    status = relay.run("chatmail status", check=False).stdout
    # Debian's own build, with the instant-IDLE plugin chatmail-relay depends on
    assert "instant IDLE: plugin" in status, status


def test_idle_wakes_at_once_with_debians_dovecot_and_the_plugin(relay):
    """apt installed dovecot-chatmail-instant-idle with the relay (Depends), built for
    Debian 13's Dovecot ABI, and the relay's Dovecot loads it: an IDLE-ing client hears
    of a delivery at once instead of after Debian's Dovecot's 500 ms."""
    from bench.common import idle_wakeups

    abi = relay.run("dpkg-query -W -f '${Provides}' dovecot-core").stdout
    depends = relay.run("dpkg-query -W -f '${Depends}' dovecot-chatmail-instant-idle").stdout
    assert depends.split(",")[0] in abi.split(", "), (depends, abi)
    plugins = relay.run("doveconf -c /etc/dovecot/chatmail/dovecot.conf -f protocol=imap "
                        "-h mail_plugins").stdout
    assert "chatmail_instant_idle = yes" in plugins.splitlines(), plugins
    waits = sorted(idle_wakeups(relay, DOMAIN, 9))
    assert waits[4] < 0.05 and waits[-1] < 0.6, waits


def test_systemd_tracks_postfix_master(relay):
    """Our drop-in on Debian 13's postfix.service names the master's pid file, so a dead
    master is noticed (and restarted) at once."""
    master = relay.run("sed 's/ //g' /var/spool/postfix/pid/master.pid").stdout.strip()
    assert relay.run("systemctl show -p MainPID --value postfix").stdout.strip() == master


# Two accounts, each created by its first login; one sends the other an end-to-end
# encrypted message (the form filtermail checks) through submission, Postfix, the filters
# and LMTP into Dovecot 2.4, where an IMAP IDLE client is told about it.
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


@pytest.fixture(scope="module")
def relay_with_clients(relay):
    return relay


# test_deltachat's and test_install's checks, collected again in this module with the Debian 13 relay above, in
# test_install's order (they build on each other: accounts, then a new domain, then purge).
test_two_clients_verify_each_other_and_exchange_encrypted_messages = \
    test_deltachat.test_two_clients_verify_each_other_and_exchange_encrypted_messages
test_users_login_create_accounts_and_cleartext_is_refused = \
    test_install.test_users_login_create_accounts_and_cleartext_is_refused
test_every_unit_active_and_status_all_good = test_install.test_every_unit_active_and_status_all_good
test_ports_answer = test_install.test_ports_answer
test_configure_again_changes_nothing = test_install.test_configure_again_changes_nothing
test_refuses_what_it_must_with_upstreams_reply_codes = \
    test_install.test_refuses_what_it_must_with_upstreams_reply_codes
test_turn_credentials_from_imap_metadata_are_accepted_by_coturn = \
    test_install.test_turn_credentials_from_imap_metadata_are_accepted_by_coturn
test_reconfigure_noninteractive_to_a_new_domain = \
    test_install.test_reconfigure_noninteractive_to_a_new_domain
test_an_edit_of_chatmail_ini_wins_over_the_stored_answer = \
    test_install.test_an_edit_of_chatmail_ini_wins_over_the_stored_answer
test_remove_keeps_data_purge_removes_what_we_generated_reinstall_works = \
    test_install.test_remove_keeps_data_purge_removes_what_we_generated_reinstall_works
test_setup_writes_chatmail_ini_and_configures_in_one_command = \
    test_install.test_setup_writes_chatmail_ini_and_configures_in_one_command
