"""Real Delta Chat clients (the core the apps use, from PyPI) on a freshly installed relay:
accounts are created by their first login through dclogin links, the two verify each
other by QR code (SecureJoin), then exchange end-to-end encrypted messages, one with an
attachment."""

import json
import os
import tempfile

import pytest

from .container import Container, deltachat_venv
from .test_install import DOMAIN, INSTALL

CLIENTS = r'''
import json, os, sys, tempfile
from deltachat_rpc_client import DeltaChat, Rpc

domain, venv = sys.argv[1], sys.argv[2]

def dclogin(user, password):
    return (f"dclogin:{user}@{domain}?p={password}&v=1"
            f"&ih=127.0.0.1&sh=127.0.0.1&ic=3")

result = {}
with tempfile.TemporaryDirectory() as tmp, \
        Rpc(accounts_dir=tmp + "/accounts",
            rpc_server_path=venv + "/bin/deltachat-rpc-server") as rpc:
    dc = DeltaChat(rpc)
    alice, bob = dc.add_account(), dc.add_account()
    alice.add_transport_from_qr(dclogin("alice0001", "alice-password-1"))
    bob.add_transport_from_qr(dclogin("bobby0002", "bob-password-22"))
    result["configured"] = [alice.is_configured(), bob.is_configured()]
    alice.bring_online()
    bob.bring_online()

    bob.secure_join(alice.get_qr_code())
    alice.wait_for_securejoin_inviter_success()
    bob.wait_for_securejoin_joiner_success()

    bob.create_chat(alice).send_text("hello alice, from bob")
    msg = alice.wait_for_incoming_msg().get_snapshot()
    result["text"] = msg.text
    result["encrypted"] = msg.show_padlock

    attachment = os.path.join(tmp, "notes.txt")
    with open(attachment, "w") as f:
        f.write("an attachment\n" * 100)
    alice.create_chat(bob).send_file(attachment)
    msg = bob.wait_for_incoming_msg().get_snapshot()
    result["file_name"] = msg.file_name
    with open(msg.file) as f:
        result["file_lines"] = len(f.read().splitlines())
    result["file_encrypted"] = msg.show_padlock
print(json.dumps(result))
'''


@pytest.fixture(scope="module")
def relay(rootfs):
    venv = deltachat_venv()
    workdir = tempfile.mkdtemp(prefix="chatmail-system-", dir="/var/tmp")
    box = Container(f"dc-{os.getpid()}", rootfs, workdir, binds=[(venv, venv)])
    try:
        box.boot()
        box.run(INSTALL, timeout=900)
        box.venv = venv
        yield box
    finally:
        box.stop()


def test_two_clients_verify_each_other_and_exchange_encrypted_messages(relay):
    out = relay.run(f"timeout 240 {relay.venv}/bin/python - {DOMAIN} {relay.venv}",
                    input=CLIENTS, check=False, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["configured"] == [True, True]
    assert result["text"] == "hello alice, from bob" and result["encrypted"]
    assert result["file_name"] == "notes.txt" and result["file_lines"] == 100
    assert result["file_encrypted"]
    # the accounts exist on the relay, created by the clients' first login
    for user in ("alice0001", "bobby0002"):
        relay.run(f"test -s /home/vmail/mail/{DOMAIN}/{user}@{DOMAIN}/password")
