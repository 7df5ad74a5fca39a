"""Runs inside a bench container with Debian's python3 (bench_footprint.py): every
process's memory, grouped by its systemd unit. Prints one JSON object:
{"processes": [{pid, unit, comm, cmdline, rss_kb, pss_kb, uss_kb}...],
 "python": {label: RSS kB of a python3 that only imports that}}"""

import json
import re
import subprocess
import sys
from pathlib import Path


def unit_of(pid):
    text = Path(f"/proc/{pid}/cgroup").read_text()
    found = re.findall(r"/([^/]+\.(?:service|scope))", text)
    return found[-1] if found else "(none)"


def memory(pid):
    """VmRSS, and from smaps_rollup PSS and USS (private clean + dirty), in kB."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = re.search(r"^VmRSS:\s+(\d+)", status, re.M)
    if not rss:  # a kernel thread
        return None
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        values[key] = int(value.split()[0])
    return (int(rss.group(1)), values["Pss"],
            values["Private_Clean"] + values["Private_Dirty"])


def processes():
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or entry.name == str(Path("/proc/self").resolve().name):
            continue
        try:
            numbers = memory(entry.name)
            if numbers is None:
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            found.append({"pid": int(entry.name), "unit": unit_of(entry.name),
                          "comm": (entry / "comm").read_text().strip(), "cmdline": cmdline,
                          "rss_kb": numbers[0], "pss_kb": numbers[1],
                          "uss_kb": numbers[2]})
        except (OSError, ValueError):
            pass
    return found


# What a python3 costs before our code: the interpreter alone, and each library our
# daemons import, each in a fresh interpreter (max RSS, kB).
IMPORTS = {
    "python3 -S -c pass": None,
    "python3 (site)": "",
    "filelock": "import filelock",
    "psutil": "import psutil",
    "sqlite3": "import sqlite3",
    "email.parser": "import email.parser, email.policy",
    "importlib.resources": "from importlib import resources",
    "typing": "import typing",
    "dataclasses": "import dataclasses",
    "tempfile": "import tempfile",
    "argparse": "import argparse",
    "hmac (OpenSSL's libcrypto)": "import hmac",
    "http.client (ssl, email)": "import http.client",
    "asyncio": "import asyncio",
    "aiosmtpd": "import aiosmtpd.controller, aiosmtpd.smtp",
    "dns.resolver (dnspython)": "import dns.resolver",
    "dkim": "import dkim",
    "chatmaild.lastlogin": "import chatmaild.lastlogin",
    "chatmaild.doveauth": "import chatmaild.doveauth",
    "chatmaild.metadata": "import chatmaild.metadata",
    "chatmaild.filtermail": "import chatmaild.filtermail",
}


def import_costs():
    """VmRSS of a fresh python3 after the import, as it reports it itself (not ru_maxrss:
    the kernel carries the high-water mark of the process that forked it across exec)."""
    report = ("\nimport re; print(re.search(r'VmRSS:\\s+(\\d+)', "
              "open('/proc/self/status').read()).group(1))")
    costs = {}
    for label, code in IMPORTS.items():
        argv = (["python3", "-S", "-c", "pass" + report] if code is None else
                ["python3", "-c", (code or "pass") + report])
        out = subprocess.run(argv, capture_output=True, text=True)
        costs[label] = int(out.stdout.split()[-1]) if out.stdout.strip() else None
    return costs

if __name__ == "__main__":
    print(json.dumps({"processes": processes(),
                      "python": import_costs() if "--imports" in sys.argv else {}}))
