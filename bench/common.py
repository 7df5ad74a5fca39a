"""What every benchmark records: the machine it ran on, a process's memory, percentiles;
and what the relay benchmarks measure inside a test container."""

import datetime
import json
import os
import platform
import re
import subprocess
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


def write_results(name, text, data=None):
    """results/NAME.md (and NAME.json with `data`), and the text on stdout."""
    out = Path(__file__).resolve().parent / "results" / f"{name}.md"
    out.write_text(text)
    if data is not None:
        out.with_suffix(".json").write_text(json.dumps(data))
    print(text)


def print_and_append(text, results, append):
    """The run's report on stdout and, with `append` (an experiment's --write), at the
    end of the results file, after its earlier runs."""
    print(text)
    if append:
        with results.open("a") as out:
            out.write(text + "\n")


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


def idle_status_line(status):
    """The line of `chatmail status` output that says how IDLE clients learn of new mail
    (the plugin, the patched build, or neither)."""
    return next((" ".join(line.split()) for line in status.splitlines()
                 if re.search(r"instant.IDLE|chatmail patch", line)), "?")


def idle_wakeups(box, domain, count):
    """Seconds from the end of each of `count` LMTP deliveries to the EXISTS an IDLE-ing
    client gets, measured in container `box` by idle_meter.py (tests/system/test_install.py
    checks the plugin with it)."""
    script = (Path(__file__).resolve().parent / "idle_meter.py").read_text()
    out = box.run(f"python3 - {domain} {count}", input=script, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


class Agent:
    """A measuring script started inside container `box` (all its namespaces, a clean
    environment), spoken to in JSON lines: {"do": verb, ...} in, one reply out."""

    def __init__(self, box, command, name):
        self.name = name
        self.process = subprocess.Popen(
            ["nsenter", "-t", str(box.leader), "-a", "env", "-i",
             "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", *command],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, verb, **args):
        self.process.stdin.write(json.dumps({"do": verb, **args}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} ended")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.name}: {verb}: {reply['error']}")
        return reply

    def close(self, timeout=30):
        if self.process.poll() is None:
            try:
                self.process.stdin.write('{"do": "quit"}\n')
                self.process.stdin.close()
                self.process.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()


def deltachat_meter(box, venv, pairs):
    """bench/dc_meter.py as an Agent in container `box`, with the Delta Chat virtualenv
    (mounted at the same path): accounts for `pairs` (see there), one message a sample."""
    here = Path(__file__).resolve().parent
    script = ((here.parent / "tests" / "system" / "deltachat_pair.py").read_text()
              + (here / "dc_meter.py").read_text())
    box.run("cat >/root/dc_meter.py", input=script)
    # The container's python3 with the venv's packages (pure Python, and the rpc server a
    # static binary): the venv's own interpreter, Debian 12's 3.11, is not in Debian 13.
    [site] = Path(venv).glob("lib/python3*/site-packages")
    return Agent(box, [f"PYTHONPATH={site}", "python3", "/root/dc_meter.py",
                       pairs[0]["sender"][0], str(venv), json.dumps(pairs)], "dc_meter.py")


def relay_journal(box, since):
    """(unix time, line) of the mail daemons' journal in `box` since unix time `since`;
    the clock is the host's, as the clients' (containers share the kernel)."""
    # Postfix logs under postfix@- on Debian 12, under postfix itself on Debian 13
    out = box.run(f"journalctl --since @{since:.0f} -o short-unix --no-pager -u postfix "
                  "-u postfix@- -u dovecot -u filtermail -u filtermail-incoming",
                  check=False).stdout
    lines = []
    for line in out.splitlines():
        stamp, _, rest = line.partition(" ")
        try:
            lines.append((float(stamp), rest))
        except ValueError:
            continue
    return lines


def wait_until_status_is_good(box, timeout=120, interval=1.0):
    """Until `chatmail status` in `box` says all is well; RuntimeError with its report
    after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while box.run("chatmail status", check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(box.run("chatmail status", check=False).stdout)
        time.sleep(interval)


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
