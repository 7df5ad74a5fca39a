#!/usr/bin/env python3
"""Time from `apt install chatmail-relay` to all units active, and end-to-end delivery
latency between two Delta Chat clients (median and p95 over 50 messages) with our patched
dovecot and with Debian's, side by side on one relay installed from dist/repo in a fresh
Debian 12 container (tests/system). Needs root and `make build`.
Writes bench/results/delivery.md."""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.system.container import HERE, Container, build_rootfs, deltachat_venv  # noqa: E402
from tests.system.repos import debian_dovecot_debs  # noqa: E402
from tests.system.test_install import DOMAIN, INSTALL  # noqa: E402

from common import (  # noqa: E402
    idle_wakeups, installed_dovecot_version, machine_facts, percentile)

from tests.system.container import DELTACHAT_VERSION as DELTACHAT  # noqa: E402

MESSAGES = 50
UNITS = ("doveauth lastlogin chatmail-metadata filtermail filtermail-incoming dovecot "
         "postfix nginx opendkim")

LATENCY = r'''
import json, time

count = int(ARGS[0])
with open_rpc(VENV, WORKDIR + "/accounts") as rpc:
    alice, bob = verified_pair(rpc, DOMAIN)
    chat = bob.create_chat(alice)
    latencies = []
    for i in range(count):
        alice.clear_all_events()
        start = time.monotonic()
        chat.send_text(f"ping {i}")
        while True:
            event = alice.wait_for_event()
            if event.kind == EventType.INCOMING_MSG:
                break
        latencies.append(time.monotonic() - start)
print(json.dumps(latencies))
'''


def wait_all_active(box, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = box.run(f"systemctl is-active {UNITS}", check=False).stdout.split()
        if states and all(state == "active" for state in states):
            return
        time.sleep(0.2)
    raise RuntimeError(f"units not active: {states}")



def measure_latency(box, venv):
    script = (HERE / "deltachat_pair.py").read_text() + LATENCY
    out = box.run(f"timeout 600 {venv}/bin/python - {DOMAIN} {venv} {MESSAGES}",
                  input=script, timeout=700)
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(latencies):
    return statistics.median(latencies) * 1000, percentile(latencies, 0.95) * 1000


def main():
    venv = deltachat_venv()
    [ours] = (REPO / "dist" / "dovecot").glob("dovecot-core_*.deb")
    ours_version = subprocess.run(["dpkg-deb", "-f", str(ours), "Version"], text=True,
                                  capture_output=True, check=True).stdout.strip()
    # Debian's build of the very source ours was built from: only the patch differs.
    stock_version = ours_version.rsplit("+chatmail", 1)[0]
    stock_debs = debian_dovecot_debs(stock_version)
    box = Container(f"bench-{os.getpid()}", build_rootfs(),
                    tempfile.mkdtemp(prefix="chatmail-system-", dir="/var/tmp"),
                    binds=[(venv, venv), (stock_debs[0].parent, "/srv/stock-dovecot")])
    try:
        box.boot()
        start = time.monotonic()
        box.run(INSTALL, timeout=900)
        wait_all_active(box)
        install_seconds = time.monotonic() - start
        patched = (installed_dovecot_version(box), measure_latency(box, venv),
                   idle_wakeups(box, DOMAIN, MESSAGES))
        box.run("dpkg -i /srv/stock-dovecot/*.deb >/dev/null 2>&1 && systemctl restart dovecot")
        wait_all_active(box)
        stock = (installed_dovecot_version(box), measure_latency(box, venv),
                 idle_wakeups(box, DOMAIN, MESSAGES))
    finally:
        box.stop()
    rows = "\n".join(
        f"| {name} | `{version}` | {len(latencies)} | {summary(latencies)[0]:.0f} ms "
        f"| {summary(latencies)[1]:.0f} ms | {summary(wakeups)[0]:.1f} ms "
        f"| {summary(wakeups)[1]:.1f} ms |"
        for name, (version, latencies, wakeups)
        in (("ours (patched)", patched), ("Debian's", stock)))
    m = machine_facts()
    report = f"""# Install time and delivery latency

Measured by `bench/bench_delivery.py` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.

- machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory']}, Linux {m['kernel']}
- relay: installed from dist/repo with README's commands in a fresh Debian 12 container
  (systemd-nspawn; the dependencies are in the cached root file system, so no download
  time is included), self-signed domain `{DOMAIN}`
- clients: deltachat-rpc-server and deltachat-rpc-client {DELTACHAT}, in the same
  container, verified with each other by SecureJoin; Bob sends, Alice waits for the
  incoming-message event; one message at a time
- dovecot: first our patched build, then, in the same container, Debian's build of the
  same source (`dpkg -i`, dovecot restarted), so only the patch differs

| what | result |
|---|---|
| `apt install chatmail-relay` until all units are active | {install_seconds:.1f} s |

| dovecot | version | messages | median A→B | p95 A→B | median IDLE wake-up | p95 IDLE wake-up |
|---|---|---|---|---|---|---|
{rows}

Debian's stock Dovecot waits 500 ms before it tells an IDLE client about new mail
(spec/relay.md §4.1); the patch (dovecot/instant-idle.patch) removes that wait. "IDLE
wake-up" (bench/idle_meter.py, as many deliveries) is that step alone: from the end of an
LMTP delivery into Dovecot to the EXISTS an IDLE-ing IMAP client receives. A→B is the
whole way between two Delta Chat clients.
"""
    (REPO / "bench" / "results").mkdir(exist_ok=True)
    (REPO / "bench" / "results" / "delivery.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
