#!/usr/bin/python3
"""Sustained throughput of the relay alone: N senders, each with an authenticated SMTP
session on 465 (implicit TLS), submit 10 KB OpenPGP-encrypted messages (made with sqop,
so filtermail's checks pass as for Delta Chat's mail) to N recipients IDLE-ing on 993,
through smtpd, filtermail, the reinjection smtpd with OpenDKIM, the queue, LMTP and
Dovecot. The offered rate steps up (open loop: message n is offered at n / rate); per
step: messages accepted (250) and delivered per second, latency from the start of the
submission (MAIL FROM) to the EXISTS in the recipient's IDLE, CPU per systemd unit and
per process, the generator's own CPU. Every accepted message is looked for by Message-ID
in its recipient's mailbox: lost = accepted but not there.

The relay is installed with README's commands in a fresh container (tests/system, the
same as bench_relay_latency.py); the generator (bench/throughput_meter.py) runs inside it
and shares the host's cores with the relay.

Needs root and `make build`. Usage:
  bench_throughput.py [--suite bookworm|trixie] [--tag TAG] [--clients N] [--seconds S]
                      [--perf] [--baseline REV | --bare | --stock] [RATE ...]
--bare alternates, step by step, the relay as installed with Postfix and Dovecot alone:
the submission service without its before-queue filter, so no filtermail, no reinjection
and no OpenDKIM (a ceiling of what the rest of the relay allows on this machine).
--stock alternates the relay as installed with the same relay on Debian's stock Dovecot
(the instant-IDLE plugin's file diverted away, `chatmail configure` again; the recipients
log in again after each switch).
Writes bench/results/throughput[-debian13][-TAG].md and .json."""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_relay_latency import PLUGIN, RELEASE, Relay  # noqa: E402
from common import (installed_dovecot_version, machine_facts, percentile,  # noqa: E402
                    write_results)
from tests.unit.mailfactory import OpenPGP, encrypted_mail  # noqa: E402

RATES = [25, 50, 100, 200, 300, 400, 500]
PLAINTEXT = 7_000  # bytes before encryption: a 10 KB message once armored
KNEE = 1.0  # p95 (s) past which a step is over the knee
GOAL_RATE, GOAL_P95 = 200, 0.5


class ThroughputRelay(Relay):
    """bench_relay_latency's relay container, driven by throughput_meter.py."""

    meter = "throughput_meter.py"


def test_message():
    """A Delta Chat-like 10 KB message, really encrypted by sqop, with placeholders the
    meter replaces per message (From, To, Message-ID)."""
    with tempfile.TemporaryDirectory() as workdir:
        armored = OpenPGP(workdir).encrypt(os.urandom(PLAINTEXT))
    return encrypted_mail("__FROM__", "__TO__", armored).decode()


def versions(box):
    out = box.run("dpkg-query -W -f '${Package} ${Version}\\n' postfix opendkim "
                  "python3-chatmaild chatmail-relay python3-aiosmtpd python3", check=False)
    found = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    found["dovecot-core"] = installed_dovecot_version(box)
    return found


def perf_profile(seconds, path):
    """Which processes are on the CPU, host-wide (the relay's, the generator's, and
    whatever else shares the machine): perf's samples per command name."""
    record = subprocess.run(["perf", "record", "-a", "-F", "199", "-o", str(path), "--",
                             "sleep", str(seconds)], capture_output=True, text=True)
    if record.returncode:
        shutil.rmtree(path.parent, ignore_errors=True)
        return f"perf record failed: {record.stderr[-500:]}"
    report = subprocess.run(["perf", "report", "-i", str(path), "--stdio", "--sort",
                             "comm,dso", "--percent-limit", "1.5"],
                            capture_output=True, text=True)
    shutil.rmtree(path.parent, ignore_errors=True)  # perf.data: tens of MB per step
    return "\n".join(line for line in report.stdout.splitlines()
                     if line.strip() and not line.startswith("#"))


