"""What every benchmark records: the machine it ran on, a process's memory, percentiles;
and what the relay benchmarks measure inside a test container."""

import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

BENCH_MOUNT = "/srv/bench"  # where the relay benchmarks find this folder in a container


def machine_facts():
    cpu = next((line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal:"))
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "kernel": platform.release(),
        "os": platform.freedesktop_os_release().get("PRETTY_NAME", "?"),
    }


def rss_kb(pid, field="VmRSS"):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def percentile(values, fraction):
    """The value below which `fraction` of `values` lie (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def installed_dovecot_version(box):
    """The dovecot-core version installed in container `box` (tests/system)."""
    return box.run("dpkg-query -W -f '${Version}' dovecot-core").stdout


def idle_wakeups(box, domain, count):
    """Seconds from the end of each of `count` LMTP deliveries to the EXISTS an IDLE-ing
    client gets, measured in container `box` by idle_meter.py."""
    script = (Path(__file__).resolve().parent / "idle_meter.py").read_text()
    out = box.run(f"python3 - {domain} {count}", input=script, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def booted(prefix, suite, attempts=3):
    """A booted test container (tests/system) of Debian `suite` with this folder at
    BENCH_MOUNT; a new one when a boot fails (on this busy host: systemd not answering, or
    the stand-in archive's apt lists locked by another test)."""
    from tests.system.container import Container, build_rootfs

    for attempt in range(attempts):
        box = Container(f"{prefix}-{suite}-{os.getpid()}-{attempt}", build_rootfs(suite),
                        tempfile.mkdtemp(prefix=f"chatmail-{prefix}-{suite}-", dir="/var/tmp"),
                        binds=[(Path(__file__).resolve().parent, BENCH_MOUNT)], suite=suite)
        try:
            box.boot()
            return box
        except Exception:  # noqa: BLE001 - the last one is raised
            box.stop()
            if attempt == attempts - 1:
                raise
            time.sleep(10)
