#!/usr/bin/env python3
"""An experiment, not a benchmark: how long Dovecot takes to come back after its master
is killed (kill -9, as tests/system/test_faults.py does) while IMAP clients are
connected, and where that time goes. In one full test run Debian 13's Dovecot came back
after about 110 s instead of the drop-in's RestartSec=30 (docs/decisions.md, "Dovecot
after kill -9 with clients connected").

One relay (README's install) in a container; dovecot_holder.py keeps COUNT accounts
logged in over TLS and IDLE-ing, reconnecting a second after a connection ends, as Delta
Chat does. For each round: the clients connect (and, with `hibernated`, wait past
imap_hibernate_timeout), the master is killed, and systemd's state of dovecot.service is
polled until it runs again and a LOGIN on 993 works. Rounds run for each given client
count, as installed and with a drop-in that bounds TimeoutStopSec, alternating.
Needs root and `make build`.
Usage: check_dovecot_restart.py SUITE [COUNT ...] (default: trixie 0 20 200)
Writes bench/results/dovecot-restart-SUITE.md."""

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from tests.system.test_install import DOMAIN, INSTALL  # noqa: E402

from bench_relay_latency import RELEASE  # noqa: E402
from common import (BENCH_MOUNT, booted, installed_dovecot_version,  # noqa: E402
                    machine_facts, write_results)

HIBERNATE_WAIT = 35  # past the relay's imap_hibernate_timeout (30 s)
BOUND = "/etc/systemd/system/dovecot.service.d/zz-check-restart.conf"
STATUS = "/run/dovecot_holder.count"
LOGIN = ("python3 -c \"import imaplib, ssl; c = ssl.create_default_context(); "
         "c.check_hostname = False; c.verify_mode = ssl.CERT_NONE; "
         "imaplib.IMAP4_SSL('127.0.0.1', 993, ssl_context=c, timeout=5)"
         f".login('probe0001@{DOMAIN}', 'probe-password-1234')\"")


def state(box):
    out = box.run("systemctl show dovecot -p ActiveState -p SubState -p MainPID",
                  check=False).stdout
    values = dict(line.split("=", 1) for line in out.split() if "=" in line)
    return f"{values.get('ActiveState')}/{values.get('SubState')}", values.get("MainPID")


def wait_for_clients(box, count, limit=300):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        seen = box.run(f"cat {STATUS} 2>/dev/null || echo 0", check=False).stdout.strip()
        if int(seen or 0) >= count:
            return
        time.sleep(1)
    raise RuntimeError(f"only {seen} of {count} clients in IDLE")


def kill_and_time(box, limit=400):
    """Kills the master; returns the timeline of systemd states (seconds after the kill)
    and when a LOGIN worked again."""
    _, old_pid = state(box)
    start = time.monotonic()
    box.run("systemctl kill --signal=KILL --kill-whom=main dovecot")
    timeline, last = [], None
    while time.monotonic() - start < limit:
        now, pid = state(box)
        if now != last:
            timeline.append((round(time.monotonic() - start, 1), now))
            last = now
        if now == "active/running" and pid not in ("0", old_pid):
            if box.run(LOGIN, check=False).returncode == 0:
                return timeline, round(time.monotonic() - start, 1)
        time.sleep(0.2)
    return timeline, None


def leftovers(box, since):
    """Dovecot's journal lines between the kill and the restart, shortened."""
    out = box.run(f"journalctl --since @{since:.0f} --no-pager -o short-unix -u dovecot "
                  "| grep -v 'Login: user=' | head -15", check=False).stdout
    return [line[:200] for line in out.splitlines()]


def round_(box, count, hibernated, bounded):
    box.run(f"rm -f {BOUND}; systemctl daemon-reload")
    if bounded:
        box.run(f"mkdir -p {Path(BOUND).parent} && printf '[Service]\\nTimeoutStopSec=10\\n'"
                f" > {BOUND} && systemctl daemon-reload")
    box.run(f"rm -f {STATUS}; setsid -f python3 {BENCH_MOUNT}/dovecot_holder.py {DOMAIN} "
            f"{count} {STATUS} --deadline 900 </dev/null >/run/holder.log 2>&1")
    wait_for_clients(box, count)
    if hibernated:
        time.sleep(HIBERNATE_WAIT)
    processes = box.run("ps -e -o comm= | sort | uniq -c | grep -E 'imap|dovecot|auth'",
                        check=False).stdout.split("\n")
    since = time.time()
    timeline, back = kill_and_time(box)
    log = leftovers(box, since)
    box.run("pkill -f dovecot_holder.py", check=False)
    time.sleep(3)
    return {"count": count, "hibernated": hibernated, "bounded": bounded,
            "timeline": timeline, "back": back, "log": log,
            "processes": [p.strip() for p in processes if p.strip()]}


def report(suite, counts, rounds, facts, dovecot):
    lines = [f"# Experiment: Dovecot's return after kill -9 with clients connected, {RELEASE[suite]}",
             "", f"Measured by `bench/check_dovecot_restart.py {suite} "
             f"{' '.join(map(str, counts))}` on {facts['date']}, {facts['nproc']} CPUs "
             f"({facts['cpu']}), Linux {facts['kernel']}; Dovecot `{dovecot}`; one relay in a "
             "container; clients: dovecot_holder.py (TLS, LOGIN, SELECT, IDLE; reconnect 1 s "
             "after a connection ends). `bounded`: a drop-in with TimeoutStopSec=10.", "",
             "| clients | hibernated | TimeoutStopSec | LOGIN works again after (s) | "
             "systemd states (s after the kill) |", "|---|---|---|---|---|"]
    for r in rounds:
        states = ", ".join(f"{t} {s}" for t, s in r["timeline"])
        lines.append(f"| {r['count']} | {'yes' if r['hibernated'] else 'no'} | "
                     f"{'10 s' if r['bounded'] else 'as installed'} | {r['back']} | {states} |")
    lines += ["", "Dovecot's journal after each kill (first lines):", ""]
    for r in rounds:
        lines += [f"- {r['count']} clients, hibernated {r['hibernated']}, bounded "
                  f"{r['bounded']}; processes before: {'; '.join(r['processes'])}", "", "```"]
        lines += r["log"] + ["```", ""]
    return "\n".join(lines) + "\n"


def main():
    suite = sys.argv[1] if len(sys.argv) > 1 else "trixie"
    counts = [int(c) for c in sys.argv[2:]] or [0, 20, 200]
    box = booted("restart", suite)
    rounds = []
    try:
        box.run(INSTALL, timeout=900)
        dovecot = installed_dovecot_version(box)
        for count in counts:
            for hibernated in ((False, True) if count else (False,)):
                for bounded in (False, True):
                    rounds.append(round_(box, count, hibernated, bounded))
                    print(rounds[-1]["count"], rounds[-1]["hibernated"],
                          rounds[-1]["bounded"], rounds[-1]["back"], rounds[-1]["timeline"],
                          file=sys.stderr, flush=True)
    finally:
        box.stop()
    text = report(suite, counts, rounds, machine_facts(), dovecot)
    write_results(f"dovecot-restart-{RELEASE[suite]}", text)


if __name__ == "__main__":
    main()
