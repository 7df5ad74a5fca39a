#!/usr/bin/env python3
"""Capacity: how many logged-in IMAP IDLE connections one relay holds, what each costs in
memory, and how fast a hibernated one among them still wakes up for new mail.

A fresh container (tests/system, private network, loopback only) with the relay installed
by README's commands; inside it bench/capacity_meter.py (asyncio, Debian's python3) logs
in COUNT distinct accounts on 993 (TLS; the first login creates each), leaves them in
IDLE until Dovecot has hibernated them (imap_hibernate_timeout, 30 s), measures every
process's memory (RSS, PSS), then sends SAMPLES messages by submission on 465 to sampled
clients, one at a time, timing each until its IDLE reads `* N EXISTS`, with all COUNT
still connected. Every limit the relay needs for that is the package's (conf/, sysctl.d);
the benchmark changes nothing but the one sender's rate limit.

Needs root and `make build`. Run it under the system tests' lock. Usage:
  bench_capacity.py [--suite bookworm|trixie] [--parallel N] [--groups G] [COUNT [SAMPLES]]
(defaults bookworm, 50, 10000 50). --groups: the one key exchange group the clients offer
(capacity_meter.py), e.g. X25519 as Delta Chat's core. Writes bench/results/capacity.md
(Debian 12) or capacity-debian13.md and .json; with --groups, capacity-debian13-x25519.md
and so on."""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from tests.system.test_install import DOMAIN, INSTALL  # noqa: E402

from bench_footprint import kind, mb  # noqa: E402
from bench_relay_latency import RELEASE, UNLIMITED, ms  # noqa: E402
from common import (BENCH_MOUNT, booted, installed_dovecot_version,  # noqa: E402
                    machine_facts, percentile, write_results)

DOVECOT_LIMITS = ("default_client_limit", "default_process_limit", "default_vsz_limit",
                  "imap_hibernate_timeout", "mail_max_userip_connections")
SERVICES = ("imap", "imap-login", "imap-hibernate", "auth", "anvil")
SERVICE_LIMITS = ("process_limit", "client_limit", "process_min_avail", "vsz_limit",
                  "service_count", "restart_request_count")
FACTS = {
    "LimitNOFILE (dovecot.service)": "systemctl show -p LimitNOFILE --value dovecot",
    "TasksMax (dovecot.service)": "systemctl show -p TasksMax --value dovecot",
    "fs.inotify.max_user_instances": "sysctl -n fs.inotify.max_user_instances",
    "fs.inotify.max_user_watches": "sysctl -n fs.inotify.max_user_watches",
    "fd limit of Dovecot's master": "grep 'open files' /proc/$(systemctl show -p MainPID "
                                    "--value dovecot)/limits",
}
DOVECOT_CONF = "doveconf -c /etc/dovecot/chatmail/dovecot.conf"
TIMEOUT_MARGIN = 300


def dovecot_limits(box):
    """The effective values (doveconf), global and per service."""
    out = box.run(f"{DOVECOT_CONF} -a 2>/dev/null || doveconf -a", check=False).stdout
    found, service = {}, None
    for line in out.splitlines():
        stripped = line.strip()
        if line.startswith("service "):
            service = stripped.split()[1]
        elif line.startswith("}"):
            service = None
        elif " = " in stripped:
            key, value = stripped.split(" = ", 1)
            if service in SERVICES and key in SERVICE_LIMITS and line.startswith("  " + key):
                found[f"service {service} {{ {key} }}"] = value
            elif service is None and key in DOVECOT_LIMITS and not line.startswith(" "):
                found[key] = value
    return found


def measure(suite, count, samples, parallel, deadline, groups=None):
    box = booted("cap", suite)
    try:
        box.run(INSTALL, timeout=900)
        box.run(UNLIMITED)
        end = time.monotonic() + 120
        while box.run("chatmail status", check=False).returncode != 0:
            if time.monotonic() > end:
                raise RuntimeError(box.run("chatmail status", check=False).stdout)
            time.sleep(1)
        since = box.run("date +%s").stdout.strip()
        facts = {label: box.run(command, check=False).stdout.strip()
                 for label, command in FACTS.items()}
        facts.update(dovecot_limits(box))
        out = box.run(f"python3 {BENCH_MOUNT}/capacity_meter.py {DOMAIN} {count} {samples} "
                      f"--parallel {parallel} --deadline {deadline}"
                      + (f" --groups {groups}" if groups else ""),
                      timeout=deadline + TIMEOUT_MARGIN, check=False)
        sys.stderr.write(out.stderr[-6000:])
        if out.returncode:
            raise RuntimeError(f"capacity_meter.py exited {out.returncode}: {out.stderr[-3000:]}")
        found = json.loads(out.stdout.strip().splitlines()[-1])
        found["facts"] = facts
        found["dovecot"] = installed_dovecot_version(box)
        found["problems"] = box.run(
            f"journalctl --since @{since} --no-pager -u dovecot -u postfix@- -u doveauth "
            "-u lastlogin -u chatmail-metadata | grep -E 'Error|Warning|Panic|Fatal|warning:|"
            "error:|fatal:' | sed -E 's/^.{16}//' | sort | uniq -c | sort -rn | head -20",
            check=False).stdout.rstrip()
        return found
    finally:
        box.stop()


