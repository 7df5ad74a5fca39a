#!/usr/bin/python3
"""Incoming mail while other senders' DKIM zones never answer: filtermail before and after
the asynchronous key lookups, side by side in one run.

    bench/bench_dkim_stall.py [--before REV] [--stalled N] [--signatures N] [--write PATH]
    (needs root)

A real resolver (Unbound on a loopback address) resolves `sender.example` from NSD and
sends queries for `stalled.example` to a socket that never answers. filtermail-incoming
runs as systemd starts it, with that resolver in its resolv.conf (a mount namespace of
its own). N messages signed by N different domains under stalled.example are sent at
once, each with several aligned signatures; 2 s later a message validly signed by
sender.example follows. Recorded: how long
the valid message waits for its 250, and when and with what each stalled one is answered.
`--before` names the git revision whose chatmaild is the "before" column (default: the
last commit before the asynchronous lookups). Results go to bench/results/dkim-stall.md.
"""

import argparse
import os
import smtplib
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from chatmaild.config import default_config_text  # noqa: E402
from common import machine_facts, percentile  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.unit.dkimkeys import dkim_signed, generate_rsa_key, zone_txt  # noqa: E402
from tests.unit.mailfactory import OpenPGP, encrypted_mail  # noqa: E402
from tests.unit.nsd import Nsd  # noqa: E402
from tests.unit.smtpsink import SmtpSink  # noqa: E402
from tests.unit.unbound import Unbound  # noqa: E402

BEFORE = "e0d0b00"
DOMAIN = "chat.example.org"
RECIPIENT = f"bob@{DOMAIN}"
VALID_SENDER = "dave@sender.example"


def timed_send(port, sender, mail):
    """(SMTP code of the answer to DATA or 'timeout', seconds until that answer)."""
    started = time.monotonic()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=300) as client:
            client.sendmail(sender, [RECIPIENT], mail)
            code = 250
    except smtplib.SMTPDataError as exc:
        code = exc.smtp_code
    except (OSError, smtplib.SMTPException):
        code = "timeout"
    return code, time.monotonic() - started


def start_filtermail(tree, workdir, resolver, sink):
    port = free_port()
    ini = workdir / "chatmail.ini"
    ini.write_text(default_config_text(
        DOMAIN, mailboxes_dir=workdir / "mail", passdb_path=workdir / "passdb.sqlite",
        filtermail_smtp_port_incoming=port, postfix_reinject_port_incoming=sink.port))
    proc = subprocess.Popen(
        [*resolver.command_prefix(), "/usr/bin/python3", "-m", "chatmaild.filtermail",
         str(ini), "incoming"],
        # cwd too: `python3 -m` puts the working directory first on sys.path
        cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree)), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            smtplib.SMTP("127.0.0.1", port, timeout=1).quit()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("filtermail did not start")


def stalled_mail(sender, openpgp, key, signatures):
    """An encrypted message with `signatures` aligned signatures, each with a selector of
    its own: the filter tries every one (up to its limit) before it gives up."""
    selectors = [f"k{index}" for index in range(signatures)]
    return dkim_signed(encrypted_mail(sender, RECIPIENT, openpgp.encrypt()), key, selectors)


def run_scenario(tree, workdir, key, openpgp, args):
    """The valid message's (code, seconds) and the stalled ones' answers, with a fresh
    resolver: Unbound remembers unresponsive servers, which would favour a second run."""
    nsd = Nsd(workdir / "nsd", "sender.example",
              f"sel._domainkey IN TXT {zone_txt(key[1])}\n", free_port())
    nsd.wait_ready()
    resolver = Unbound(workdir / "unbound", {"sender.example": nsd.port},
                       stalled=["stalled.example"])
    resolver.wait_ready()
    sink = SmtpSink()
    proc, port = start_filtermail(tree, workdir, resolver, sink)
    try:
        senders = [f"mallory@s{n}.stalled.example" for n in range(args.stalled)]
        stalled = [stalled_mail(sender, openpgp, key, args.signatures) for sender in senders]
        valid = dkim_signed(encrypted_mail(VALID_SENDER, RECIPIENT, openpgp.encrypt()), key)
        with ThreadPoolExecutor(args.stalled) as pool:
            waiting = [pool.submit(timed_send, port, sender, mail)
                       for sender, mail in zip(senders, stalled)]
            time.sleep(2)
            valid_answer = timed_send(port, VALID_SENDER, valid)
            stalled_answers = [answer.result() for answer in waiting]
    finally:
        proc.terminate()
        proc.wait(30)
        sink.stop()
        resolver.stop()
        nsd.stop()
    return valid_answer, stalled_answers


def summary(label, valid, stalled):
    codes = sorted({str(code) for code, _ in stalled})
    times = [seconds for _, seconds in stalled]
    return (f"| {label} | {valid[0]} after {valid[1]:.2f} s | {', '.join(codes)} | "
            f"{percentile(times, 0.5):.1f} s | {max(times):.1f} s |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BEFORE)
    parser.add_argument("--stalled", type=int, default=50)
    parser.add_argument("--signatures", type=int, default=5,
                        help="aligned signatures on each stalled message")
    parser.add_argument("--write", default=str(REPO / "bench/results/dkim-stall.md"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (resolver on port 53, mount namespace)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        before = tmp / "before"
        before.mkdir()
        subprocess.run(f"git -C {REPO} archive {args.before} chatmaild | tar -x -C {before}",
                       shell=True, check=True)
        key = generate_rsa_key()
        openpgp = OpenPGP(tmp)
        rows = []
        try:
            for run_id, (label, tree) in enumerate([(f"before ({args.before})", before),
                                                    ("after (this tree)", REPO)]):
                workdir = tmp / f"run{run_id}"
                workdir.mkdir()
                print(f"{label}: {args.stalled} stalled messages ...", flush=True)
                rows.append(summary(label, *run_scenario(tree, workdir, key, openpgp, args)))
                print(rows[-1], flush=True)
        finally:
            openpgp.close()
    facts = machine_facts()
    unbound_version = subprocess.run(["unbound", "-V"], capture_output=True,
                                     text=True).stdout.split()[1]
    text = "\n".join([
        "# Incoming mail while other senders' DKIM zones never answer",
        "",
        f"{facts['date']}, {facts['os']}, {facts['nproc']} cores ({facts['cpu']}), "
        f"Python {sys.version.split()[0]}, Unbound {unbound_version}; "
        "`bench/bench_dkim_stall.py`.",
        "",
        f"{args.stalled} messages from {args.stalled} different domains whose name servers "
        f"never answer, each with {args.signatures} aligned signatures (selectors of their "
        "own), sent at once; 2 s later a validly signed message from a domain whose DNS "
        "works. Each column with a fresh resolver.",
        "",
        "| filtermail | valid message | stalled messages answered with | median | last |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ])
    Path(args.write).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
