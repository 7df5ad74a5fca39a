#!/usr/bin/env python3
"""The relay alone, plain protocol clients (no Delta Chat): the time from the start of an
SMTP submission on port 465 (implicit TLS, authenticated sender) to the `* N EXISTS` the
recipient's IMAP IDLE receives, through smtpd, filtermail, Postfix's queue, LMTP and
Dovecot. Two cases: a recipient IDLE-ing for a moment, and recipients IDLE-ing longer
than the relay's imap_hibernate_timeout (30 s; hibernated, a phone's normal state).

Two relays side by side, each installed with README's commands in its own fresh container
(tests/system, private network): `ours` as installed (Debian's Dovecot with the
instant-IDLE plugin) and `stock` (the same, the plugin's .so diverted away with
dpkg-divert and `chatmail configure` run again, so Dovecot runs without it). Samples
alternate between the two, in random order, in one run. The clients run inside the
containers (bench/relay_meter.py, Debian's python3, TCP_NODELAY).

Needs root and `make build`. Usage:
  bench_relay_latency.py [--suite bookworm|trixie] [--tag TAG] [IDLE_SAMPLES [ROUNDS [PER_ROUND]]]
(defaults bookworm, 200 10 10). Writes bench/results/relay-latency-<debian12|debian13>[-TAG].md
and .json (every sample)."""

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from tests.system.container import Container, build_rootfs  # noqa: E402
from tests.system.test_install import DOMAIN, INSTALL  # noqa: E402

from common import (  # noqa: E402
    Agent, idle_status_line, installed_dovecot_version, machine_facts, percentile)

PLUGIN = "/usr/lib/dovecot/modules/lib20_chatmail_instant_idle_plugin.so"
HIBERNATE_TIMEOUT = 30  # the relay's imap_hibernate_timeout (conf/dovecot)
BENCH_MOUNT = "/srv/bench"
RELEASE = {"bookworm": "debian12", "trixie": "debian13"}

# Not for admins: one sender submits hundreds of messages a minute here.
UNLIMITED = ("chatmail set max_user_send_per_minute=100000 max_user_send_burst_size=100000"
             " >/dev/null && chatmail configure >/dev/null")
# Stock: Debian's Dovecot as it comes, the plugin's file moved aside (the package stays
# installed: chatmail-relay depends on it), the configuration rendered again without it.
WITHOUT_PLUGIN = (f"dpkg-divert --local --rename --divert {PLUGIN}.bench-disabled "
                  f"--add {PLUGIN} >/dev/null && chatmail configure >/dev/null")


class Relay:
    """One container with the relay installed, and relay_meter.py running inside it."""

    def __init__(self, label, suite):
        self.label, self.suite = label, suite
        self.box = self.container()
        self.agent = None
        self.error = None

    def container(self, attempt=0):
        return Container(f"lat-{self.label}-{os.getpid()}-{attempt}", build_rootfs(self.suite),
                         tempfile.mkdtemp(prefix=f"chatmail-lat-{self.label}-", dir="/var/tmp"),
                         binds=[(REPO / "bench", BENCH_MOUNT)], suite=self.suite)

    booting = threading.Lock()  # one at a time: both update the same apt lists

    def boot(self, attempts=3):
        """Boot, again in a new container when systemd does not answer (seen on this
        busy host: the container booted, but `systemctl is-system-running` never did) or
        the stand-in archive's apt lists were locked (by another test on the host)."""
        for attempt in range(attempts):
            try:
                with self.booting:
                    self.box.boot()
                return
            except Exception as error:  # noqa: BLE001 - the last one is raised
                print(f"{self.label}: boot attempt {attempt + 1} failed: {str(error)[:200]}",
                      file=sys.stderr)
                self.box.stop()
                if attempt == attempts - 1:
                    raise
                time.sleep(10)
                self.box = self.container(attempt + 1)

    def install(self):
        try:
            self.boot()
            self.box.run(INSTALL, timeout=900)
            self.box.run(UNLIMITED)
            if self.label == "stock":
                self.box.run(WITHOUT_PLUGIN)
            self.status = self.box.run("chatmail status", check=False).stdout
            self.dovecot = installed_dovecot_version(self.box)
            conf = self.box.run("doveconf -c /etc/dovecot/chatmail/dovecot.conf -n "
                                "-f protocol=imap", check=False).stdout
            self.plugins = ("chatmail_instant_idle" if "chatmail_instant_idle" in conf
                            else "(without chatmail_instant_idle)")
            self.status_line = idle_status_line(self.status)
        except Exception as error:  # noqa: BLE001 - raised in the main thread
            self.error = error

    meter = "relay_meter.py"  # the client in bench/ that start_agent runs inside

    def start_agent(self):
        self.agent = Agent(self.box, ["python3", f"{BENCH_MOUNT}/{self.meter}", DOMAIN],
                           f"{self.label}: {self.meter}")

    def ask(self, verb, **args):
        return self.agent.ask(verb, **args)

    def stop(self):
        if self.agent:
            self.agent.close(10)
        self.box.stop()


