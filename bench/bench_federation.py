#!/usr/bin/python3
"""Delta Chat A→B across two relays: the time from the sender's send call to the
incoming-message event of the receiver's client on the other relay, real Delta Chat core
on both ends, over the test network of tests/system/internet.py (DNS from nsd,
certificates from pebble, as tests/system/test_federation.py).

Two relays of one Debian release, each installed from dist/repo: relay-a.test `ours` (as
installed: Debian's Dovecot with the instant-IDLE plugin) and relay-b.test `stock` (the
plugin's file diverted away, `chatmail configure` run again). Two pairs of accounts: a
sender on the stock relay writes to a receiver on ours ("to ours"), and a sender on ours to
a receiver on the stock relay ("to stock"); what differs between the two ways is the
receiving Dovecot (the sending relay's Dovecot is not on the way). Samples alternate
between the pairs in random order, `--gap` seconds apart; the senders are bots (no send
rate limiter, see bench/dc_meter.py). The clients run in relay a's container.

Needs root, nsd, pebble and `make build`. Writes bench/results/federation.md (a section
per release) and federation-<debian12|debian13>.json (every sample).

    /usr/bin/python3 bench/bench_federation.py [--suite bookworm|trixie] [--samples 60]
        [--before-after] [--quickack]
"""

import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from tests.system.container import DELTACHAT_VERSION, deltachat_venv  # noqa: E402
from tests.system.internet import Internet  # noqa: E402
from tests.system.test_federation import federated_relays, publish_dns  # noqa: E402

from bench_relay_latency import RELEASE, UNLIMITED, WITHOUT_PLUGIN  # noqa: E402
from common import (  # noqa: E402
    deltachat_meter, idle_status_line, installed_dovecot_version, relay_journal)
from latency_report import (  # noqa: E402
    WARMUP, arguments, load_line, save_run, split_journal, write_report)

LABELS = {"a": "ours", "b": "stock"}
# pair index -> (label of the receiving relay, sending relay's key, receiving relay's key)
WAYS = [("to ours", "b", "a"), ("to stock", "a", "b")]


QUICKACK_HELP = ("an experiment, not the relay's configuration: both relays acknowledge "
                 "TCP data at once (route option quickack), against the stall after STARTTLS "
                 "(results/delivery-analysis.md)")


def acknowledge_at_once(internet, relays):
    """The route of each relay's network without delayed ACKs: the receiving side then
    acknowledges the sender's TLS Finished at once, and Nagle no longer holds its EHLO."""
    for key, box in relays.items():
        internet_route = f"{box.address.rsplit('.', 1)[0]}.0/24"
        subprocess.run(["ip", "-n", internet.namespace(f"relay-{key}"), "route", "replace",
                        internet_route, "dev", "eth0", "proto", "kernel", "scope", "link",
                        "src", box.address, "quickack", "1"], check=True)


BEFORE_AFTER_HELP = ("only \"to ours\" (relay b sends to relay a), in blocks that switch both "
                     "relays' TLS sessions between now (port 25: OpenSSL's ticket after every "
                     "handshake; smtp client: no session cache) and before (port 25: "
                     "Postfix's own tickets, none after a resumption; smtp client: resumes): "
                     "results/delivery-analysis.md")
# the two states for --before-after: shell commands run in each relay, then a reload.
# A reload is enough: Postfix's master reads main.cf and master.cf again and tells every
# child of the old generation to exit when idle (master_restart_service), tlsmgr too,
# which opens the smtp client's session cache and makes the ticket keys only when it
# starts; the first sample of a block is not kept anyway. A restart would be the same
# for Postfix, but `systemctl restart postfix` in these containers often waits 90 s
# (TimeoutStopSec) for an already empty unit (results/delivery-analysis.md).
TLS_STATES = {
    "TLS as now": "postconf -P 'smtp/inet/tls_session_ticket_cipher=' && "
                  "postconf -e 'smtp_tls_session_cache_database='",
    "TLS as before": "postconf -PX smtp/inet/tls_session_ticket_cipher && "
                     "postconf -e 'smtp_tls_session_cache_database="
                     "btree:${data_directory}/smtp_scache'",
}
BLOCK = 8  # samples counted per block of one state


def switch_tls(relays, state):
    """Both relays in `state` (a key of TLS_STATES), Postfix reloaded."""
    for box in relays.values():
        box.run(f"{TLS_STATES[state]} && systemctl reload postfix")
    time.sleep(2)


