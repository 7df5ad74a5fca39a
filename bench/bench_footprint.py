#!/usr/bin/env python3
"""Footprint: the memory of the whole relay at rest after README's install, every process
of Postfix, Dovecot, nginx, OpenDKIM, coturn and our daemons, on Debian 12 (Python 3.11)
and Debian 13 (Python 3.13), each in a fresh container (tests/system, private network),
both at once. Per systemd unit: RSS (what `ps` shows; pages shared between processes
counted in each), PSS (shared pages divided among the processes sharing them: the sum is
what the relay really takes) and USS (private pages only). And what a python3 costs before
our code: the interpreter, and each library our daemons import (bench/footprint_meter.py).

With --baseline REV, then in the same containers: our daemons from this build and from
git revision REV's chatmaild/, in turns (--rounds of each, alternating which goes first):
the package's chatmaild/ swapped for the other, our five units restarted, `chatmail
status` all good, SETTLE seconds at rest, measured; then each daemon's first use
(bench/footprint_use.py: new accounts' logins, a push token, TURN credentials, a message
from one to the other with its push, one from outside), 5 s, measured again. What a daemon imports only when it first needs it
shows in the second measurement.

Needs root and `make build`. Usage: bench_footprint.py [SETTLE_SECONDS] [--baseline REV
[--rounds N] [--round-settle SECONDS]] (SETTLE default 60: the wait after `chatmail status`
is all good after the install; rounds 3, 20 s each). Writes bench/results/footprint.md and
.json."""

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from tests.system.test_install import INSTALL  # noqa: E402

from common import (BENCH_MOUNT, booted, machine_facts,  # noqa: E402
                    wait_until_status_is_good)

SUITES = {"bookworm": "Debian 12", "trixie": "Debian 13"}
OURS = ("doveauth.service", "lastlogin.service", "chatmail-metadata.service",
        "filtermail.service", "filtermail-incoming.service")
RELAY = ("postfix", "dovecot", "nginx", "opendkim", "coturn", "unbound", "mtail")
PACKAGES = ("postfix", "dovecot-core", "nginx", "opendkim", "coturn", "python3",
            "python3-chatmaild", "python3-aiosmtpd", "python3-dkim", "python3-dnspython")


# Where the package puts chatmaild/, and where the two variants wait their turn.
INSTALLED_TREE = "/usr/lib/python3/dist-packages/chatmaild"
VARIANTS = "/var/lib/footprint-variants"


def baseline_tar(ref):
    """chatmaild/ of git revision `ref`, as a base64 tar archive."""
    tar = subprocess.run(["git", "-C", str(REPO), "archive", ref, "chatmaild"],
                         check=True, capture_output=True).stdout
    return base64.b64encode(tar).decode()


def add_baseline(box, tar):
    """The installed chatmaild/ and the baseline's side by side, both byte-compiled as
    the package's is (by root, beforehand: the daemons cannot write __pycache__)."""
    box.run(f"mkdir -p {VARIANTS}/installed {VARIANTS}/baseline && "
            f"cp -a {INSTALLED_TREE} {VARIANTS}/installed/ && "
            f"base64 -d | tar -x -C {VARIANTS}/baseline && "
            f"python3 -m compileall -q {VARIANTS}/baseline", input=tar)


def use_variant(box, variant):
    box.run(f"rm -rf {INSTALLED_TREE} && cp -a {VARIANTS}/{variant}/chatmaild "
            f"{INSTALLED_TREE} && systemctl restart {' '.join(OURS)}")
    wait_until_status_is_good(box)


def meter(box):
    out = box.run(f"python3 {BENCH_MOUNT}/footprint_meter.py", timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])["processes"]


def compare(box, baseline, rounds, settle):
    """Each variant `rounds` times, alternating: at rest, then after its first use."""
    add_baseline(box, baseline_tar(baseline))
    found = []
    for number in range(rounds):
        order = ("baseline", "installed") if number % 2 == 0 else ("installed", "baseline")
        for variant in order:
            use_variant(box, variant)
            time.sleep(settle)
            at_rest = meter(box)
            used = box.run(f"python3 {BENCH_MOUNT}/footprint_use.py "
                           f"fpuse{number:02d}{variant[0]}", timeout=120)
            time.sleep(5)
            found.append({"round": number, "variant": variant, "at_rest": at_rest,
                          "used": json.loads(used.stdout.strip().splitlines()[-1]),
                          "after_use": meter(box)})
    return found