def install_pair(relays):
    """Install `ours` and `stock` (relays[0], relays[1]) in parallel; check each is what
    its name says."""
    threads = [threading.Thread(target=r.install) for r in relays]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in relays:
        if r.error:
            raise r.error
    assert "instant IDLE: plugin" in relays[0].status, relays[0].status
    assert "instant IDLE: plugin" not in relays[1].status, relays[1].status


def run(suite, samples, rounds, per_round):
    relays = [Relay("ours", suite), Relay("stock", suite)]
    runs = {r.label: {"idle": [], "hibernated": [], "imap_before_wake": []} for r in relays}
    try:
        install_pair(relays)
        for r in relays:
            r.since = r.box.run("date +%s").stdout.strip()
            r.start_agent()
            r.ask("setup", hibernating=per_round)
        for number in range(1, samples + 1):
            for r in random.sample(relays, len(relays)):
                runs[r.label]["idle"].append(r.ask("idle", number=number))
        for round_ in range(rounds):
            for r in relays:
                r.ask("arm")
            time.sleep(HIBERNATE_TIMEOUT + 5)
            for r in relays:
                runs[r.label]["imap_before_wake"].append(r.ask("imap_processes")["count"])
            for client in range(per_round):
                for r in random.sample(relays, len(relays)):
                    runs[r.label]["hibernated"].append(
                        r.ask("fire", client=client, number=1000 * (round_ + 1) + client))
        for r in relays:
            runs[r.label]["dovecot"] = r.dovecot
            runs[r.label]["plugins"] = r.plugins
            runs[r.label]["status"] = r.status_line
            runs[r.label]["problems"] = r.box.run(
                f"journalctl --since @{r.since} --no-pager -u dovecot -u postfix@- -u filtermail "
                "-u filtermail-incoming -u doveauth | grep -E 'Error|Warning|Panic|Fatal|"
                "warning:|error:|fatal:' | tail -5", check=False).stdout.strip()
    finally:
        for r in relays:
            r.stop()
    return runs


def ms(seconds):
    return f"{seconds * 1000:.1f}"


def row(label, case, samples, key="exists", since=None):
    values = [s[key] - (s[since] if since else 0) for s in samples]
    return (f"| {label} | {case} | {len(values)} | {ms(percentile(values, 0.5))} | "
            f"{ms(percentile(values, 0.95))} | {ms(min(values))} | {ms(max(values))} |")


