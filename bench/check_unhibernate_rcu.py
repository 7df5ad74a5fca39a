"""Where does a hibernated client's wake-up go? The relay's own Dovecot configuration
with the instant-IDLE plugin (as bench_idle_plugin.py --relay runs it,
imap_hibernate_timeout 2 s), twice side by side: `as-installed`, and `prestarted`, with
`service imap { process_min_avail = N }`, so that a wake-up finds an imap process that
has already started (exec, settings) instead of making the master start one. Rounds
alternate in blocks between the kernel's normal RCU grace periods and expedited ones
(/sys/kernel/rcu_expedited = 1, restored afterwards): imap-hibernate closes the
client's inotify instance before it hands the client to the new imap process, and that
close() waits for an SRCU grace period (fsnotify's marks) whenever one is under way.
Samples interleave, in random order per sample.

Measured: from the end of an LMTP delivery to the EXISTS of the hibernated recipient's
IDLE; and the memory (RSS, PSS) of the idle imap processes the second instance keeps.

Needs what bench_idle_plugin.py --relay needs (root, the host's Dovecot, dovecot-dev).
Installs nothing; removes its instances and files when done.

    check_unhibernate_rcu.py [--blocks 4] [--rounds 5] [--clients 4] [--prestart 2] [--write]
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_idle_plugin as b  # noqa: E402
from common import machine_facts, percentile, print_and_append  # noqa: E402

RESULTS = b.HERE / "results" / "unhibernate-rcu.md"
RCU_EXPEDITED = Path("/sys/kernel/rcu_expedited")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=4, help="per RCU setting")
    parser.add_argument("--rounds", type=int, default=5, help="per block")
    parser.add_argument("--clients", type=int, default=4, help="hibernated per round")
    parser.add_argument("--prestart", type=int, default=2, help="process_min_avail")
    parser.add_argument("--write", action="store_true", help=f"append to {RESULTS.name}")
    return parser.parse_args()


def idle_imap_memory(dovecot):
    """(count, RSS MB, PSS MB) of the instance's imap processes that wait for a client:
    those still running as root (a process serving a client runs as the mail user)."""
    rss = pss = count = 0
    for pid in dovecot.imap_pids():
        status = Path(f"/proc/{pid}/status").read_text()
        if not any(line.split()[1] == "0" for line in status.splitlines()
                   if line.startswith("Uid:")):
            continue
        count += 1
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss += int(line.split()[1])
            elif line.startswith("Pss:"):
                pss += int(line.split()[1])
    return count, rss / 1024, pss / 1024


def report(args, facts, version, times, memory):
    lines = [
        f"## {facts['date']}: `bench/check_unhibernate_rcu.py --blocks {args.blocks} --rounds "
        f"{args.rounds} --clients {args.clients} --prestart {args.prestart}`",
        "",
        f"- machine: {facts['nproc']} CPUs ({facts['cpu']}), {facts['memory']}, "
        f"Linux {facts['kernel']}, {facts['os']}; Dovecot {version}",
        "",
        "LMTP delivery to the hibernated recipient's EXISTS (ms); RCU: the kernel's "
        "grace periods, normal or expedited:",
        "",
        "| instance | RCU | samples | hibernated | median | p95 | min | max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (label, rcu), (values, hibernated) in sorted(times.items()):
        ms = [v * 1000 for v in values]
        lines.append(f"| {label} | {rcu} | {len(ms)} | {hibernated} | "
                     f"{percentile(ms, 0.5):.1f} | {percentile(ms, 0.95):.1f} | "
                     f"{min(ms):.1f} | {max(ms):.1f} |")
    count, rss, pss = memory
    lines += ["", f"Idle imap processes kept by `prestarted` after the run: {count}, "
              f"RSS {rss:.1f} MB, PSS {pss:.1f} MB together.", ""]
    return "\n".join(lines)


def main():
    args = parse_args()
    sys.path.insert(0, str(b.REPO))
    from tests.unit.push_server import PushServer

    rcu_before = RCU_EXPEDITED.read_text().strip()
    build = Path(tempfile.mkdtemp(prefix="unhib-build-", dir="/tmp"))
    build.chmod(0o755)
    push = PushServer()
    instances = []
    try:
        # a directory per instance: each gets the relay's other plugins linked in
        plugin_dirs = [build / "a", build / "b"]
        for folder in plugin_dirs:
            folder.mkdir()
            folder.chmod(0o755)
            b.build_plugin(folder / b.PLUGIN_SO)
        prestart = f"service imap {{\n  process_min_avail = {args.prestart}\n}}\n"
        instances = [b.RelayDovecot("as-installed", push, plugin_dir=plugin_dirs[0]),
                     b.RelayDovecot("prestarted", push, plugin_dir=plugin_dirs[1],
                                    extra=prestart)]
        for d in instances:
            d.start()
        time.sleep(1)
        times = {}
        for _ in range(args.blocks):
            for expedited in ("0", "1"):
                RCU_EXPEDITED.write_text(expedited)
                block, hibernated = b.measure_hibernated(instances, args.rounds,
                                                         args.clients, time.monotonic())
                for label, values in block.items():
                    key = (label, "expedited" if expedited == "1" else "normal")
                    entry = times.setdefault(key, [[], 0])
                    entry[0].extend(values)
                    entry[1] += hibernated[label]
        time.sleep(1)
        memory = idle_imap_memory(instances[1])
        problems = {d.label: d.problems() for d in instances}
    finally:
        RCU_EXPEDITED.write_text(rcu_before)
        for d in instances:
            d.stop()
        push.close()
        for path in [build] + [d.root for d in instances]:
            shutil.rmtree(path, ignore_errors=True)
    text = report(args, machine_facts(), b.dovecot_version()[0], times, memory)
    for label, found in problems.items():
        if found:
            text += f"\n{label}: {len(found)} log problems, first: {found[0]}\n"
    print_and_append(text, RESULTS, args.write)


if __name__ == "__main__":
    main()
