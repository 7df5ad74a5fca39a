#!/usr/bin/python3
"""Benchmark doveauth and lastlogin as Dovecot uses them, over their unix sockets.

Measures account creations/s (first logins), logins/s of existing accounts (passdb
lookups over several concurrent connections, as Dovecot's auth workers make them),
lastlogin updates/s, and the idle resident memory (VmRSS) of both daemons.

    python3 bench/bench_doveauth.py [--out bench/results/doveauth.md] [--seconds 5]

Goals: >= 200 existing-account logins/s, < 30 MB RSS idle for each daemon.
"""

import argparse
import datetime
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from chatmaild.config import default_config_text  # noqa: E402
from chatmaild.dictproxy import tab_escape  # noqa: E402
from common import machine_facts

DOMAIN = "bench.example.org"
PASSWORD = 'bench"pass\\word\'12'
LOGIN_GOAL = 200
RSS_GOAL_MB = 30


def escape_e(text):
    """Dovecot's %E escaping of the passdb key fields."""
    return "".join("\\" + char if char in "\\\"'" else char for char in text)


def passdb_line(addr, password):
    key = f'shared/passdb/{escape_e(password)}"{escape_e(addr)}'
    return f"L{tab_escape(key)}\t{addr}\n".encode()


class Connection:
    """One Dovecot dict-client connection."""

    def __init__(self, socket_path, hello):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(str(socket_path))
        self.rfile = self.sock.makefile("rb")
        self.sock.sendall(hello)

    def request(self, line):
        self.sock.sendall(line)
        return self.rfile.readline()

    def close(self):
        self.rfile.close()
        self.sock.close()


def start_daemon(name, socket_path, ini, python):
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [python, "-m", f"chatmaild.{name}", str(socket_path), str(ini)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    deadline = time.monotonic() + 15
    while not socket_path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{name} did not start")
        time.sleep(0.02)
    return proc


def rss_mb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def run_parallel(connections, lines_per_connection):
    """Send each connection its lines (one request at a time, like Dovecot does) from its
    own thread; returns (requests, seconds, failed replies)."""
    failures = []
    barrier = threading.Barrier(len(connections) + 1)

    def work(connection, lines):
        barrier.wait()
        for line in lines:
            reply = connection.request(line)
            if not reply.startswith(b"O"):
                failures.append(reply)

    threads = [threading.Thread(target=work, args=pair)
               for pair in zip(connections, lines_per_connection)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    return sum(map(len, lines_per_connection)), elapsed, failures


def bench_creations(socket_path, count, concurrency):
    connections = [Connection(socket_path, b"H3\t2\t0\t\tauth\n") for _ in range(concurrency)]
    addrs = [f"new{i:06d}@{DOMAIN}" for i in range(count)]
    lines = [[passdb_line(addr, PASSWORD) for addr in addrs[i::concurrency]]
             for i in range(concurrency)]
    total, elapsed, failures = run_parallel(connections, lines)
    for connection in connections:
        connection.close()
    assert not failures, failures[:3]
    return addrs, total / elapsed


def bench_logins(socket_path, addrs, seconds, concurrency):
    """Logins of existing accounts, repeated for about `seconds`."""
    connections = [Connection(socket_path, b"H3\t2\t0\t\tauth\n") for _ in range(concurrency)]
    per_round = [[passdb_line(addr, PASSWORD) for addr in addrs[i::concurrency]]
                 for i in range(concurrency)]
    done, spent = 0, 0.0
    while spent < seconds:
        total, elapsed, failures = run_parallel(connections, per_round)
        assert not failures, failures[:3]
        done, spent = done + total, spent + elapsed
    for connection in connections:
        connection.close()
    return done / spent


def bench_lastlogin(socket_path, addrs, concurrency):
    connections = [Connection(socket_path, b"H3\t2\t0\t\tlastlogin\n")
                   for _ in range(concurrency)]
    now = int(time.time())

    def transaction(index, addr):
        return (f"B{index}\t{addr}\nS{index}\tshared/last-login/{addr}\t{now}\n"
                f"C{index}\n").encode()

    lines = [[transaction(n, addr) for n, addr in enumerate(addrs[i::concurrency])]
             for i in range(concurrency)]
    total, elapsed, failures = run_parallel(connections, lines)
    for connection in connections:
        connection.close()
    assert not failures, failures[:3]
    return total / elapsed


def run(python, seconds, creations, concurrency):
    workdir = Path(tempfile.mkdtemp(prefix="bench-doveauth-", dir="/tmp"))
    try:
        ini = workdir / "chatmail.ini"
        ini.write_text(default_config_text(
            DOMAIN, mailboxes_dir=workdir / "mail", passdb_path=workdir / "passdb.sqlite",
            max_load_1m="99999", min_available_memory="0", min_free_disk_space="0",
        ))
        (workdir / "mail").mkdir()
        auth = start_daemon("doveauth", workdir / "auth.sock", ini, python)
        lastlogin = start_daemon("lastlogin", workdir / "lastlogin.sock", ini, python)
        try:
            time.sleep(0.5)
            results = {
                "python": subprocess.run([python, "--version"], capture_output=True,
                                         text=True).stdout.strip(),
                "rss_start_doveauth": rss_mb(auth.pid),
                "rss_start_lastlogin": rss_mb(lastlogin.pid),
            }
            addrs, results["creations"] = bench_creations(
                workdir / "auth.sock", creations, concurrency)
            results["logins"] = bench_logins(workdir / "auth.sock", addrs, seconds, concurrency)
            results["logins_1conn"] = bench_logins(workdir / "auth.sock", addrs, seconds / 2, 1)
            results["lastlogin"] = bench_lastlogin(
                workdir / "lastlogin.sock", addrs, concurrency)
            time.sleep(0.5)
            results["rss_after_doveauth"] = rss_mb(auth.pid)
            results["rss_after_lastlogin"] = rss_mb(lastlogin.pid)
        finally:
            for proc in (auth, lastlogin):
                proc.terminate()
                proc.wait(10)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def libxcrypt_version():
    """The crypt(3) doveauth hashes with: its hashing cost is most of a creation's."""
    if not shutil.which("dpkg-query"):
        return "(not a Debian system)"
    return subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "libcrypt1"],
                          capture_output=True, text=True).stdout or "(not installed)"


