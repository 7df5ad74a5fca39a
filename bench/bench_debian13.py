#!/usr/bin/env python3
"""The relay on Debian 13 with Debian's Dovecot 2.4 (a container of tests/system, booted
by its conftest): time from README's install commands to `chatmail status` reporting every
service running, and Dovecot 2.4's IDLE wake-up after a delivery (bench/idle_meter.py),
which shows whether 2.4 still waits 500 ms, i.e. whether our patch is still needed there.
Needs root and `make build debs-trixie`; with `make dovecot-trixie` also our patched 2.4.
Writes bench/results/debian13.md."""

import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.system.conftest import booted  # noqa: E402
from tests.system.test_install import DOMAIN, INSTALL  # noqa: E402

from common import (  # noqa: E402
    idle_wakeups, installed_dovecot_version, machine_facts, percentile)

DELIVERIES = 50
PATCHED = REPO / "dist" / "dovecot-trixie"  # make dovecot-trixie


INSTALL_OURS = r"""
set -e
cd /srv/patched-dovecot
installed=$(dpkg-query -W -f '${db:Status-Abbrev} ${Package}\n' 'dovecot-*' | awk '$1 == "ii" { print $2 }')
dpkg -i $(for package in $installed; do ls "${package}"_*.deb; done) >/dev/null 2>&1
systemctl restart dovecot
"""


def wait_until_status_is_good(box, timeout=120):
    deadline = time.monotonic() + timeout
    while box.run("chatmail status", check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(box.run("chatmail status", check=False).stdout)
        time.sleep(0.2)


def measure_idle_wakeup(box):
    wakeups = idle_wakeups(box, DOMAIN, DELIVERIES)
    return (installed_dovecot_version(box), statistics.median(wakeups) * 1000,
            percentile(wakeups, 0.95) * 1000)


def main():
    ours = sorted(PATCHED.glob("dovecot-*.deb"))
    binds = [(PATCHED, "/srv/patched-dovecot")] if ours else []
    with booted("bench-debian13", "trixie", binds=binds) as box:
        start = time.monotonic()
        box.run(INSTALL, timeout=900)
        wait_until_status_is_good(box)
        install_seconds = time.monotonic() - start
        results = [("Debian's", *measure_idle_wakeup(box))]
        if ours:
            # our build of the dovecot packages installed (dpkg -i also downgrades when
            # Debian's is a newer security update)
            box.run(INSTALL_OURS)
            wait_until_status_is_good(box)
            results.append(("ours (patched)", *measure_idle_wakeup(box)))
    rows = "\n".join(f"| {name} | `{version}` | {median:.1f} ms | {p95:.1f} ms |"
                     for name, version, median, p95 in results)
    m = machine_facts()
    report = f"""# Debian 13: install time and Dovecot 2.4's IDLE wake-up

Measured by `bench/bench_debian13.py` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.

- machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory']}, Linux {m['kernel']}
- relay: our packages built on Debian 13 (`make debs-trixie`), installed with README's
  commands in a fresh Debian 13 container (systemd-nspawn; dependencies cached in the root
  file system), with Debian's own Dovecot 2.4, domain `{DOMAIN}`; then, when `make
  dovecot-trixie` has built it, our patched build in the same container (`dpkg -i`,
  dovecot restarted), so only the patch differs

| what | result |
|---|---|
| README's install commands until `chatmail status` is all good | {install_seconds:.1f} s |

| dovecot | version | median IDLE wake-up ({DELIVERIES} deliveries) | p95 |
|---|---|---|---|
{rows}

"IDLE wake-up" (bench/idle_meter.py) is the time from the end of an LMTP delivery into
Dovecot to the EXISTS an IDLE-ing IMAP client receives: where Dovecot's notification delay
acts and where dovecot/instant-idle.patch removes it (0.3 ms with the patch on Debian 12,
measured by the earlier bench_delivery.py; bench/results/idle-plugin*.md for the plugin).
"""
    (REPO / "bench" / "results").mkdir(exist_ok=True)
    (REPO / "bench" / "results" / "debian13.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
