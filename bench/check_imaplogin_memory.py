#!/usr/bin/env python3
"""An experiment, not a benchmark of the relay as shipped: what one IMAP-over-TLS
connection costs Dovecot's imap-login, and which part of it depends on what. After a
login over TLS, imap-login stays in the connection: it holds the TLS session and relays
the plaintext to the imap (or imap-hibernate) process. bench_capacity.py measured that
cost at 71.6 KB on Debian 12 and 94.7 KB on Debian 13; this separates the variants.

One relay per release (README's install in a fresh container); for each variant Dovecot
is restarted (fresh imap-login processes), bench/imaplogin_meter.py opens COUNT
connections on 993 and measures the imap-login processes before and while they are held.
Variants, in alternating rounds:
  - logged in: the client as bench_capacity.py's (Debian's python3, its OpenSSL's
    default key exchange groups);
  - logged in, client offers X25519 only (no ML-KEM hybrid key share);
  - logged in, the server limited to X25519 and P-256 (ssl_curve_list in local.conf);
  - greeted only: TLS handshake and greeting, no login.
--heaptrack DIR: afterwards imap-login runs under heaptrack (one process) and the peak's
largest allocators are printed; DIR/bookworm/ and DIR/trixie/ hold that release's .debs
(`apt-get download` of heaptrack, libheaptrack, libunwind8, libboost-filesystem,
-iostreams, -program-options and -atomic of its Boost version, libdw1 and libelf1, on
Debian 13 libdw1t64 and libelf1t64), copied into the container and installed with dpkg.
Needs root and `make build`; run under the system tests' lock.
Usage: check_imaplogin_memory.py [--suites trixie,bookworm] [--rounds 2] [COUNT]
(default 1000). Writes bench/results/imaplogin-memory.md and .json (with --rounds 0 and
--heaptrack, only the profile: imaplogin-heaptrack.md)."""

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from tests.system.test_install import DOMAIN, INSTALL  # noqa: E402

from bench_capacity import slope  # noqa: E402
from common import (BENCH_MOUNT, booted, installed_dovecot_version,  # noqa: E402
                    machine_facts, write_results)

LOCAL = "/etc/dovecot/local.conf"
# label: (imaplogin_meter.py options, lines for local.conf)
VARIANTS = {
    "logged in": ("", ""),
    "logged in, client X25519 only": ("--groups X25519", ""),
    "logged in, server X25519:prime256v1": ("", "ssl_curve_list = X25519:prime256v1"),
    "greeted only": ("--greet-only", ""),
}


def measure(box, count, options, local):
    box.run(f"printf '%s\\n' '{local}' > {LOCAL}" if local else f"rm -f {LOCAL}")
    box.run("systemctl restart dovecot")
    end = time.monotonic() + 60
    listening = "python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 993), 1)'"
    while box.run(listening, check=False).returncode:
        if time.monotonic() > end:
            raise RuntimeError("dovecot did not listen on 993")
        time.sleep(0.5)
    time.sleep(3)  # process_min_avail's imap-login processes started
    out = box.run(f"python3 {BENCH_MOUNT}/imaplogin_meter.py {DOMAIN} {count} {options}",
                  timeout=900, check=False)
    if out.returncode:
        raise RuntimeError(f"imaplogin_meter.py exited {out.returncode}: {out.stderr[-3000:]}")
    found = json.loads(out.stdout.strip().splitlines()[-1])
    held = max(found["held"], 1)
    found["pss_per_conn"] = (found["held_mem"]["pss_kb"] - found["before"]["pss_kb"]) / held
    points = [(p["fds"] / 2, p["heap_kb"]) for p in found["per_process"]]
    found["heap_slope"] = slope(points)[0] if len(points) > 2 else None
    return found


WRAPPER = "/usr/local/sbin/imap-login-heaptrack"
HEAPTRACK_CONF = f"""service imap-login {{
  executable = {WRAPPER}
  process_min_avail = 1
}}"""


def profile(box, count, debs):
    """imap-login under heaptrack (Debian's package; its .debs and their dependencies in
    `debs`, copied into the container), one process holding `count` logged-in
    connections: the largest heap consumers at the peak, by call stack."""
    target = box.root / "var/tmp/ht-debs"
    target.mkdir(parents=True, exist_ok=True)
    for deb in debs.glob("*.deb"):
        (target / deb.name).write_bytes(deb.read_bytes())
    box.run("dpkg -i /var/tmp/ht-debs/*.deb >/dev/null && mkdir -p /var/lib/ht "
            "&& rm -f /var/lib/ht/*")
    box.run(f"cat > {WRAPPER} && chmod 755 {WRAPPER}",
            input="#!/bin/sh\nexec heaptrack -o /var/lib/ht/imap-login.$$ "
                  "/usr/lib/dovecot/imap-login \"$@\"\n")
    # not /var/tmp: dovecot.service has a private one (PrivateTmp)
    found = measure(box, count, "", HEAPTRACK_CONF)
    running = box.run("pgrep -c heaptrack_inter", check=False).stdout.strip()
    box.run("systemctl stop dovecot")
    time.sleep(5)
    out = box.run("for f in /var/lib/ht/imap-login.*; do echo \"== $f\"; "
                  "heaptrack_print -f \"$f\" --print-peaks 1 --print-allocators 0 "
                  "--print-temporary 0 --print-leaks 0 --peak-limit 25 "
                  "--sub-peak-limit 6 2>&1 | head -1500; done", check=False, timeout=600)
    box.run(f"rm -f {LOCAL}")
    return {"pss_per_conn": found["pss_per_conn"], "held": found["held"], "running": running,
            "print": out.stdout[-60000:]}