def part(process):
    """What a process is counted as: Dovecot's by name, the rest by systemd unit."""
    if process["unit"] == "dovecot.service":
        return f"dovecot: {process['comm']}"
    return process["unit"]


def grouped(snapshot):
    groups = {}
    for p in snapshot:
        if kind(p["unit"]) == "system":
            continue
        g = groups.setdefault(part(p), {"n": 0, "rss": 0, "pss": 0})
        g["n"] += 1
        g["rss"] += p["rss_kb"]
        g["pss"] += p["pss_kb"]
    return groups


def memory_table(found):
    snapshots = {key: grouped(found[key]) for key in ("before", "hibernated", "after")}
    held = max(found["held_hibernated"], 1)
    names = sorted(set().union(*snapshots.values()),
                   key=lambda n: -snapshots["hibernated"].get(n, {"pss": 0})["pss"])
    lines = ["| part | processes before / held | RSS MB before | RSS MB held | PSS MB before "
             "| PSS MB held | PSS KB per connection |", "|---|---|---|---|---|---|---|"]
    total = {key: {"n": 0, "rss": 0, "pss": 0} for key in snapshots}
    zero = {"n": 0, "rss": 0, "pss": 0}
    for name in names:
        b, h = snapshots["before"].get(name, zero), snapshots["hibernated"].get(name, zero)
        for key in snapshots:
            for field in ("n", "rss", "pss"):
                total[key][field] += snapshots[key].get(name, zero)[field]
        lines.append(f"| {name} | {b['n']} / {h['n']} | {mb(b['rss'])} | {mb(h['rss'])} | "
                     f"{mb(b['pss'])} | {mb(h['pss'])} | {(h['pss'] - b['pss']) / held:.1f} |")
    b, h = total["before"], total["hibernated"]
    lines.append(f"| **whole relay** | {b['n']} / {h['n']} | {mb(b['rss'])} | {mb(h['rss'])} | "
                 f"{mb(b['pss'])} | {mb(h['pss'])} | **{(h['pss'] - b['pss']) / held:.1f}** |")
    return lines, total


