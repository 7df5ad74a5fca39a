#!/usr/bin/env python3
"""Footprint: the memory of the whole relay at rest after README's install, every process
of Postfix, Dovecot, nginx, OpenDKIM, coturn and our daemons, on Debian 12 (Python 3.11)
and Debian 13 (Python 3.13), each in a fresh container (tests/system, private network),
both at once. Per systemd unit: RSS (what `ps` shows; pages shared between processes
counted in each), PSS (shared pages divided among the processes sharing them: the sum is
what the relay really takes) and USS (private pages only). And what a python3 costs before
our code: the interpreter, and each library our daemons import (bench/footprint_meter.py).

Needs root and `make build`. Usage: bench_footprint.py [SETTLE_SECONDS] (default 60: the
wait after `chatmail status` is all good). Writes bench/results/footprint.md and .json."""

import json
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from tests.system.test_install import INSTALL  # noqa: E402

from common import BENCH_MOUNT, booted, machine_facts  # noqa: E402

SUITES = {"bookworm": "Debian 12", "trixie": "Debian 13"}
OURS = ("doveauth.service", "lastlogin.service", "chatmail-metadata.service",
        "filtermail.service", "filtermail-incoming.service")
RELAY = ("postfix", "dovecot", "nginx", "opendkim", "coturn", "unbound", "mtail")
PACKAGES = ("postfix", "dovecot-core", "nginx", "opendkim", "coturn", "python3",
            "python3-chatmaild", "python3-aiosmtpd", "python3-dkim", "python3-dnspython")


def measure(suite, settle, results):
    box = None
    try:
        box = booted("fp", suite)
        box.run(INSTALL, timeout=900)
        deadline = time.monotonic() + 120
        while box.run("chatmail status", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(box.run("chatmail status", check=False).stdout)
            time.sleep(1)
        time.sleep(settle)
        out = box.run(f"python3 {BENCH_MOUNT}/footprint_meter.py --imports", timeout=300)
        found = json.loads(out.stdout.strip().splitlines()[-1])
        found["versions"] = dict(
            line.split("\t") for line in box.run(
                "dpkg-query -W " + " ".join(PACKAGES), check=False).stdout.splitlines()
            if "\t" in line)
        found["python_version"] = box.run("python3 --version").stdout.strip()
        results[suite] = found
    except Exception as error:  # noqa: BLE001 - reported by main
        results[suite] = {"error": f"{type(error).__name__}: {error}"}
    finally:
        if box:
            box.stop()


def group(processes):
    units = {}
    for p in processes:
        if p["comm"] in ("nsenter", "python3") and "footprint_meter" in p["cmdline"]:
            continue
        u = units.setdefault(p["unit"], {"n": 0, "rss": 0, "pss": 0, "uss": 0})
        u["n"] += 1
        u["rss"] += p["rss_kb"]
        u["pss"] += p["pss_kb"]
        u["uss"] += p["uss_kb"]
    return units


def kind(unit):
    if unit in OURS:
        return "ours"
    if unit.split("@")[0].split(".")[0] in RELAY:
        return "relay"
    return "system"


def mb(kb):
    return f"{kb / 1024:.1f}"


def table(found):
    units = group(found["processes"])
    lines = ["| unit | part | processes | RSS MB | PSS MB | USS MB |",
             "|---|---|---|---|---|---|"]
    totals = {}
    order = sorted(units, key=lambda u: ({"ours": 0, "relay": 1, "system": 2}[kind(u)],
                                          -units[u]["pss"]))
    for unit in order:
        u = units[unit]
        lines.append(f"| {unit} | {kind(unit)} | {u['n']} | {mb(u['rss'])} | "
                     f"{mb(u['pss'])} | {mb(u['uss'])} |")
        for key in (kind(unit), "relay+ours" if kind(unit) != "system" else None):
            if key:
                t = totals.setdefault(key, {"n": 0, "rss": 0, "pss": 0, "uss": 0})
                for field in t:
                    t[field] += u[field]
    for key, label in (("ours", "**ours** (our five daemons)"),
                       ("relay+ours", "**whole relay** (Postfix, Dovecot, nginx, OpenDKIM, "
                        "coturn, ours)"),
                       ("system", "the rest (systemd, journald, ... not the relay's)")):
        t = totals.get(key, {"n": 0, "rss": 0, "pss": 0, "uss": 0})
        lines.append(f"| {label} | | {t['n']} | **{mb(t['rss'])}** | **{mb(t['pss'])}** | "
                     f"{mb(t['uss'])} |")
    return lines, totals


def report(results, settle, facts):
    lines = ["# Footprint: the relay's memory at rest", "",
             f"Measured by `bench/bench_footprint.py {settle}` on {facts['date']}.", "",
             f"- machine: {facts['nproc']} CPUs ({facts['cpu']}), {facts['memory']}, "
             f"Linux {facts['kernel']}, host {facts['os']}",
             "- each release: a fresh container (systemd-nspawn, private network), README's "
             "install commands from dist/repo (Debian's Dovecot with our instant-IDLE "
             f"plugin), then `chatmail status` all good, then {settle} s at rest; no client "
             "has connected except the install's own checks",
             "- RSS counts a page shared by several processes in each of them (the sum "
             "over-counts: Dovecot's 16 processes share most of their pages); PSS divides "
             "shared pages among the sharers (the sum is the real total); USS: private "
             "pages only (what stopping the process frees)",
             "- goals: ours <= 100 MB together, the whole relay <= 150 MB", ""]
    for suite, found in results.items():
        lines += [f"## {SUITES[suite]} ({suite})", ""]
        if "error" in found:
            lines += [f"failed: {found['error']}", ""]
            continue
        versions = ", ".join(f"{p} {v}" for p, v in found["versions"].items())
        lines += [f"{found['python_version']}; {versions}", ""]
        rows, _ = table(found)
        lines += rows + [""]
        costs = found.get("python") or {}
        if costs:
            lines += ["RSS of a fresh python3 that only imports (MB):", "",
                      "| import | RSS MB |", "|---|---|"]
            lines += [f"| {label} | {mb(kb) if kb else '?'} |" for label, kb in costs.items()]
            lines.append("")
    return "\n".join(lines) + "\n"


def main():
    settle = int(sys.argv[1]) if len(sys.argv) > 1 else 60
    if os.geteuid() != 0:
        sys.exit("needs root")
    results = {}
    threads = [threading.Thread(target=measure, args=(suite, settle, results))
               for suite in SUITES]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = {suite: results[suite] for suite in SUITES}
    out = REPO / "bench" / "results" / "footprint.md"
    out.write_text(report(results, settle, machine_facts()))
    out.with_suffix(".json").write_text(json.dumps(results))
    print(out.read_text())


if __name__ == "__main__":
    main()
