"""Real Delta Chat clients (the core the apps use, from PyPI) on a freshly installed relay:
accounts are created by their first login through dclogin links, the two verify each
other by QR code (SecureJoin), then exchange end-to-end encrypted messages, one with an
attachment."""

import json

from .test_install import DOMAIN

CLIENTS = r'''
import json, os

result = {}
with open_rpc(VENV, WORKDIR + "/accounts") as rpc:
    alice, bob = verified_pair(rpc, DOMAIN)
    result["configured"] = [alice.is_configured(), bob.is_configured()]

    bob.create_chat(alice).send_text("hello alice, from bob")
    msg = alice.wait_for_incoming_msg().get_snapshot()
    result["text"] = msg.text
    result["encrypted"] = msg.show_padlock

    attachment = os.path.join(WORKDIR, "notes.txt")
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


def test_two_clients_verify_each_other_and_exchange_encrypted_messages(relay_with_clients):
    relay = relay_with_clients
    out = relay.clients(CLIENTS, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["configured"] == [True, True]
    assert result["text"] == "hello alice, from bob" and result["encrypted"]
    assert result["file_name"] == "notes.txt" and result["file_lines"] == 100
    assert result["file_encrypted"]
    # the accounts exist on the relay, created by the clients' first login
    for user in ("alice0001", "bobby0002"):
        relay.run(f"test -s /home/vmail/mail/{DOMAIN}/{user}@{DOMAIN}/password")