def run_suite(suite, count, rounds, heaptrack=None):
    box = booted("iml", suite)
    results = {label: [] for label in VARIANTS}
    try:
        box.run(INSTALL, timeout=900)
        end = time.monotonic() + 120
        while box.run("chatmail status", check=False).returncode != 0:
            if time.monotonic() > end:
                raise RuntimeError(box.run("chatmail status", check=False).stdout)
            time.sleep(1)
        facts = {"dovecot": installed_dovecot_version(box),
                 "openssl": box.run("openssl version").stdout.strip(),
                 "glibc": box.run("dpkg-query -W -f '${Version}' libc6").stdout,
                 "python": box.run("python3 --version").stdout.strip()}
        box.run("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
                "-keyout /tmp/tls-key.pem -out /tmp/tls-cert.pem -days 2 -subj /CN=test "
                "2>/dev/null")
        out = box.run(f"python3 {BENCH_MOUNT}/tls_object_meter.py /tmp/tls-cert.pem "
                      "/tmp/tls-key.pem 2000")
        facts["tls_objects"] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{suite}: {facts['tls_objects']}", file=sys.stderr, flush=True)
        measure(box, count, "", "")  # creates the accounts: every round logs in the same
        # Python 3.11's ssl (Debian 12) sets no X25519 alone; OpenSSL 3.0 offers it first
        variants = [label for label in VARIANTS
                    if suite != "bookworm" or "client X25519" not in label]
        for round_ in range(rounds):
            labels = variants if round_ % 2 == 0 else list(reversed(variants))
            for label in labels:
                options, local = VARIANTS[label]
                found = measure(box, count, options, local)
                print(f"{suite} round {round_} {label}: {found['pss_per_conn']:.1f} KB PSS, "
                      f"heap slope {found['heap_slope']}, held {found['held']}, "
                      f"{found['tls']}, failures {found['failures']}", file=sys.stderr,
                      flush=True)
                results[label].append(found)
        box.run(f"rm -f {LOCAL}")
        if heaptrack:
            facts["heaptrack"] = profile(box, count, Path(heaptrack) / suite)
            print(facts["heaptrack"]["print"][:20000], file=sys.stderr, flush=True)
    finally:
        box.stop()
    return facts, results


def report(options, facts_host, suites):
    lines = ["# Experiment: what one IMAP-over-TLS connection costs imap-login", "",
             f"Measured by `bench/check_imaplogin_memory.py --suites {options.suites} "
             f"--rounds {options.rounds} "
             + ("--heaptrack DIR " if options.heaptrack else "")
             + f"{options.count}` on {facts_host['date']}, "
             f"{facts_host['nproc']} CPUs ({facts_host['cpu']}), Linux {facts_host['kernel']}. "
             "One relay per release (README's install, fresh container); Dovecot restarted "
             f"before each variant; {options.count} connections on 993 from "
             "bench/imaplogin_meter.py inside the container; variants alternate by round.",
             "", "Per connection, KB: the imap-login processes' PSS (held - before) / held; "
             "in parentheses the slope of one process's resident heap over its connections "
             "(least squares across the processes). One value per round.", ""]
    for suite, (facts, results) in suites.items():
        lines += [f"## {suite}: Dovecot `{facts['dovecot']}`, {facts['openssl']}, glibc "
                  f"{facts['glibc']}, client {facts['python']}", ""]
        if any(results.values()):
            lines += ["| variant | held | negotiated | PSS KB per connection (heap slope) |",
                      "|---|---|---|---|"]
        for label, runs in results.items():
            if not runs:
                continue
            tls = runs[0]["tls"] or {}
            values = ", ".join(f"{r['pss_per_conn']:.1f} ({r['heap_slope'] or 0:.1f})"
                               for r in runs)
            lines.append(f"| {label} | {runs[0]['held']} | {tls.get('version')} "
                         f"{tls.get('cipher')} | {values} |")
        tls = facts.get("tls_objects")
        if tls:
            lines += ["", f"The same OpenSSL without Dovecot (bench/tls_object_meter.py, "
                      f"{tls['openssl']}): memory kept per server connection after the "
                      "handshake, KB: " + ", ".join(f"{label} {value['kb']}"
                                                    for label, value in tls.items()
                                                    if label != "openssl")]
        profile_ = facts.get("heaptrack")
        if profile_:
            lines += ["", f"imap-login under heaptrack, one process, {profile_['held']} "
                      f"logged-in connections ({profile_['pss_per_conn']:.1f} KB PSS per "
                      "connection with heaptrack's own overhead); the peak's largest "
                      "consumers:", "", "```", profile_["print"].strip()[:30000], "```"]
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("count", type=int, nargs="?", default=1000)
    parser.add_argument("--suites", default="trixie,bookworm")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--heaptrack", metavar="DIR",
                        help="DIR/SUITE/ holds Debian's heaptrack .debs with dependencies")
    options = parser.parse_args()
    facts_host = machine_facts()
    suites = {}
    for suite in options.suites.split(","):
        suites[suite] = run_suite(suite, options.count, options.rounds, options.heaptrack)
        data = {suite: {"facts": facts, "results": results}
                for suite, (facts, results) in suites.items()}
        write_results("imaplogin-memory" if options.rounds else "imaplogin-heaptrack",
                      report(options, facts_host, suites), data)


if __name__ == "__main__":
    main()
