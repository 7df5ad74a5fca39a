"""Stress check of the instant-IDLE plugin (dovecot/plugin/) in the host's Dovecot, one
private instance as bench_idle_plugin.py runs it: bursts of concurrent deliveries into an
IDLE-ing mailbox (every message must be reported), IDLE/DONE cycles racing deliveries,
SELECT switches (the mailbox closes with its watches) and LOGOUT with a notification
pending; then Dovecot's log must be clean (no Error/Warning/Panic/Fatal, no "I/O notify
leak"). Needs root; exits non-zero on a failure.

    check_idle_plugin_stress.py            a minimal Dovecot 2.3 configuration
    check_idle_plugin_stress.py --relay    the relay's own (2.3 or 2.4, as the host's
                                           Dovecot), as bench_idle_plugin.py --relay

For Dovecot 2.4 run it in Debian 13 as bench/results/idle-plugin-relay-dovecot24.md says
(tests/chroot.sh, with dovecot-dev installed there; --dovecot-from forky for 2.4.5)."""

import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_idle_plugin as b  # noqa: E402



def deliver_many(dovecot, user, count):
    for number in range(count):
        dovecot.deliver(user, number)


def wait_exists(client, count):
    """Read until the client has been told of `count` messages."""
    deadline = time.monotonic() + 10
    last = 0
    while last < count:
        match = re.match(rb"\* (\d+) EXISTS", client.stream.readline())
        if match:
            last = int(match.group(1))
        if time.monotonic() > deadline:
            raise RuntimeError(f"told of {last} messages of {count}")


# 9 characters: the relay's doveauth takes only those
USER = "stressbox"


def stress(d):
    """Returns how many messages were delivered."""
    d.create_account(USER)
    d.deliver(USER, 0)
    count = 1
    client = b.Client(d, USER)
    client.command("CREATE Other")
    # bursts: 4 senders x 25 deliveries while IDLE; every message must be reported
    for _ in range(5):
        client.idle()
        senders = [threading.Thread(target=deliver_many, args=(d, USER, 25))
                   for _ in range(4)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        count += 100
        wait_exists(client, count)
        client.done()
    # IDLE/DONE cycles racing deliveries (watches added and removed all the time)
    sender = threading.Thread(target=deliver_many, args=(d, USER, 200))
    sender.start()
    for _ in range(200):
        client.idle()
        client.done()
    sender.join()
    count += 200
    # SELECT of another mailbox closes INBOX, maybe with a notification pending
    for number in range(50):
        client.idle()
        d.deliver(USER, number)
        client.done()
        count += 1
        client.command("SELECT Other")
        client.idle()
        client.done()
        client.command("SELECT INBOX")
    # LOGOUT right after a delivery, maybe with a notification pending
    for number in range(30):
        other = b.Client(d, USER)
        other.idle()
        d.deliver(USER, number)
        count += 1
        other.send("DONE")
        other.close()
    client.command("NOOP")
    client.close()
    return count


def main():
    relay = sys.argv[1:] == ["--relay"]
    build = Path(tempfile.mkdtemp(prefix="idlp-stress-build-", dir="/tmp"))
    build.chmod(0o755)
    d = push = None
    try:
        b.build_plugin(build / b.PLUGIN_SO)
        if relay:
            sys.path.insert(0, str(b.REPO))
            from tests.unit.push_server import PushServer
            push = PushServer()
            d = b.RelayDovecot("stress", push, plugin_dir=build)
        else:
            d = b.Dovecot("stress", plugin_dir=build)
        d.start()
        count = stress(d)
        time.sleep(0.5)
        problems, leaks = d.problems(), d.count("leak")
    finally:
        if d:
            d.stop()
            shutil.rmtree(d.root, ignore_errors=True)
        if push:
            push.close()
        shutil.rmtree(build, ignore_errors=True)
    version = " ".join(b.dovecot_version())
    print(f"Dovecot {version}, {'the relay' if relay else 'a minimal'} configuration: "
          f"{count} deliveries; log lines with Error/Warning/Panic/Fatal: {problems}; "
          f"leak warnings: {leaks}")
    sys.exit(1 if problems or leaks else 0)


if __name__ == "__main__":
    main()
