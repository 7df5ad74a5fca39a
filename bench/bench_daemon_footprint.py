#!/usr/bin/python3
"""Our five daemons alone, from two versions of chatmaild/ side by side: this checkout's
and git revision REV's, started in turns on the same machine (alternating which goes
first), as the units start them (`from chatmaild.X import main`), each version
byte-compiled beforehand as the package is. Per daemon RSS, PSS and USS at rest, and again
after each daemon's first use over its own protocol (doveauth: a new account's login;
lastlogin: its day; chatmail-metadata: a push token, TURN credentials, a push to a local
HTTP server; filtermail: one encrypted message out, reinjected into a local SMTP sink;
filtermail-incoming: one unsigned message in, refused by its DKIM check). On this host's
Debian (12) and in tests/chroot.sh's Debian 13, which needs no container and no lock.
PSS divides the pages the five share among them (the measuring python3 shares some too,
equally for both versions). bench_footprint.py measures the same in an installed relay.

Needs root (the chroot). Usage: bench_daemon_footprint.py [REV] [--rounds N]
(default: main, 5 rounds). Writes bench/results/footprint-daemons.md and .json."""

import argparse
import json
import os
import shutil
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = "build/daemon-footprint"  # inside the checkout: the chroot sees it at /src
DOMAIN = "fp.example.org"
PASSWORD = "footprint-password-1"
DAEMONS = ("doveauth", "lastlogin", "chatmail-metadata", "filtermail",
           "filtermail-incoming")
VERSIONS = ("baseline", "this")
SETTLE = 3  # seconds at rest after all five serve


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def memory(pid):
    """RSS (VmRSS), PSS and USS (private clean + dirty) in kB."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(status.split("VmRSS:")[1].split()[0])
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        values[key] = int(value.split()[0])
    return {"rss": rss, "pss": values["Pss"],
            "uss": values["Private_Clean"] + values["Private_Dirty"]}


class PushSink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


class ReinjectSink:
    """Postfix's reinjection ports: every message answered 250 (an aiosmtpd server)."""

    async def handle_DATA(self, server, session, envelope):
        return "250 OK"


class Daemons:
    """The five daemons of one chatmaild/ tree, with their state in a temporary folder."""

    def __init__(self, tree, sinks):
        self.tmp = Path(tempfile.mkdtemp(prefix="daemon-footprint-"))
        sys.path.insert(0, str(REPO))
        from chatmaild.config import default_config_text
        self.ports = {"out": free_port(), "in": free_port()}
        self.ini = self.tmp / "chatmail.ini"
        self.ini.write_text(default_config_text(
            DOMAIN, mailboxes_dir=self.tmp / "mail", passdb_path=self.tmp / "passdb.sqlite",
            turn_secret_path=self.tmp / "turn-secret",
            filtermail_smtp_port=self.ports["out"],
            filtermail_smtp_port_incoming=self.ports["in"],
            postfix_reinject_port=sinks["reinject"],
            postfix_reinject_port_incoming=sinks["reinject"],
            notification_url=f"http://127.0.0.1:{sinks['push']}/notify"))
        (self.tmp / "mail").mkdir()
        (self.tmp / "turn-secret").write_text("footprint-turn-secret\n")
        env = dict(os.environ, PYTHONPATH=str(tree))
        self.procs = {}
        for name in DAEMONS:
            module = {"chatmail-metadata": "metadata",
                      "filtermail-incoming": "filtermail"}.get(name, name)
            args = ([str(self.ini), "incoming" if name.endswith("incoming") else "outgoing"]
                    if module == "filtermail" else [str(self.socket(name)), str(self.ini)])
            code = f"import re, sys\nfrom chatmaild.{module} import main\nsys.exit(main())"
            # cwd: not the checkout, whose chatmaild/ would come first on sys.path
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-c", code, *args], env=env, cwd=self.tmp,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_serving()

    def socket(self, name):
        return self.tmp / f"{name}.sock"

    def connectable(self, name):
        family = socket.AF_INET if name.startswith("filtermail") else socket.AF_UNIX
        address = (("127.0.0.1", self.ports["in" if name.endswith("incoming") else "out"])
                   if family == socket.AF_INET else str(self.socket(name)))
        with socket.socket(family) as sock:
            try:
                sock.connect(address)
                return True
            except OSError:
                return False

    def wait_serving(self, timeout=30):
        deadline = time.monotonic() + timeout
        for name, proc in self.procs.items():
            while not self.connectable(name):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start (exit {proc.poll()})")
                time.sleep(0.05)

    def measure(self):
        return {name: memory(proc.pid) for name, proc in self.procs.items()}

    def dict_request(self, name, *lines):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(str(self.socket(name)))
            sock.sendall("".join(line + "\n" for line in lines).encode())
            return sock.makefile("rb").readline().decode()

    def use(self, number):
        """Each daemon's first use; returns what each answered."""
        addr = f"fpuse{number:04d}@{DOMAIN}"  # doveauth: 9 characters
        answers = {
            "doveauth": self.dict_request("doveauth", f'Lshared/passdb/{PASSWORD}"{addr}')[:1],
            "lastlogin": self.dict_request(
                "lastlogin", f"B1\t{addr}", f"S1\tshared/last-login/{addr}\t{int(time.time())}",
                "C1")[:1],
            "chatmail-metadata": "".join(self.dict_request("chatmail-metadata", *lines)[:1]
                                         for lines in (
                [f"B1\t{addr}", "S1\tpriv/0/devicetoken\tfootprint-token", "C1"],
                ["Lshared/0/vendor/vendor.dovecot/pvt/server/vendor/deltachat/turn\t" + addr],
                [f"B2\t{addr}", "S2\tpriv/0/messagenew\t", "C2"])),
        }
        sys.path.insert(0, str(BENCH))
        from relay_meter import message
        for name, sender in (("filtermail", addr), ("filtermail-incoming", "a@example.org")):
            port = self.ports["in" if name.endswith("incoming") else "out"]
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
                    smtp.sendmail(sender, [addr], message(sender, addr, number))
                answers[name] = "250"
            except smtplib.SMTPException as refused:
                answers[name] = str(getattr(refused, "smtp_code", refused))
        time.sleep(1)  # the push, in the metadata daemon's worker thread
        return answers

    def stop(self):
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            proc.wait(10)
        shutil.rmtree(self.tmp, ignore_errors=True)