def run(suite, clients, seconds, rates, with_perf, baseline, bare=False, stock=False):
    relay = ThroughputRelay("tp", suite)
    result = {"steps": [], "perf": {}}
    try:
        relay.install()
        if relay.error:
            raise relay.error
        result["status"] = relay.status
        result["versions"] = versions(relay.box)
        variants = ["installed"]
        if baseline:
            install_baseline(relay.box, baseline)
            variants.append(f"filtermail of {baseline}")
        filters = submission_filters(relay.box) if bare else None
        if bare:
            variants.append(BARE)
        if stock:
            variants.append(STOCK)
        relay.since = relay.box.run("date +%s").stdout.strip()
        relay.start_agent()
        result["setup"] = relay.ask("setup", clients=clients, message=test_message())
        for number, rate in enumerate(rates):
            # Variants alternate which goes first, so neither always meets a warmer host.
            order = variants if number % 2 == 0 else variants[::-1]
            steps = [run_step(relay, rate, seconds, with_perf, result, variant, baseline,
                              filters, stock)
                     for variant in order]
            for step in steps:
                print(summary_row(step), flush=True)
            if all(s["p95"] is None or s["p95"] > 5 * KNEE or s["lost"] for s in steps):
                break  # far past the knee: more load only measures the backlog
        result["stragglers"] = straggler_logs(relay.box, result["steps"])
        result["problems"] = relay.box.run(
            f"journalctl --since @{relay.since} --no-pager | grep -E 'warning:|error:|"
            "fatal:|panic:|Error|Fatal|Panic|Traceback' | sort | uniq -c | sort -rn | "
            "head -15", check=False).stdout.strip()
        result["load"] = Path("/proc/loadavg").read_text().strip()
    finally:
        relay.stop()
    return result


STRAGGLER = 5.0  # s from the 250 to the EXISTS: far behind the rest, worth a look


def straggler_logs(box, steps, limit=5):
    """Postfix's and Dovecot's log of the messages whose EXISTS came STRAGGLER s or more
    after their 250: was the delivery late, or only the IDLE notification?"""
    def lateness(sample):
        return float("inf") if sample[2] is None else sample[2] - sample[1]

    # the latest ones: the first few of a backlog only show the queue it started with
    late = sorted(((step, n) for step in steps for n, s in step["samples"].items()
                   if lateness(s) > STRAGGLER),
                  key=lambda late: -lateness(late[0]["samples"][late[1]]))[:limit]
    if not late:
        return {}
    # Debian 12's Postfix logs under postfix@-, Debian 13's under postfix
    log = box.run("journalctl -o short-precise --no-pager -u postfix@- -u postfix -u dovecot",
                  check=False, timeout=300).stdout.splitlines()
    found = {}
    for step, number in late:
        message_id = f"tp.r{step['rate']}{step['variant'][:1]}.{number}@throughput-meter"
        queue_ids = {m.group(1) for line in log if message_id in line
                     for m in [re.search(r" ([0-9A-F]{8,}): ", line)] if m}
        lines = [line for line in log if message_id in line
                 or any(f" {q}: " in line for q in queue_ids)]
        found[f"{step['rate']}/s {step['variant']} #{number} {step['samples'][number]}"] = lines
    return found


MODULE = "/usr/lib/python3/dist-packages/chatmaild/filtermail.py"


def install_baseline(box, ref):
    """Beside the installed filtermail.py, the one of git revision `ref`, to switch
    between them (use_filtermail) in the same relay under the same load."""
    old = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:chatmaild/filtermail.py"],
                         check=True, capture_output=True, text=True).stdout
    box.run(f"test -f {MODULE} && cp {MODULE} {MODULE}.installed")
    box.run(f"cat > {MODULE}.baseline", input=old)


def use_filtermail(box, variant):
    source = "installed" if variant == "installed" else "baseline"
    box.run(f"cp {MODULE}.{source} {MODULE} && rm -rf "
            f"$(dirname {MODULE})/__pycache__/filtermail.* && "
            "systemctl restart filtermail filtermail-incoming && sleep 2")


BARE = "Postfix and Dovecot alone"
FILTER_SETTING = "smtps/inet/smtpd_proxy_filter"


def submission_filters(box):
    """{variant: the submission service's before-queue filter}: as installed, and none."""
    installed = box.run(f"postconf -P {FILTER_SETTING}").stdout.split("=", 1)[1].strip()
    return {"installed": installed, BARE: ""}


def use_submission_filter(relay, value):
    """Sets the filter of the submission service on 465 and opens new sessions, which
    meet the new configuration (smtpd processes keep the one they started with)."""
    relay.box.run(f"postconf -P '{FILTER_SETTING}={value}' && postfix reload >/dev/null "
                  "2>&1 && sleep 1")
    relay.ask("reconnect")


STOCK = "stock Dovecot"
DIVERTED = f"{PLUGIN}.bench-disabled"


def use_dovecot(relay, variant):
    """The relay with the instant-IDLE plugin (as installed) or without it (stock), and
    the recipients in IDLE again in the Dovecot that `chatmail configure` restarted."""
    if variant == STOCK:
        relay.box.run(f"dpkg-divert --local --rename --divert {DIVERTED} --add {PLUGIN}")
    else:
        relay.box.run(f"dpkg-divert --local --rename --divert {DIVERTED} --remove {PLUGIN}")
    relay.box.run("chatmail configure >/dev/null && sleep 2")
    relay.ask("reconnect", recipients=True)


