"""kill -9 of doveauth, filtermail, dovecot and Postfix's master while Delta Chat clients
send: each comes back by itself, and every message is delivered."""

import json
import os
import tempfile
import time

import pytest

from .container import Container, deltachat_venv
from .test_install import DOMAIN, INSTALL

MESSAGES = 20
KILLED = ["doveauth", "filtermail", "filtermail-incoming", "dovecot"]
POSTFIX_MASTER_PID = "sed 's/ //g' /var/spool/postfix/pid/master.pid"

SENDER = r'''
import json, sys, tempfile, threading, time
from deltachat_rpc_client import DeltaChat, EventType, Rpc

domain, venv, count = sys.argv[1], sys.argv[2], int(sys.argv[3])

def dclogin(user, password):
    return f"dclogin:{user}@{domain}?p={password}&v=1&ih=127.0.0.1&sh=127.0.0.1&ic=3"

with tempfile.TemporaryDirectory() as tmp, \
        Rpc(accounts_dir=tmp, rpc_server_path=venv + "/bin/deltachat-rpc-server") as rpc:
    dc = DeltaChat(rpc)
    alice, bob = dc.add_account(), dc.add_account()
    alice.add_transport_from_qr(dclogin("alice0001", "alice-password-1"))
    bob.add_transport_from_qr(dclogin("bobby0002", "bob-password-22"))
    alice.bring_online()
    bob.bring_online()
    bob.secure_join(alice.get_qr_code())
    alice.wait_for_securejoin_inviter_success()
    bob.wait_for_securejoin_joiner_success()
    print("ready", flush=True)
    chat = bob.create_chat(alice)
    received = set()

    def receive():
        while len(received) < count:
            event = alice.wait_for_event()
            if event.kind == EventType.INCOMING_MSG:
                received.add(alice.get_message_by_id(event.msg_id).get_snapshot().text)

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    for i in range(count):
        chat.send_text(f"message {i}")
        time.sleep(1)
    receiver.join(timeout=300)
    print(json.dumps(sorted(received)), flush=True)
'''


@pytest.fixture(scope="module")
def relay(rootfs):
    venv = deltachat_venv()
    box = Container(f"faults-{os.getpid()}", rootfs,
                    tempfile.mkdtemp(prefix="chatmail-system-", dir="/var/tmp"),
                    binds=[(venv, venv)])
    try:
        box.boot()
        box.run(INSTALL, timeout=900)
        box.venv = venv
        yield box
    finally:
        box.stop()


def main_pids(relay):
    return {unit: relay.run(f"systemctl show -p MainPID --value {unit}").stdout.strip()
            for unit in KILLED}


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_daemons_come_back_and_no_message_is_lost(relay):
    relay.run("printf '%s' \"$SCRIPT\" > /root/sender.py", env={"SCRIPT": SENDER})
    relay.run(f"nohup timeout 600 {relay.venv}/bin/python /root/sender.py {DOMAIN} "
              f"{relay.venv} {MESSAGES} >/root/sender.out 2>/root/sender.err &")
    wait_for(lambda: "ready" in relay.run("cat /root/sender.out").stdout, 120, "the clients")
    time.sleep(4)  # a few messages are on their way
    before = main_pids(relay)
    master = relay.run(POSTFIX_MASTER_PID).stdout.strip()
    relay.run("systemctl kill --signal=KILL --kill-whom=main " + " ".join(KILLED))
    relay.run(f"kill -9 {master}")  # Postfix's unit does not track its master process

    def all_back():
        now = main_pids(relay)
        active = relay.run("systemctl is-active " + " ".join(KILLED), check=False).stdout
        new_master = relay.run(POSTFIX_MASTER_PID, check=False).stdout.strip()
        master_alive = relay.run(f"kill -0 {new_master}", check=False).returncode == 0
        return (active.split() == ["active"] * len(KILLED)
                and all(now[u] not in ("0", before[u]) for u in KILLED)
                and new_master not in ("", master) and master_alive)

    wait_for(all_back, 120, "the killed services to restart")

    wait_for(lambda: relay.run("cat /root/sender.out").stdout.count("\n") >= 2, 400,
             "the sender to finish:\n" + relay.run("cat /root/sender.err").stdout[-2000:])
    received = json.loads(relay.run("cat /root/sender.out").stdout.splitlines()[-1])
    assert received == sorted(f"message {i}" for i in range(MESSAGES))