def report(suite, args, runs, facts):
    samples, rounds, per_round = args
    lines = [
        f"# The relay alone: submission on 465 to IDLE's EXISTS ({RELEASE[suite]})",
        "",
        f"Measured by `bench/bench_relay_latency.py --suite {suite} {samples} {rounds} "
        f"{per_round}` on {facts['date']}.",
        "",
        f"- machine: {facts['nproc']} CPUs ({facts['cpu']}), {facts['memory']}, "
        f"Linux {facts['kernel']}, host {facts['os']}",
        f"- relays: two fresh {suite} containers (systemd-nspawn, private network), each "
        "installed with README's commands from dist/repo; Dovecot "
        f"`{runs['ours']['dovecot']}` (Debian's build) in both; `ours`: as installed, "
        f"imap mail_plugins with "
        f"`{runs['ours']['plugins']}`; `stock`: the plugin's .so diverted away and "
        f"`chatmail configure` run again, mail_plugins `{runs['stock']['plugins']}`; both: max_user_send_per_minute raised for the "
        "one sender",
        "- clients (bench/relay_meter.py, inside each container, Debian's python3, "
        "TCP_NODELAY): each sample a new SMTP connection to 465 (implicit TLS), AUTH "
        "PLAIN, one message in the form filtermail accepts (OpenPGP-encrypted), to a "
        "recipient whose IMAP connection (993, TLS) is in IDLE; the clock starts before "
        "the TCP connect and stops when the client reads `* N EXISTS`",
        f"- IDLE: one recipient, a new IDLE just before each of {samples} submissions",
        f"- hibernated: {per_round} recipients per relay IDLE {HIBERNATE_TIMEOUT + 5} s "
        f"(imap_hibernate_timeout = {HIBERNATE_TIMEOUT}s), then each gets one message; "
        f"{rounds} rounds",
        "- samples of the two relays alternate, in random order",
        "",
        "Submission start to EXISTS (ms):",
        "",
        "| relay | client | samples | median | p95 | min | max |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in ("idle", "hibernated"):
        for label in runs:
            lines.append(row(label, case, runs[label][case]))
    lines += ["", "The parts (ms, median / p95): connect = TCP + TLS handshake; "
              "auth = AUTH PLAIN; submit = MAIL, RCPT, DATA until smtpd's 250; "
              "deliver = from that 250 to the EXISTS.", "",
              "| relay | client | connect | auth | submit | deliver |", "|---|---|---|---|---|---|"]
    for case in ("idle", "hibernated"):
        for label in runs:
            parts = []
            for key, since in (("connect", None), ("authed", "connect"),
                               ("accepted", "authed"), ("exists", "accepted")):
                values = [s[key] - (s[since] if since else 0) for s in runs[label][case]]
                parts.append(f"{ms(percentile(values, 0.5))} / {ms(percentile(values, 0.95))}")
            lines.append(f"| {label} | {case} | " + " | ".join(parts) + " |")
    lines += ["", "imap processes left in each relay before the hibernated recipients' "
              f"messages, per round (1 = only the IDLE recipient's; {per_round + 1} = none "
              "hibernated):", ""]
    for label in runs:
        lines.append(f"- {label}: {runs[label]['imap_before_wake']}")
    for label in runs:
        if runs[label]["problems"]:
            lines += ["", f"{label}: log lines with an error or warning:", "", "```",
                      runs[label]["problems"], "```"]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--suite", default="bookworm", choices=sorted(RELEASE))
    parser.add_argument("--tag", default="", help="appended to the results' file name")
    parser.add_argument("numbers", nargs="*", type=int)
    options = parser.parse_args()
    args = tuple(options.numbers + [200, 10, 10][len(options.numbers):])
    if os.geteuid() != 0:
        sys.exit("needs root")
    runs = run(options.suite, *args)
    text = report(options.suite, args, runs, machine_facts())
    tag = f"-{options.tag}" if options.tag else ""
    out = REPO / "bench" / "results" / f"relay-latency-{RELEASE[options.suite]}{tag}.md"
    out.write_text(text)
    (out.with_suffix(".json")).write_text(json.dumps(runs))
    print(text)


if __name__ == "__main__":
    main()