def run_step(relay, rate, seconds, with_perf, result, variant="installed", baseline=None,
             filters=None, stock=False):
    if baseline:
        use_filtermail(relay.box, variant)
    if filters:
        use_submission_filter(relay, filters[variant])
    if stock:
        use_dovecot(relay, variant)
    load = Path("/proc/loadavg").read_text().split()[:3]
    profiler = None
    if with_perf:
        path = Path(tempfile.mkdtemp(prefix="chatmail-tp-perf-")) / "perf.data"
        profiler = threading.Thread(target=lambda: result["perf"].__setitem__(
            f"{rate}/s, {variant}", perf_profile(seconds, path)))
        profiler.start()
    raw = relay.ask("step", rate=rate, seconds=seconds, tag=f"r{rate}{variant[:1]}")
    if profiler:
        profiler.join()
    step = summarize(rate, raw)
    step["variant"] = variant
    step["load_before"] = load
    result["steps"].append(step)
    return step


def summarize(rate, raw):
    samples = list(raw["offsets"].values())
    arrived = [s for s in samples if len(s) > 2 and s[2] is not None]
    latency = [s[2] - s[0] for s in arrived]
    accept = [s[1] - s[0] for s in samples]
    offered_wait = [s[2] - int(n) / rate for n, s in raw["offsets"].items()
                    if len(s) > 2 and s[2] is not None]
    last = max((s[2] for s in arrived), default=raw["window"])
    window = raw["host_total"] / os.cpu_count()
    relay_cpu = sum(v for u, v in raw["units_cpu"].items() if u != "throughput-meter")
    return {
        "rate": rate, "offered": raw["offered"], "accepted": raw["accepted"],
        "errors": raw["errors"][:20], "error_count": len(raw["errors"]),
        "lost": raw["lost"], "arrived": len(arrived),
        "accepted_per_s": raw["accepted"] / raw["sending_ended"],
        "delivered_per_s": len(arrived) / last,
        "sending_ended": raw["sending_ended"],
        "p50": pct(latency, 0.5), "p95": pct(latency, 0.95), "p99": pct(latency, 0.99),
        "max": max(latency, default=None),
        "accept_p50": pct(accept, 0.5), "accept_p95": pct(accept, 0.95),
        "offered_p95": pct(offered_wait, 0.95),
        "relay_cpu_share": relay_cpu / window, "meter_cpu_share": raw["meter_cpu"] / window,
        "host_busy_share": raw["host_busy"] / window,
        "units_cpu": dict(sorted(raw["units_cpu"].items(), key=lambda kv: -kv[1])),
        "process_cpu": dict(sorted(raw["process_cpu"].items(), key=lambda kv: -kv[1])[:12]),
        "window": window,
        # Each accepted message: [MAIL FROM, 250, EXISTS] in s since the step began.
        "samples": {n: [None if v is None else round(v, 4) for v in s]
                    for n, s in raw["offsets"].items()},
    }


def pct(values, fraction):
    return percentile(values, fraction) if values else None


def ms(seconds):
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def summary_row(step):
    return (f"| {step['rate']} | {step.get('variant', 'installed')} | {step['offered']} | "
            f"{step['accepted']} | "
            f"{step['error_count']} | {len(step['lost'])} | {step['accepted_per_s']:.0f} | "
            f"{step['delivered_per_s']:.0f} | {ms(step['p50'])} | {ms(step['p95'])} | "
            f"{ms(step['p99'])} | {ms(step['max'])} | {ms(step['accept_p95'])} | "
            f"{step['relay_cpu_share'] * 100:.0f} % | {step['meter_cpu_share'] * 100:.0f} % | "
            f"{step['host_busy_share'] * 100:.0f} % | {' '.join(step['load_before'])} |")


def knee(steps):
    over = next((s for s in steps if s["p95"] is None or s["p95"] > KNEE), None)
    return over["rate"] if over else None


def cpu_lines(step, key, count=8):
    total = step["window"] * os.cpu_count()
    return ", ".join(f"{name} {seconds / step['window'] * 100:.0f} %"
                     for name, seconds in list(step[key].items())[:count]
                     if seconds / total > 0.005)


def verdicts(steps):
    """Per variant: the knee, and the steps that meet the goal's latency at full rate."""
    lines = []
    for variant in dict.fromkeys(s["variant"] for s in steps):
        mine = [s for s in steps if s["variant"] == variant]
        met = [s["rate"] for s in mine if s["p95"] is not None and s["p95"] <= GOAL_P95
               and s["delivered_per_s"] >= 0.95 * s["rate"]]
        reached = any(rate >= GOAL_RATE for rate in met)
        lines.append(f"- {variant}: knee (first step with p95 > {KNEE:.0f} s) "
                     f"{knee(mine) or 'not reached'}; goal ({GOAL_RATE} msg/s at p95 <= "
                     f"{GOAL_P95 * 1000:.0f} ms) {'met' if reached else 'not met'} "
                     f"(steps within it: {met})")
    return lines