def report(all_results, machine, creations, concurrency, seconds):
    lines = [
        "# doveauth / lastlogin benchmark",
        "",
        f"Date: {datetime.date.today().isoformat()}  ",
        f"Machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['memory']} RAM, "
        f"{machine['os']}, kernel {machine['kernel']}  ",
        f"Command: `python3 bench/bench_doveauth.py` ({creations} first logins, then "
        f"passdb lookups of those accounts for {seconds:g} s over {concurrency} concurrent "
        "connections and for half as long over 1; lastlogin: one transaction per account).",
        "",
        f"Goals: >= {LOGIN_GOAL} existing-account logins/s, < {RSS_GOAL_MB} MB VmRSS idle.",
        "",
        "The load generator (Python threads) shares the machine with the daemons, so the "
        "rates are lower bounds. A creation asks crypt(3) whether it takes the password "
        "(one hash of 1000 rounds), hashes it (SHA512-CRYPT, 5000 rounds, the system's "
        f"crypt(3) through ctypes: libxcrypt {libxcrypt_version()}) and fsyncs the password "
        "file.",
        "",
        "| Python | creations/s | logins/s | logins/s (1 conn) | lastlogin tx/s "
        "| doveauth RSS idle (after load) | lastlogin RSS idle (after load) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in all_results:
        lines.append(
            f"| {r['python']} | {r['creations']:.0f} | {r['logins']:.0f} "
            f"| {r['logins_1conn']:.0f} | {r['lastlogin']:.0f} "
            f"| {r['rss_start_doveauth']:.1f} MB ({r['rss_after_doveauth']:.1f} MB) "
            f"| {r['rss_start_lastlogin']:.1f} MB ({r['rss_after_lastlogin']:.1f} MB) |"
        )
    ok = all(r["logins"] >= LOGIN_GOAL and max(
        r["rss_start_doveauth"], r["rss_start_lastlogin"]) < RSS_GOAL_MB for r in all_results)
    lines += ["", f"Goals met: {'yes' if ok else 'NO'}", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/doveauth.md")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--creations", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--python", action="append",
                        help="interpreter(s) to run the daemons with (default: this one)")
    args = parser.parse_args()
    pythons = args.python or [sys.executable]
    all_results = [run(python, args.seconds, args.creations, args.concurrency)
                   for python in pythons]
    text = report(all_results, machine_facts(), args.creations, args.concurrency,
                  args.seconds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
