#!/usr/bin/env python3
"""Where does the occasional 40 ms on the submission path go? One relay as installed
(README's commands, a fresh container), relay_meter.py's submissions on 465 (implicit
TLS, TCP_NODELAY) to a recipient IDLE-ing for a moment, while tcpdump (the host's, in the
container's network namespace) records loopback ports 465 and filtermail's 10080. Then,
for every pause of 30 ms or more between two packets of one connection, the packets
around it (time, direction, flags, payload length; the filter's plain SMTP text): which
side was waiting for what.

Needs root and `make build`. Usage: check_submission_stall.py [--suite bookworm|trixie]
[SAMPLES] (default 300). Prints its report; writes nothing."""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_relay_latency import RELEASE, Relay  # noqa: E402
from common import machine_facts, percentile  # noqa: E402

PORTS = {465: "smtps", 10080: "filtermail"}
STALL = 0.030  # seconds: a pause at least this long between two packets of a connection


def capture(relay, path):
    """tcpdump on the container's loopback, in its network namespace, until stopped."""
    return subprocess.Popen(
        ["nsenter", "-t", str(relay.box.leader), "-n", "tcpdump", "-i", "lo", "-U", "-s",
         "0", "-w", str(path)] + " or ".join(f"tcp port {p}" for p in PORTS).split(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def packets(path):
    """[(time, src port, dst port, flags, payload length, payload text)] from the file."""
    out = subprocess.run(["tcpdump", "-r", str(path), "-nn", "-tt", "-A", "-q", "-S"],
                         capture_output=True, text=True, errors="replace").stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] == "IP" and fields[0][0].isdigit():
            src, dst = fields[2].rsplit(".", 1)[1], fields[4].rstrip(":").rsplit(".", 1)[1]
            length = int(fields[-1]) if fields[-1].isdigit() else 0
            found.append([float(fields[0]), int(src), int(dst), length, ""])
        elif found and line and not line.startswith("\t"):
            found[-1][4] += line.strip()[:80] + " "
    return found


def flags_of(path):
    """The same packets' TCP flags (a second reading without -q)."""
    out = subprocess.run(["tcpdump", "-r", str(path), "-nn", "-tt", "-S"],
                         capture_output=True, text=True).stdout
    return [line.split("Flags [", 1)[1].split("]", 1)[0]
            for line in out.splitlines() if "Flags [" in line]


def connections(found, flags):
    """Packets grouped per connection: the server port, the client's ephemeral port, and
    how often that port had opened a connection before (ports are reused)."""
    groups, opened = {}, {}
    for packet, flag in zip(found, flags):
        time_, src, dst, length, text = packet
        server = src if src in PORTS else dst
        client = dst if src in PORTS else src
        side = "server" if src in PORTS else "client"
        if side == "client" and flag == "S":
            opened[(server, client)] = opened.get((server, client), 0) + 1
        key = (server, client, opened.get((server, client), 0))
        groups.setdefault(key, []).append((time_, side, flag, length, text))
    return groups


def stalls(groups):
    """(server port, gap, packets around it) for every pause of STALL or more."""
    result = []
    for (server, _, _), group in groups.items():
        for index in range(1, len(group)):
            gap = group[index][0] - group[index - 1][0]
            # a connection idle between commands of the meter is not a stall: only gaps
            # before the server's final reply to the message count (the last packets are
            # QUIT and the close)
            if gap >= STALL and index < len(group) - 6:
                result.append((server, gap, group[max(0, index - 4):index + 3]))
    return result


def report(suite, samples, times, found_stalls, facts):
    lines = [f"# Submission-path pauses ({RELEASE[suite]})", "",
             f"{facts['date']}; {facts['nproc']} CPUs ({facts['cpu']}), {facts['memory']}, "
             f"Linux {facts['kernel']}, {facts['os']}; {samples} submissions on 465 to an "
             f"IDLE-ing recipient",
             f"submission start to EXISTS: median {percentile(times, 0.5) * 1000:.1f} ms, "
             f"p95 {percentile(times, 0.95) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms",
             f"pauses of {STALL * 1000:.0f} ms or more inside a connection: "
             f"{len(found_stalls)}", ""]
    for server, gap, around in found_stalls[:12]:
        lines.append(f"## {PORTS[server]}: {gap * 1000:.1f} ms")
        start = around[0][0]
        for time_, side, flag, length, text in around:
            lines.append(f"    +{(time_ - start) * 1000:7.1f} ms {side:6} [{flag}] "
                         f"len {length:5} {text[:70] if server == 10080 else ''}")
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--suite", default="bookworm", choices=sorted(RELEASE))
    parser.add_argument("samples", nargs="?", type=int, default=300)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root")
    relay = Relay("ours", args.suite)
    pcap = Path(f"/var/tmp/submission-stall-{os.getpid()}.pcap")
    try:
        relay.install()
        if relay.error:
            raise relay.error
        relay.start_agent()
        relay.ask("setup", hibernating=0)
        tcpdump = capture(relay, pcap)
        time.sleep(1)
        times = []
        for number in range(args.samples):
            times.append(relay.ask("idle", number=number)["exists"])
            time.sleep(0.2)
        time.sleep(1)
        tcpdump.terminate()
        tcpdump.wait(10)
        found = packets(pcap)
        groups = connections(found, flags_of(pcap))
        text = report(args.suite, args.samples, times, stalls(groups), machine_facts())
    finally:
        relay.stop()
        pcap.unlink(missing_ok=True)
    print(text)


if __name__ == "__main__":
    main()