def slope(points):
    """Least-squares slope and intercept of y over x."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if not spread:
        return None, None
    k = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
    return k, mean_y - k * mean_x


def per_connection(found):
    """What one more connection costs inside one imap-login process: the slope of its
    private memory (and heap) over its connections (two descriptors each), across the
    processes, which hold different numbers of them."""
    processes = found.get("per_process", {}).get("imap-login", [])
    if len(processes) < 3:
        return []
    lines = ["", "imap-login, per process: connections (descriptors / 2), private memory "
             "(USS) and resident heap, MB:", "",
             "| connections | USS MB | heap MB | anonymous mappings MB |", "|---|---|---|---|"]
    lines += [f"| {p['fds'] // 2} | {mb(p['uss_kb'])} | {mb(p['heap_kb'])} | "
              f"{mb(p['anon_kb'])} |" for p in sorted(processes, key=lambda p: p["fds"])]
    for key in ("uss_kb", "heap_kb"):
        k, base = slope([(p["fds"] / 2, p[key]) for p in processes])
        if k is not None:
            lines.append(f"\n{key.split('_')[0]}: {k:.1f} KB per connection "
                         f"(least squares; {base / 1024:.1f} MB at none)")
    return lines


def report(suite, options, found, facts, load):
    samples = found["samples"]
    wakeups = [s["exists"] for s in samples]
    memory, total = memory_table(found)
    held = found["held_hibernated"]
    per_conn = (total["hibernated"]["pss"] - total["before"]["pss"]) / max(held, 1)
    rate = found["logged_in"] / found["login_seconds"] if found["login_seconds"] else 0
    lines = [
        f"# Capacity: concurrent IMAP IDLE connections ({RELEASE[suite]})", "",
        f"Measured by `bench/bench_capacity.py --suite {suite} --parallel {options.parallel} "
        + (f"--groups {options.groups} " if options.groups else "")
        + f"{options.count} {options.samples}` on {facts['date']}.", "",
        f"- machine: {facts['nproc']} CPUs ({facts['cpu']}), {facts['memory']}, "
        f"Linux {facts['kernel']}, host {facts['os']}; load (uptime) before: {load[0]}; "
        f"after: {load[1]}",
        f"- relay: a fresh {suite} container (systemd-nspawn, private network), README's "
        f"install from dist/repo; Dovecot `{found['dovecot']}` with the instant-IDLE plugin; "
        "only max_user_send_per_minute raised (for the one sender)",
        f"- clients (bench/capacity_meter.py, asyncio, inside the container, over loopback): "
        f"{options.count} distinct accounts, {options.parallel} logins at a time, each "
        "TLS on 993 (key exchange groups offered: "
        + (f"{options.groups} only" if options.groups else "the container's OpenSSL's default")
        + "), LOGIN (creates the account), SELECT INBOX, IDLE; then "
        "at least 30 s until no imap process is left (all hibernated); then "
        f"{options.samples} sampled clients, one after another, each gets a message by "
        "submission on 465 (TLS, AUTH PLAIN, relay_meter.py's client); the clock runs "
        "from before the SMTP connect to the `* N EXISTS` in that client's IDLE",
        "", "## Result", "",
        "| | goal | result |", "|---|---|---|",
        f"| connections held (hibernated / after the samples) | 10000 | **{held}** / "
        f"{found['held_after']} |",
        f"| login rate (first login = account creation) | | {rate:.0f}/s "
        f"({found['logged_in']} in {found['login_seconds']:.1f} s) |",
        f"| whole relay, PSS per connection | <= 100 KB | **{per_conn:.1f} KB** |",
    ]
    if wakeups:
        lines.append(f"| wake-up of a hibernated client, p95 (median, min, max; "
                     f"{len(wakeups)} samples) | <= 100 ms | **{ms(percentile(wakeups, 0.95))}"
                     f"** ({ms(percentile(wakeups, 0.5))}, {ms(min(wakeups))}, "
                     f"{ms(max(wakeups))}) |")
        accepted = [s["accepted"] for s in samples]
        lines.append(f"| of which the submission until smtpd's 250, median (p95) | | "
                     f"{ms(percentile(accepted, 0.5))} ({ms(percentile(accepted, 0.95))}) |")
    lines += [f"| imap processes left before the samples | 0 | {found['imap_left']} |",
              f"| failed logins | 0 | {found['failures'] or 'none'} |",
              f"| connections closed by the relay | 0 | {found['closed'] or 'none'} |",
              f"| sample errors | 0 | {found.get('sample_errors') or 'none'} |",
              f"| the load generator's own peak RSS | | {mb(found['meter_maxrss_kb'])} MB |",
              "| CPU seconds used while logging in, by process name | | " + ", ".join(
                  f"{k} {v}" for k, v in sorted(found.get("login_cpu", {}).items(),
                                                key=lambda item: -item[1])) + " |",
              "| most seen while logging in | | " + ", ".join(
                  f"{k} {v}" for k, v in found.get("peaks", {}).items()) + " |",
              "", "## Memory", "",
              "Before: after the install, before the first client; held: all clients "
              "connected and hibernated. RSS counts shared pages in every process that "
              "maps them; PSS divides them among the sharers (the sum is what the relay "
              "occupies). Per connection: (held - before) / connections held.", ""]
    lines += memory + per_connection(found) + ["", "File descriptors open, all clients held: " + ", ".join(
        f"{k} {v}" for k, v in found["fds"].items()), "", "## Limits in effect", "",
        "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in found["facts"].items()]
    if found["problems"]:
        lines += ["", "Dovecot's, Postfix's and our daemons' log lines with an error or "
                  "warning during the run (count, line):", "", "```", found["problems"], "```"]
    return "\n".join(lines) + "\n"


def uptime():
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--suite", default="bookworm", choices=sorted(RELEASE))
    parser.add_argument("--parallel", type=int, default=50)
    parser.add_argument("--deadline", type=int, default=900,
                        help="seconds the load generator runs at most")
    parser.add_argument("--groups", help="the one key exchange group the clients offer")
    parser.add_argument("numbers", nargs="*", type=int)
    options = parser.parse_args()
    options.count, options.samples = options.numbers + [10000, 50][len(options.numbers):]
    if os.geteuid() != 0:
        sys.exit("needs root")
    before = uptime()
    found = measure(options.suite, options.count, options.samples, options.parallel,
                    options.deadline, options.groups)
    found["machine"], found["load"] = machine_facts(), (before, uptime())
    text = report(options.suite, options, found, found["machine"], found["load"])
    name = "capacity" if options.suite == "bookworm" else f"capacity-{RELEASE[options.suite]}"
    if options.groups:
        name += "-" + options.groups.lower()
    write_results(name, text, found)


if __name__ == "__main__":
    main()
