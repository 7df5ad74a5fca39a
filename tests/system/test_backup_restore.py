"""`chatmail backup` on a running relay a, `chatmail restore` on a fresh install b of the
same domain (a new host): the same Delta Chat accounts, set up against a, go on writing
each other end-to-end encrypted through b with their passwords, push tokens and DKIM key
carried over. And the daily backup job, run by systemd in its sandbox."""

import hashlib
import json
import shutil
import time

import pytest

from .conftest import (deltachat_clients, install, new_container, selected_suites,
                       started_together)
from .container import deltachat_venv
from .test_install import DOMAIN

ACCOUNTS = "/root/dc-accounts"
ARCHIVE = "/root/relay-backup.tar.gz"

# alice writes bob, bob answers; in "setup" they are made and verified with each other
# first, later they are the accounts saved in ACCOUNTS.
CLIENTS = r'''
import json

ACCOUNTS, MODE = ARGS
result = {}
with open_rpc(VENV, ACCOUNTS) as rpc:
    if MODE == "setup":
        alice, bob = verified_pair(rpc, DOMAIN)
    else:
        alice, bob = DeltaChat(rpc).get_all_accounts()
        alice.bring_online()
        bob.bring_online()
    result["addrs"] = [alice.get_config("configured_addr"), bob.get_config("configured_addr")]
    alice.create_chat(bob).send_text(f"hello bob ({MODE})")
    msg = bob.wait_for_incoming_msg().get_snapshot()
    result["to_bob"] = [msg.text, msg.show_padlock]
    bob.create_chat(alice).send_text(f"hello alice ({MODE})")
    msg = alice.wait_for_incoming_msg().get_snapshot()
    result["to_alice"] = [msg.text, msg.show_padlock]
print(json.dumps(result))
'''

# An IMAP login; prints OK or the server's refusal.
LOGIN = r"""
import imaplib, ssl, sys
ctx = ssl.create_default_context()
ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
imap = imaplib.IMAP4_SSL("127.0.0.1", 993, ssl_context=ctx)
try:
    print(imap.login(sys.argv[1], sys.argv[2])[0])
except imaplib.IMAP4.error as exc:
    print(f"refused: {exc}")
"""

ALICE, BOB = f"alice0001@{DOMAIN}", f"bobby0002@{DOMAIN}"
MAILBOXES = f"/home/vmail/mail/{DOMAIN}"
DKIM_KEY = f"/etc/dkimkeys/{DOMAIN}.private"


def talk(box, mode):
    out = box.clients(CLIENTS, ACCOUNTS, mode, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"addrs": [ALICE, BOB], "to_bob": [f"hello bob ({mode})", True],
                      "to_alice": [f"hello alice ({mode})", True]}, result


def digest(box, path):
    return hashlib.sha256((box.root / path.lstrip("/")).read_bytes()).hexdigest()


def login(box, address, password):
    return box.run(f"python3 - {address} {password}", input=LOGIN).stdout.strip()


@pytest.fixture(scope="module")
def relays_by_suite(request):
    """Relays a (the old host) and b (the new one) for each selected suite, all installed
    at once, keyed (suite, "a"|"b")."""
    venv = deltachat_venv()
    suites = selected_suites(request)

    def make(key):
        box = new_container(f"backup-{key[1]}", key[0], binds=[(venv, venv)])
        box.clients = deltachat_clients(box, venv)
        return box

    keys = [(suite, host) for suite in suites for host in ("a", "b")]
    with started_together(keys, make, install) as relays:
        yield relays


@pytest.fixture(scope="module")
def relays(relays_by_suite, suite):
    return relays_by_suite.get((suite, "a")), relays_by_suite.get((suite, "b"))


def test_accounts_move_to_a_new_host_with_backup_and_restore(relays):
    a, b = relays
    talk(a, "setup")
    # a push token, as chatmail-metadata keeps it for alice's phone
    a.run("cat >/tmp/metadata.json",
          input=json.dumps({"devicetoken": {"phone-token": int(time.time())}}))
    a.run(f"install -o vmail -g vmail -m 600 /tmp/metadata.json {MAILBOXES}/{ALICE}/")
    out = a.run(f"chatmail backup {ARCHIVE}").stdout
    assert out.startswith(f"Wrote {ARCHIVE}: 1 chatmail.ini, "), out
    assert a.run(f"stat -c '%U %a' {ARCHIVE}").stdout.split() == ["root", "600"]
    saved = {path: digest(a, path) for path in (
        DKIM_KEY, "/etc/chatmail/turn-secret", f"{MAILBOXES}/{ALICE}/password",
        f"{MAILBOXES}/{BOB}/password", f"{MAILBOXES}/{ALICE}/metadata.json")}
    for path in (ARCHIVE, ACCOUNTS):
        copy = shutil.copytree if path == ACCOUNTS else shutil.copy2
        copy(a.root / path.lstrip("/"), b.root / path.lstrip("/"))
    a.stop()  # the old host is gone

    assert digest(b, DKIM_KEY) != saved[DKIM_KEY]  # the fresh install's own key
    dry = b.run(f"chatmail restore --dry-run {ARCHIVE}").stdout
    assert "nothing changed (--dry-run)" in dry, dry
    assert digest(b, DKIM_KEY) != saved[DKIM_KEY]
    out = b.run(f"chatmail restore {ARCHIVE} 2>&1").stdout
    assert "chatmail restore: done" in out, out
    assert {path: digest(b, path) for path in saved} == saved
    assert b.run(f"stat -c '%U %a' {DKIM_KEY} {MAILBOXES}/{ALICE} {MAILBOXES}/{ALICE}/password"
                 ).stdout.split() == ["opendkim", "600", "vmail", "700", "vmail", "600"]
    # alice exists with her old password: another one does not make a new account
    assert login(b, ALICE, "not-alices-password").startswith("refused"), login(
        b, ALICE, "not-alices-password")
    assert b.run("chatmail status", check=False).returncode == 0

    talk(b, "moved")

    # b now has an account the backup does not: restoring again would drop it
    assert login(b, f"carol0003@{DOMAIN}", "carols-password") == "OK"
    refused = b.run(f"chatmail restore {ARCHIVE}", check=False)
    assert refused.returncode == 1
    assert "not restoring over another relay (--force does): 1 account(s) here are not in " \
           f"the backup, e.g. carol0003@{DOMAIN}" in refused.stderr, refused.stderr


def test_daily_backup_job_writes_into_backup_dir(relays):
    b = relays[1]
    b.run("systemctl start chatmail-backup.service")
    assert "Daily backups are off" in b.run(
        "journalctl --no-pager -o cat -u chatmail-backup.service").stdout
    b.run("chatmail set backup_dir=/var/backups/chatmail && chatmail configure >/dev/null")
    started = b.run("systemctl start chatmail-backup.service", check=False)
    assert started.returncode == 0, b.run(
        "journalctl --no-pager -o cat -u chatmail-backup.service").stdout
    listing = b.run("stat -c '%U %a %n' /var/backups/chatmail /var/backups/chatmail/*"
                    ).stdout.splitlines()
    assert listing[0] == "root 700 /var/backups/chatmail", listing
    assert len(listing) == 2 and listing[1].startswith(
        f"root 600 /var/backups/chatmail/chatmail-backup-{DOMAIN}-"), listing
    assert b.run("systemctl is-active chatmail-backup.timer").stdout.strip() == "active"
