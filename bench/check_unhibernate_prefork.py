#!/usr/bin/env python3
"""An experiment, not a benchmark of the relay as shipped: does a pool of pre-started
imap processes (`service imap { process_min_avail = N }`) shorten the wake-up of a
hibernated IDLE client? When imap-hibernate hands a client back, Dovecot's master starts
a new imap process (fork, exec, initialisation) unless one waits already.

One Debian 12 relay (README's install, plugin loaded) in a container; bench/relay_meter.py
measures submission on 465 to EXISTS for clients hibernated 35 s. Rounds alternate between
the relay's configuration as installed and the same plus `process_min_avail = N` for
service imap (appended to the generated dovecot.conf, `doveadm reload` before the round's
IDLEs start). Needs root and `make build`.
Usage: check_unhibernate_prefork.py [ROUNDS [PER_ROUND [N]]] (default 6 10 4).
Writes bench/results/unhibernate-prefork.md."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_relay_latency import HIBERNATE_TIMEOUT, Relay, ms  # noqa: E402
from common import machine_facts, percentile  # noqa: E402

CONF = "/etc/dovecot/chatmail/dovecot.conf"
MARK = "# check_unhibernate_prefork"


def main():
    rounds, per_round, pool = ([int(a) for a in sys.argv[1:4]] + [6, 10, 4][len(sys.argv[1:4]):])
    relay = Relay("prefork", "bookworm")
    times = {"as installed": [], f"process_min_avail = {pool}": []}
    processes = {label: [] for label in times}
    try:
        relay.install()
        if relay.error:
            raise relay.error
        relay.start_agent()
        relay.ask("setup", hibernating=per_round)
        for round_ in range(rounds):
            label = list(times)[round_ % 2]
            relay.box.run(f"sed -i '/^{MARK}/,$d' {CONF}")
            if round_ % 2:
                relay.box.run(f"printf '{MARK}\\nservice imap {{\\n  process_min_avail = {pool}"
                              f"\\n}}\\n' >> {CONF}")
            relay.box.run("doveadm reload")
            time.sleep(2)
            relay.ask("reconnect")  # sessions of the configuration just loaded
            relay.ask("arm")
            time.sleep(HIBERNATE_TIMEOUT + 5)
            processes[label].append(relay.ask("imap_processes")["count"])
            for client in range(per_round):
                times[label].append(relay.ask("fire", client=client,
                                              number=1000 * (round_ + 1) + client)["exists"])
                time.sleep(0.3)  # the pool refills between wake-ups, as between users
    finally:
        relay.stop()
    facts = machine_facts()
    lines = ["# Experiment: pre-started imap processes and the hibernated wake-up", "",
             f"Measured by `bench/check_unhibernate_prefork.py {rounds} {per_round} {pool}` "
             f"on {facts['date']}, {facts['nproc']} CPUs ({facts['cpu']}), Linux "
             f"{facts['kernel']}; Debian 12 relay in a container, Dovecot "
             f"`{relay.dovecot}`, instant-IDLE plugin loaded; rounds alternate; clients "
             f"IDLE {HIBERNATE_TIMEOUT + 5} s, then each gets one message on 465 (0.3 s "
             "apart); submission start to EXISTS (ms):", "",
             "| imap service | samples | median | p95 | min | max | imap processes before the wake-ups |",
             "|---|---|---|---|---|---|---|"]
    for label, values in times.items():
        lines.append(f"| {label} | {len(values)} | {ms(percentile(values, 0.5))} | "
                     f"{ms(percentile(values, 0.95))} | {ms(min(values))} | "
                     f"{ms(max(values))} | {processes[label]} |")
    out = Path(__file__).resolve().parent / "results" / "unhibernate-prefork.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
