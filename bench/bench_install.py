#!/usr/bin/env python3
"""README's install commands on Debian 12 and Debian 13, side by side: the time from the
first command to `chatmail status` reporting the relay all good, in fresh containers of
tests/system (bench/common.py's booted), rounds alternating between the releases in random
order. Needs root and `make build`. Writes bench/results/install.md."""

import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.system.test_install import DOMAIN, INSTALL  # noqa: E402

from common import (booted, installed_dovecot_version, machine_facts,  # noqa: E402
                    wait_until_status_is_good, write_results)

ROUNDS = 3
SUITES = {"bookworm": "Debian 12", "trixie": "Debian 13"}


def timed_install(suite, number):
    """Seconds from README's first install command to a good `chatmail status`, and the
    Dovecot version installed, in a fresh container of SUITE."""
    box = booted(f"install{number}", suite)
    try:
        start = time.monotonic()
        box.run(INSTALL, timeout=900)
        wait_until_status_is_good(box, interval=0.2)  # the install's time is measured
        return time.monotonic() - start, installed_dovecot_version(box)
    finally:
        box.stop()


def measure():
    """{suite: [seconds, ...]}, {suite: dovecot version}."""
    order = [suite for _ in range(ROUNDS) for suite in random.sample(list(SUITES), 2)]
    seconds = {suite: [] for suite in SUITES}
    versions = {}
    for number, suite in enumerate(order):
        taken, versions[suite] = timed_install(suite, number)
        seconds[suite].append(taken)
        print(f"{SUITES[suite]}: {taken:.1f} s", flush=True)
    return seconds, versions


def report(seconds, versions, load):
    m = machine_facts()
    rows = "\n".join(
        f"| {SUITES[suite]} | `{versions[suite]}` | {statistics.median(values):.1f} s | "
        f"{min(values):.1f}–{max(values):.1f} s |" for suite, values in seconds.items())
    return f"""# README's install, Debian 12 and 13 side by side

Measured by `bench/bench_install.py` on {m['date']}: {m['nproc']} CPUs ({m['cpu']}),
{m['memory']}, Linux {m['kernel']}, host {m['os']}; load average before the run {load}.

README's install commands as the system tests type them (tests/system/test_install.py:
the domain `{DOMAIN}` and Postfix's question preseeded, apt's yes; then the tests' `chatmail
set max_load_1m=100` and a second `chatmail configure`) in a fresh systemd-nspawn container
of each release, until `chatmail status`
reports the relay all good; {ROUNDS} containers per release, alternating in random order.
The dependencies come from the containers' root file systems (tests/system/rootfs.sh
caches them there), so the time is the install and configuration, not downloads.

| release | Dovecot | median | range |
|---|---|---|---|
{rows}
"""


def main():
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    write_results("install", report(*measure(), load))


if __name__ == "__main__":
    main()