def measure(suite, settle, results, options):
    box = None
    try:
        box = booted("fp", suite)
        box.run(INSTALL, timeout=900)
        wait_until_status_is_good(box)
        time.sleep(settle)
        out = box.run(f"python3 {BENCH_MOUNT}/footprint_meter.py --imports", timeout=300)
        found = json.loads(out.stdout.strip().splitlines()[-1])
        found["versions"] = dict(
            line.split("\t") for line in box.run(
                "dpkg-query -W " + " ".join(PACKAGES), check=False).stdout.splitlines()
            if "\t" in line)
        found["python_version"] = box.run("python3 --version").stdout.strip()
        if options.baseline:
            try:
                found["compared"] = compare(box, options.baseline, options.rounds,
                                            options.round_settle)
            except Exception as error:  # noqa: BLE001 - reported, with what was measured
                found["compared_error"] = f"{type(error).__name__}: {error}"
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


def goal_lines(totals):
    """Which goal is met under which measure: an RSS sum counts every shared page (the
    interpreter, libcrypto, Dovecot's binaries) once per process, PSS once in all."""
    lines = []
    for key, label, goal in (("ours", "ours", 100), ("relay+ours", "the whole relay", 150)):
        t = totals.get(key, {"rss": 0, "pss": 0})
        verdict = {True: "met", False: "missed"}
        lines.append(f"- {label} (goal <= {goal} MB): RSS sum {mb(t['rss'])} MB, goal "
                     f"{verdict[t['rss'] / 1024 <= goal]} by that measure; PSS sum "
                     f"{mb(t['pss'])} MB (what it really occupies), goal "
                     f"{verdict[t['pss'] / 1024 <= goal]}")
    return lines


def median_table(runs, key, baseline):
    """Per daemon and in sum, the median over the rounds of each variant, side by side."""
    def value(variant, unit, field):
        per_round = []
        for run in runs:
            if run["variant"] == variant:
                units = group(run[key])
                if unit in ("ours", "relay+ours"):
                    per_round.append(sum(u[field] for name, u in units.items()
                                         if kind(name) in ({"ours"} if unit == "ours"
                                                           else {"ours", "relay"})))
                else:
                    per_round.append(units.get(unit, {}).get(field, 0))
        return statistics.median(per_round)

    lines = [f"| unit | RSS {baseline} | RSS this | PSS {baseline} | PSS this | "
             f"USS {baseline} | USS this |", "|---|---|---|---|---|---|---|"]
    for unit, label in [(u, u) for u in OURS] + [
            ("ours", "**ours, together**"), ("relay+ours", "**whole relay**")]:
        cells = [mb(value(variant, unit, field)) for field in ("rss", "pss", "uss")
                 for variant in ("baseline", "installed")]
        if unit in ("ours", "relay+ours"):
            cells = [f"**{cell}**" for cell in cells]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def compared_section(found, baseline):
    runs = found["compared"]
    rounds = len(runs) // 2
    lines = [f"Our daemons from this build and from {baseline}'s chatmaild/, alternating in "
             f"this container ({rounds} rounds each; medians, MB), after a restart of our "
             "five units:", "", "At rest:", ""]
    lines += median_table(runs, "at_rest", baseline)
    lines += ["", "After each daemon's first use (bench/footprint_use.py; the first "
              f"answered: {runs[0]['used']}):", ""]
    lines += median_table(runs, "after_use", baseline)
    return lines + [""]


def report(results, settle, facts, options):
    lines = ["# Footprint: the relay's memory at rest", "",
             f"Measured by `bench/bench_footprint.py {' '.join(sys.argv[1:]) or settle}` "
             f"on {facts['date']}.", "",
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
        rows, totals = table(found)
        lines += rows + [""] + goal_lines(totals) + [""]
        if found.get("compared"):
            lines += compared_section(found, options.baseline)
        if found.get("compared_error"):
            lines += [f"The comparison with {options.baseline} failed: "
                      f"{found['compared_error']}", ""]
        costs = found.get("python") or {}
        if costs:
            lines += ["RSS of a fresh python3 that only imports (MB):", "",
                      "| import | RSS MB |", "|---|---|"]
            lines += [f"| {label} | {mb(kb) if kb else '?'} |" for label, kb in costs.items()]
            lines.append("")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("settle", nargs="?", type=int, default=60)
    parser.add_argument("--baseline", help="also our daemons of this git revision, "
                        "alternating with this build's")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-settle", type=int, default=20)
    options = parser.parse_args()
    settle = options.settle
    if os.geteuid() != 0:
        sys.exit("needs root")
    results = {}
    threads = [threading.Thread(target=measure, args=(suite, settle, results, options))
               for suite in SUITES]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = {suite: results[suite] for suite in SUITES}
    out = REPO / "bench" / "results" / "footprint.md"
    out.write_text(report(results, settle, machine_facts(), options))
    out.with_suffix(".json").write_text(json.dumps(results))
    print(out.read_text())


if __name__ == "__main__":
    main()
