"""kill -9 of doveauth, filtermail, dovecot and Postfix's master while Delta Chat clients
send: each comes back by itself, and every message is delivered.

Most of the test is waiting (for Postfix's restart, for the clients' retries): the kills
and the waits run on each release's relay at once, as the last step of its setup
(conftest's installed_relays), and each release's test then checks what its relay did."""

import json
import threading
import time

import pytest

from .conftest import installed_relays
from .container import deltachat_venv

MESSAGES = 20
# The unit that runs Postfix's master (Debian 12's postfix.service is a wrapper around
# the instance postfix@-, Debian 13's runs the master itself), as the installed
# platform table says.
POSTFIX_MASTER_UNIT = ("python3 -c 'from chatmaild.admin.platform import load_platform; "
                       "print(load_platform().postfix_instance_service)'")
POSTFIX_MASTER_PID = "sed 's/ //g' /var/spool/postfix/pid/master.pid"

SENDER = r'''
import json, threading, time

count = int(ARGS[0])
with open_rpc(VENV, WORKDIR + "/accounts") as rpc:
    alice, bob = verified_pair(rpc, DOMAIN)
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


def killed_units(relay):
    return ["doveauth", "filtermail", "filtermail-incoming", "dovecot",
            postfix_master_unit(relay)]


def postfix_master_unit(relay):
    return relay.run(POSTFIX_MASTER_UNIT).stdout.strip()


def main_pids(relay):
    return {unit: relay.run(f"systemctl show -p MainPID --value {unit}").stdout.strip()
            for unit in killed_units(relay)}


def wait_for(condition, timeout):
    """Whether `condition()` came true within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(1)
    return False


def kill_daemons_while_clients_send(relay):
    """The faults, and what the relay did about them, in relay.seen (the test asserts)."""
    killed, postfix = killed_units(relay), postfix_master_unit(relay)
    seen = relay.seen = {}
    relay.clients(SENDER, MESSAGES, timeout=600, background_output="/root/sender.out")
    seen["clients_ready"] = wait_for(
        lambda: "ready" in relay.run("cat /root/sender.out").stdout, 120)
    if not seen["clients_ready"]:
        seen["sender_err"] = relay.run("cat /root/sender.out.err").stdout[-2000:]
        return
    time.sleep(4)  # a few messages are on their way
    before = main_pids(relay)
    seen["master_tracked_before"] = (before[postfix],
                                     relay.run(POSTFIX_MASTER_PID).stdout.strip())
    relay.run("systemctl kill --signal=KILL --kill-whom=main " + " ".join(killed))

    def all_back():
        now = main_pids(relay)
        active = relay.run("systemctl is-active " + " ".join(killed), check=False).stdout
        return (active.split() == ["active"] * len(killed)
                and all(now[u] not in ("0", before[u]) for u in killed))

    # RestartSec=30; on Debian 13 with clients connected Dovecot came back only after
    # about 110 s (docs/decisions.md, open), so allow for that rather than 120 s.
    seen["all_back"] = wait_for(all_back, 240)
    seen["services"] = (f"main pids before {before}, after {main_pids(relay)}\n" + relay.run(
        "systemctl is-active " + " ".join(killed) + "; "
        f"journalctl --no-pager -n 40 -u {postfix} | grep -v 'updating /etc/ssl'",
        check=False).stdout)
    seen["master_tracked_after"] = (main_pids(relay)[postfix], relay.run(
        POSTFIX_MASTER_PID, check=False).stdout.strip() or "no master.pid")
    seen["sender_done"] = wait_for(
        lambda: relay.run("cat /root/sender.out").stdout.count("\n") >= 2, 400)
    seen["sender_out"] = relay.run("cat /root/sender.out").stdout
    seen["sender_err"] = relay.run("cat /root/sender.out.err").stdout[-2000:]


# One relay's faults at a time. With both releases' relays killed and restarting at once,
# each with its clients, on 2 cores, a daemon was three times not back within 120 s
# (cause not found; alone, each came back): this keeps the load of one.
ONE_AT_A_TIME = threading.Lock()


def kill_daemons_alone(relay):
    with ONE_AT_A_TIME:
        kill_daemons_while_clients_send(relay)


@pytest.fixture(scope="module")
def relays_by_suite(request):
    with installed_relays(request, "faults", deltachat_venv(),
                          prepare=kill_daemons_alone) as relays:
        yield relays


def test_killed_daemons_come_back_and_no_message_is_lost(relay):
    seen = relay.seen
    assert seen["clients_ready"], seen["sender_err"]
    # systemd tracks Postfix's master through the pid file our drop-in names
    main_pid, master_pid = seen["master_tracked_before"]
    assert main_pid == master_pid, seen
    assert seen["all_back"], "the killed services did not restart:\n" + seen["services"]
    main_pid, master_pid = seen["master_tracked_after"]
    assert main_pid == master_pid, seen
    assert seen["sender_done"], "the sender did not finish:\n" + seen["sender_err"]
    received = json.loads(seen["sender_out"].splitlines()[-1])
    assert received == sorted(f"message {i}" for i in range(MESSAGES))