def measure_here(work, rounds):
    """Runs where the daemons run (host or chroot): JSON of every round on stdout."""
    from aiosmtpd.controller import Controller

    trees = {version: Path(work).resolve() / version for version in VERSIONS}
    for tree in trees.values():
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree)], check=True)
    push = ThreadingHTTPServer(("127.0.0.1", 0), PushSink)
    threading.Thread(target=push.serve_forever, daemon=True).start()
    reinject = Controller(ReinjectSink(), hostname="127.0.0.1", port=free_port())
    reinject.start()
    sinks = {"push": push.server_address[1], "reinject": reinject.port}
    runs = []
    for number in range(rounds):
        order = VERSIONS if number % 2 == 0 else VERSIONS[::-1]
        for version in order:
            daemons = Daemons(trees[version], sinks)
            try:
                time.sleep(SETTLE)
                at_rest = daemons.measure()
                answers = daemons.use(number)
                time.sleep(SETTLE)
                runs.append({"round": number, "version": version, "at_rest": at_rest,
                             "answers": answers, "after_use": daemons.measure()})
            finally:
                daemons.stop()
    reinject.stop()
    push.shutdown()
    print(json.dumps({"python": sys.version.split()[0], "runs": runs}))


def prepare(ref):
    work = REPO / WORK
    if work.exists():
        shutil.rmtree(work)
    (work / "baseline").mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "chatmaild"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(work / "baseline")], input=archive, check=True)
    shutil.copytree(REPO / "chatmaild", work / "this" / "chatmaild",
                    ignore=shutil.ignore_patterns("__pycache__"))


def versions(where):
    command = ["dpkg-query", "-W", "python3", "python3-aiosmtpd", "python3-dkim",
               "python3-dnspython"]
    if where == "trixie":
        command = [str(REPO / "tests" / "chroot.sh"), *command]
    out = subprocess.run(command, capture_output=True, text=True).stdout
    return ", ".join(" ".join(line.split("\t")) for line in out.splitlines())


def run(where, rounds):
    command = [sys.executable, str(BENCH / "bench_daemon_footprint.py"), "--measure", WORK,
               "--rounds", str(rounds)]
    if where == "trixie":
        command = [str(REPO / "tests" / "chroot.sh"), "python3",
                   "bench/bench_daemon_footprint.py", "--measure", WORK, "--rounds",
                   str(rounds)]
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    found["versions"] = versions(where)
    return found


def mb(kb):
    return f"{kb / 1024:.1f}"


def table(runs, phase, ref):
    def median(version, field, name=None):
        return statistics.median(
            run[phase][name][field] if name else sum(d[field] for d in run[phase].values())
            for run in runs if run["version"] == version)

    lines = [f"| daemon | RSS {ref} | RSS this | PSS {ref} | PSS this | USS {ref} | "
             "USS this |", "|---|---|---|---|---|---|---|"]
    for name in (*DAEMONS, None):
        cells = [mb(median(version, field, name)) for field in ("rss", "pss", "uss")
                 for version in VERSIONS]
        if name is None:
            cells = [f"**{cell}**" for cell in cells]
        lines.append(f"| {name or '**together**'} | " + " | ".join(cells) + " |")
    return lines


def report(results, ref, rounds, facts):
    lines = ["# Footprint of our five daemons, two versions side by side", "",
             f"Measured by `bench/bench_daemon_footprint.py {ref} --rounds {rounds}` on "
             f"{facts['date']}.", "",
             f"- machine: {facts['nproc']} CPUs ({facts['cpu']}), {facts['memory']}, "
             f"Linux {facts['kernel']}, host {facts['os']}",
             f"- {ref}: chatmaild/ of that revision; this: the checkout's; {rounds} rounds "
             "of each, alternating which starts first; medians (MB)",
             "- the daemons started directly (no systemd, no Dovecot connected), "
             f"{SETTLE} s at rest, then their first use (see the script's docstring), "
             f"{SETTLE} s, measured again", ""]
    for where, label in (("bookworm", "Debian 12 (this host)"),
                         ("trixie", "Debian 13 (tests/chroot.sh)")):
        found = results[where]
        lines += [f"## {label}", "", f"Python {found['python']}; {found['versions']}", "",
                  "At rest:", ""]
        lines += table(found["runs"], "at_rest", ref)
        lines += ["", "After the first use (answers: "
                  f"{json.dumps(found['runs'][0]['answers'])}):", ""]
        lines += table(found["runs"], "after_use", ref) + [""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ref", nargs="?", default="main",
                        help="the git revision to compare with (default: main)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--measure", metavar="WORK", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.measure:
        return measure_here(options.measure, options.rounds)
    if os.geteuid() != 0:
        sys.exit("needs root (tests/chroot.sh)")
    sys.path.insert(0, str(BENCH))
    from common import machine_facts, write_results
    prepare(options.ref)
    results = {where: run(where, options.rounds) for where in ("bookworm", "trixie")}
    write_results("footprint-daemons", report(results, options.ref, options.rounds,
                                              machine_facts()), results)
    shutil.rmtree(REPO / WORK)
    return None


if __name__ == "__main__":
    sys.exit(main())