def report(suite, options, result, facts):
    steps = result["steps"]
    lines = [
        f"# Sustained throughput ({RELEASE[suite]})", "",
        f"Measured by `bench/bench_throughput.py --suite {suite} --clients {options.clients} "
        f"--seconds {options.seconds}{' --perf' if options.perf else ''}"
        f"{' --baseline ' + options.baseline if options.baseline else ''}"
        f"{' --bare' if options.bare else ''}{' --stock' if options.stock else ''} "
        f"{' '.join(map(str, options.rates))}` on {facts['date']}.", "",
        f"- machine: {facts['nproc']} CPUs ({facts['cpu']}), {facts['memory']}, "
        f"Linux {facts['kernel']}, host {facts['os']}; shared with other people's builds "
        "and containers (load average before each step in the table, host CPU busy share "
        "during it)",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        f"- relay: a fresh {suite} container (systemd-nspawn, private network) installed with "
        "README's commands from dist/repo; max_user_send_per_minute raised for the senders",
        f"- load: {options.clients} senders, each one authenticated SMTP session on 465 "
        f"(implicit TLS) kept open, one message at a time; {options.clients} recipients in "
        f"IDLE on 993; messages of {result['setup']['message_bytes']} bytes (sqop-encrypted "
        "OpenPGP/MIME, filtermail accepts them); message n offered at n / rate for "
        f"{options.seconds} s per step (open loop: a busy session queues what it is offered)",
        "- latency: from the sender's MAIL FROM to the `* N EXISTS` its recipient's IDLE "
        "reads (the message with sequence number s counts as seen at the first EXISTS >= s; "
        "Message-IDs fetched after the step); `250` = MAIL FROM to the 250 after DATA",
        "- CPU shares are of one core (200 % = the machine): relay = every systemd unit in "
        "the container except the meter's session; meter = the generator itself; host = all "
        "of the machine, other people's work included",
        "", "| offered/s | relay | offered | accepted | refused | lost | accepted/s | "
        "delivered/s | "
        "p50 ms | p95 ms | p99 ms | max ms | 250 p95 ms | relay CPU | meter CPU | host busy | "
        "load before |",
        "|" + "---|" * 17,
        *[summary_row(s) for s in steps], "",
        *verdicts(steps), "",
        "CPU per step (share of one core): by systemd unit; by process (sampled from /proc "
        "every 0.5 s; processes that ended between samples lose their last interval):", "",
    ]
    for s in steps:
        lines += [f"- {s['rate']}/s, {s['variant']}, units: {cpu_lines(s, 'units_cpu')}",
                  f"  processes: {cpu_lines(s, 'process_cpu', 10)}"]
    refused = [e for s in steps for e in s["errors"]]
    if refused:
        lines += ["", "Refusals (first ones):", "", "```",
                  *sorted({e[1] for e in refused})[:10], "```"]
    for rate, text in result["perf"].items():
        lines += ["", f"perf (host-wide, 199 Hz, by command and object) during the {rate}/s "
                  "step:", "", "```", text[:4000], "```"]
    for key, log_lines in result.get("stragglers", {}).items():
        lines += ["", f"Straggler {key} ([MAIL FROM, 250, EXISTS] s), its log:", "",
                  "```", *log_lines[:20], "```"]
    if result.get("problems"):
        lines += ["", "Log lines with an error or warning (count, line):", "", "```",
                  result["problems"][:4000], "```"]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--suite", default="bookworm", choices=sorted(RELEASE))
    parser.add_argument("--tag", default="")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--perf", action="store_true", help="perf record during each step")
    parser.add_argument("--baseline", help="also measure the filtermail.py of this git "
                        "revision, in the same relay, steps alternating")
    parser.add_argument("--bare", action="store_true", help=f"also measure {BARE} (no "
                        "before-queue filter on 465), in the same relay, steps alternating")
    parser.add_argument("--stock", action="store_true", help=f"also measure {STOCK} (the "
                        "plugin diverted away), in the same relay, steps alternating")
    parser.add_argument("rates", nargs="*", type=int, default=RATES)
    options = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root")
    if sum(map(bool, (options.bare, options.baseline, options.stock))) > 1:
        sys.exit("one of --bare, --baseline and --stock at a time")
    result = run(options.suite, options.clients, options.seconds, options.rates,
                 options.perf, options.baseline, options.bare, options.stock)
    text = report(options.suite, options, result, machine_facts())
    tag = f"-{options.tag}" if options.tag else ""
    release = "" if options.suite == "bookworm" else f"-{RELEASE[options.suite]}"
    write_results(f"throughput{release}{tag}", text, result)


if __name__ == "__main__":
    main()
