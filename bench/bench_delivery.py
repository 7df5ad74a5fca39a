#!/usr/bin/python3
"""Delta Chat A→B on one relay: the time from the sender's send call to the incoming-message
event of the receiver's client, real Delta Chat core (deltachat-rpc-server) on both ends.

Two relays side by side, each installed with README's commands in its own fresh container
(as bench_relay_latency.py: `ours` as installed, Debian's Dovecot with the instant-IDLE
plugin; `stock` with the plugin's file diverted away and `chatmail configure` run again).
In each, a sender and a receiver account of that relay, verified with each other; the
client runs inside the relay's container (bench/dc_meter.py). Samples alternate between
the two relays in random order, spaced `--gap` seconds apart. The senders are bot accounts,
which Delta Chat core's send rate limiter leaves alone (dc_meter.py says where), and the
gap keeps one message out of the next one's way. The relays' journals (Postfix, Dovecot)
give where the time goes.

Needs root and `make build`. Writes bench/results/delivery.md (a section per release) and
delivery-<debian12|debian13>.json (every sample, with the clients' events and the journal
lines of its time window).

    /usr/bin/python3 bench/bench_delivery.py [--suite bookworm|trixie] [--samples 60]
"""

import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from tests.system.container import DELTACHAT_VERSION, deltachat_venv  # noqa: E402
from tests.system.test_install import DOMAIN  # noqa: E402

from bench_relay_latency import RELEASE, Relay, install_pair  # noqa: E402
from common import deltachat_meter, relay_journal  # noqa: E402
from latency_report import (  # noqa: E402
    WARMUP, arguments, load_line, save_run, split_journal, write_report)

PAIR = [{"sender": [DOMAIN, "127.0.0.1"], "receiver": [DOMAIN, "127.0.0.1"]}]


class DeliveryRelay(Relay):
    """bench_relay_latency's relay, with the Delta Chat virtualenv mounted too."""

    def container(self, attempt=0):
        box = super().container(attempt)
        box.binds.append((self.venv, self.venv))
        return box

    def install(self):
        started = time.monotonic()
        super().install()
        self.install_seconds = time.monotonic() - started


def install_both(suite, venv):
    DeliveryRelay.venv = venv
    relays = [DeliveryRelay("ours", suite), DeliveryRelay("stock", suite)]
    install_pair(relays)
    return relays


def measure(relays, venv, samples, gap):
    """{label: [sample]}, samples alternating between the relays in random order."""
    meters = {r.label: deltachat_meter(r.box, venv, PAIR) for r in relays}
    try:
        core = {label: m.ask("setup")["version"] for label, m in meters.items()}
        since = time.time()
        runs = {r.label: [] for r in relays}
        for number in range(WARMUP + samples):
            for r in random.sample(relays, len(relays)):
                runs[r.label].append(meters[r.label].ask("sample", pair=0, n=number))
                time.sleep(gap)
        for r in relays:  # one relay: the sender's relay is the receiver's
            journal = relay_journal(r.box, since - 1)
            split_journal(runs[r.label], journal, journal)
        return runs, core
    finally:
        for m in meters.values():
            m.close()


def main():
    args = arguments(__doc__, RELEASE)
    venv = deltachat_venv()
    load_before = load_line()
    relays = install_both(args.suite, venv)
    try:
        runs, core = measure(relays, venv, args.samples, args.gap)
    finally:
        for r in relays:
            r.stop()
    release = RELEASE[args.suite]
    lines = save_run("delivery", args, release, core, runs, load_before) + [
        f"- relays: two fresh {args.suite} containers (systemd-nspawn, private network), "
        "installed in parallel with README's commands from dist/repo ("
        + ", ".join(f"{r.label} {r.install_seconds:.0f} s" for r in relays)
        + f"); Dovecot `{relays[0].dovecot}` (Debian's build) in both; `ours` as installed "
        f"({relays[0].status_line}); `stock`: the plugin's .so diverted away and "
        f"`chatmail configure` run again ({relays[1].status_line})",
        f"- clients: deltachat-rpc-server {DELTACHAT_VERSION} (core "
        f"{core['ours']}) inside each relay's container, a sender (bot=1, so the core's "
        "send rate limiter never holds it) and a receiver (a normal account) of that relay, "
        "verified by SecureJoin, connected to 127.0.0.1 (self-signed certificate)",
        f"- {args.samples} samples per relay after {WARMUP} discarded, alternating between "
        f"the relays in random order, {args.gap} s between samples; the clock runs from "
        "the send call to the receiver's incoming-message event (stamped when the client "
        "library receives it)",
        "",
    ]
    out = REPO / "bench" / "results" / "delivery.md"
    write_report(out, "Delta Chat A→B on one relay (bench_delivery.py)", {release: {
        "header": lines, "labels": ["ours", "stock"], "raw": f"delivery-{release}.json"}})
    print(out.read_text())


if __name__ == "__main__":
    main()