def measure_before_after(relays, venv, samples, gap):
    """Samples of the "to ours" way in blocks of BLOCK + 1, the TLS state switching
    between blocks (first state at random); a block's first sample is not kept: after the
    reload relay b's client has no session to resume, and the full handshake ends with a
    ticket in either state."""
    pairs = [{"sender": [relays["b"].domain] * 2, "receiver": [relays["a"].domain] * 2}]
    meter = deltachat_meter(relays["a"], venv, pairs)
    states = random.sample(sorted(TLS_STATES), len(TLS_STATES))
    try:
        core = meter.ask("setup")["version"]
        since = time.time()
        runs = {state: [] for state in TLS_STATES}
        number = 0
        while min(len(run) for run in runs.values()) < WARMUP + samples:
            state = states[number // (BLOCK + 1) % len(states)]
            switch_tls(relays, state)
            for index in range(BLOCK + 1):
                sample = meter.ask("sample", pair=0, n=number)
                number += 1
                if index:
                    runs[state].append(sample)
                time.sleep(gap)
    finally:
        meter.close()
        switch_tls(relays, "TLS as now")
    journals = {key: relay_journal(box, since - 1) for key, box in relays.items()}
    for state in TLS_STATES:
        split_journal(runs[state], journals["b"], journals["a"])
    return runs, core


def relays_of(suite):
    return {"a": ("relay-a.test", "10.231.0.10", suite),
            "b": ("relay-b.test", "10.231.0.11", suite)}


def prepare(relays):
    """Both relays: the one sender may send more than an admin would allow; b: stock."""
    for key, box in relays.items():
        box.run(UNLIMITED)
        if LABELS[key] == "stock":
            box.run(WITHOUT_PLUGIN)
        box.status_line = idle_status_line(box.run("chatmail status", check=False).stdout)
        box.dovecot = installed_dovecot_version(box)
    assert "instant IDLE: plugin" in relays["a"].status_line, relays["a"].status_line
    assert "instant IDLE: plugin" not in relays["b"].status_line, relays["b"].status_line


def measure(relays, venv, samples, gap):
    pairs = [{"sender": [relays[s].domain] * 2, "receiver": [relays[r].domain] * 2}
             for _, s, r in WAYS]
    meter = deltachat_meter(relays["a"], venv, pairs)
    try:
        core = meter.ask("setup")["version"]
        since = time.time()
        runs = {way: [] for way, _, _ in WAYS}
        for number in range(WARMUP + samples):
            for index in random.sample(range(len(WAYS)), len(WAYS)):
                runs[WAYS[index][0]].append(meter.ask("sample", pair=index, n=number))
                time.sleep(gap)
    finally:
        meter.close()
    journals = {key: relay_journal(box, since - 1) for key, box in relays.items()}
    for way, sender, receiver in WAYS:
        split_journal(runs[way], journals[sender], journals[receiver])
    return runs, core


def main():
    args = arguments(__doc__, RELEASE, [("--quickack", QUICKACK_HELP),
                                        ("--before-after", BEFORE_AFTER_HELP)])
    venv = deltachat_venv()
    load_before = load_line()
    started = time.monotonic()
    with Internet() as internet, federated_relays(internet, relays_of(args.suite)) as relays:
        setup_seconds = time.monotonic() - started
        publish_dns(relays, internet)
        prepare(relays)
        if args.quickack:
            acknowledge_at_once(internet, relays)
        if args.before_after:
            runs, core = measure_before_after(relays, venv, args.samples, args.gap)
        else:
            runs, core = measure(relays, venv, args.samples, args.gap)
    release = (RELEASE[args.suite] + ("-quickack" if args.quickack else "")
               + ("-before-after" if args.before_after else ""))
    labels = list(TLS_STATES) if args.before_after else [way for way, _, _ in WAYS]
    lines = save_run("federation", args, release, core, runs, load_before) + [
        f"- relays: two {args.suite} containers (systemd-nspawn), each in its own network "
        "namespace on a bridge (tests/system/internet.py), chatmail-relay installed from "
        "dist/repo with certificates from pebble (ACME, HTTP-01), DNS from nsd "
        f"({setup_seconds:.0f} s for both); Dovecot `{relays['a'].dovecot}` (Debian's "
        f"build) in both; relay-a.test `ours` ({relays['a'].status_line}), relay-b.test "
        f"`stock`: the plugin's .so diverted away and `chatmail configure` run again "
        f"({relays['b'].status_line}); both relays, DNS and the ACME server share this "
        "machine's CPUs",
        f"- clients: deltachat-rpc-server {DELTACHAT_VERSION} (core {core}) in relay a's "
        "container; \"to ours\": a sender on relay b writes to a receiver on relay a; "
        "\"to stock\": a sender on relay a to a receiver on relay b; the senders are bots "
        "(bot=1: the core's send rate limiter never holds them), the receivers normal "
        "accounts, each pair verified by SecureJoin; the clients accept any certificate "
        "(the core does not trust pebble's root), relay to relay TLS is verified",
        (f"- samples in blocks (below) until each state has at least {args.samples} after "
         f"its first {WARMUP}, which are discarded" if args.before_after else
         f"- {args.samples} samples per way after {WARMUP} discarded, alternating in random "
         "order") + f", {args.gap} s between samples; the clock runs from the send call to "
        "the receiver's incoming-message event (stamped when the client library receives it)",
    ] + ([f"- with --quickack: {QUICKACK_HELP}"] if args.quickack else []) + (
        [f"- with --before-after: {BEFORE_AFTER_HELP}; blocks of {BLOCK} counted samples "
         "(one more before each, not kept), each block's state set by "
         + "; ".join(f"{state}: `{command}`" for state, command in TLS_STATES.items())
         + ", then `systemctl reload postfix`"] if args.before_after else []) + [
        "",
    ]
    out = REPO / "bench" / "results" / "federation.md"
    write_report(out, "Delta Chat A→B across two relays (bench_federation.py)",
                 {release: {"header": lines, "labels": labels,
                            "raw": f"federation-{release}.json"}})
    print(out.read_text())


if __name__ == "__main__":
    main()
