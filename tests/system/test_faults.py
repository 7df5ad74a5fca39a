"""kill -9 of doveauth, filtermail, dovecot and Postfix's master while Delta Chat clients
send: each comes back by itself, and every message is delivered."""

import json
import time

MESSAGES = 20
# The unit that runs Postfix's master: Debian 12's postfix.service is a wrapper around
# the instance postfix@-, Debian 13's runs the master itself.
POSTFIX_MASTER_UNIT = {"bookworm": "postfix@-", "trixie": "postfix"}
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
            POSTFIX_MASTER_UNIT[relay.suite]]


def main_pids(relay):
    return {unit: relay.run(f"systemctl show -p MainPID --value {unit}").stdout.strip()
            for unit in killed_units(relay)}


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")


def test_killed_daemons_come_back_and_no_message_is_lost(relay_with_clients):
    relay = relay_with_clients
    killed, postfix = killed_units(relay), POSTFIX_MASTER_UNIT[relay.suite]
    relay.clients(SENDER, MESSAGES, timeout=600, background_output="/root/sender.out")
    wait_for(lambda: "ready" in relay.run("cat /root/sender.out").stdout, 120, "the clients")
    time.sleep(4)  # a few messages are on their way
    before = main_pids(relay)
    # systemd tracks Postfix's master through the pid file our drop-in names
    assert before[postfix] == relay.run(POSTFIX_MASTER_PID).stdout.strip()
    relay.run("systemctl kill --signal=KILL --kill-whom=main " + " ".join(killed))

    def all_back():
        now = main_pids(relay)
        active = relay.run("systemctl is-active " + " ".join(killed), check=False).stdout
        return (active.split() == ["active"] * len(killed)
                and all(now[u] not in ("0", before[u]) for u in killed))

    wait_for(all_back, 120, lambda: "the killed services to restart: " + relay.run(
        "systemctl is-active " + " ".join(killed) + "; "
        f"systemctl status {postfix} --no-pager | tail -5", check=False).stdout)
    assert main_pids(relay)[postfix] == relay.run(POSTFIX_MASTER_PID).stdout.strip()

    wait_for(lambda: relay.run("cat /root/sender.out").stdout.count("\n") >= 2, 400,
             lambda: "the sender:\n" + relay.run("cat /root/sender.out.err").stdout[-2000:])
    received = json.loads(relay.run("cat /root/sender.out").stdout.splitlines()[-1])
    assert received == sorted(f"message {i}" for i in range(MESSAGES))
