"""Does an IDLE-ing client miss a delivery while Dovecot's CPU is overloaded? The
relay's own Dovecot configuration (as bench_idle_plugin.py --relay runs it), twice side
by side: `stock` and `plugin` (the instant-IDLE plugin, dovecot/plugin/), and with
--plugin-from REV a third, `plugin@REV`, built from that git revision's source. All run in a
CPU cgroup (v1 cpu controller) capped at --cpus cores together with --hogs busy loops,
so deliveries and IDLE syncs wait for the CPU as on a saturated relay; the meter runs
outside it.

Per round, --burst LMTP deliveries (at most --senders at a time, both instances
interleaved) go to random recipients among --recipients IDLE-ing clients per instance.
Then every client must report, in IDLE, as many messages as it was delivered. Each
recipient's lateness is from Dovecot's reply to its last delivery to the EXISTS that
reports its full count. A client not told within --wait seconds (more than Dovecot's
30 s polling) counts as missed: it ends IDLE, and the EXISTS that DONE brings shows
the message was there. Recipients IDLE for the whole run unless one missed, so a
recipient that got nothing for imap_hibernate_timeout (--hibernate) is hibernated at
its next delivery.

Needs root (Dovecot's master, the cgroup) and what bench_idle_plugin.py needs. Installs
nothing, removes its instances, cgroup and files when done.

    check_idle_overload.py [--rounds 40] [--hibernate 30] [--cpus 1] [--hogs 4] ...
"""

import argparse
import asyncio
import os
import random
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_idle_plugin as b  # noqa: E402
from common import machine_facts, percentile  # noqa: E402

CGROUP = Path("/sys/fs/cgroup/cpu/chatmail-idle-overload")
RESULTS = b.HERE / "results" / "idle-overload.md"
# lateness classes (s): at once, by the plugin's or Dovecot's 500 ms, later, never
CLASSES = (("≤ 0.1 s", 0.1), ("≤ 0.7 s", 0.7), ("≤ 5 s", 5), ("≤ 35 s", 35))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--recipients", type=int, default=10, help="per instance")
    parser.add_argument("--burst", type=int, default=60, help="deliveries per round")
    parser.add_argument("--senders", type=int, default=20,
                        help="deliveries at a time (Postfix's LMTP concurrency)")
    parser.add_argument("--cpus", type=float, default=1.0, help="the cgroup's CPU cap")
    parser.add_argument("--hogs", type=int, default=4, help="busy loops in the cgroup")
    parser.add_argument("--hibernate", type=int, default=30,
                        help="imap_hibernate_timeout (s); the relay's is 30")
    parser.add_argument("--pause", type=float, default=3.0,
                        help="longest random pause between rounds (s)")
    parser.add_argument("--wait", type=float, default=40.0,
                        help="how long a recipient may take to report (s)")
    parser.add_argument("--plugin-from", metavar="REV",
                        help="also the plugin as of this git revision")
    parser.add_argument("--write", action="store_true", help=f"append to {RESULTS.name}")
    return parser.parse_args()


class CpuCap:
    """A cgroup v1 cpu group capped at `cpus` cores; processes moved in stay there with
    the children they fork later."""

    def __init__(self, cpus):
        CGROUP.mkdir(exist_ok=True)
        period = 100_000
        (CGROUP / "cpu.cfs_period_us").write_text(str(period))
        (CGROUP / "cpu.cfs_quota_us").write_text(str(int(period * cpus)))
        self.hogs = []

    def add(self, pid):
        (CGROUP / "cgroup.procs").write_text(str(pid))

    def add_tree(self, root):
        for pid in [root] + descendants(root):
            try:
                self.add(pid)
            except OSError:
                pass  # ended meanwhile

    def start_hogs(self, count):
        for _ in range(count):
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            self.add(hog.pid)
            self.hogs.append(hog)

    def throttled(self):
        stat = dict(line.split() for line in (CGROUP / "cpu.stat").read_text().splitlines())
        return int(stat["nr_throttled"]), int(stat["nr_periods"])

    def remove(self):
        for hog in self.hogs:
            hog.kill()
            hog.wait()
        for pid in (CGROUP / "cgroup.procs").read_text().split():
            try:
                Path("/sys/fs/cgroup/cpu/cgroup.procs").write_text(pid)
            except OSError:
                pass
        CGROUP.rmdir()


def descendants(root):
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Client:
    """One IDLE-ing IMAP session over TLS; a reader task records each EXISTS."""

    def __init__(self, dovecot, index):
        self.dovecot, self.user = dovecot, user(index)
        self.key = (dovecot.label, index)  # its key in the meter's dicts
        self.count = 0  # as IDLE (or DONE) last reported
        self.count_at = {}  # count -> time.monotonic() it was first reported
        self.tag = 0
        self.waiting = {}  # tag or b"+" -> future

    async def connect(self):
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        self.reader, self.writer = await asyncio.open_connection(
            "127.0.0.1", self.dovecot.connect_port, ssl=context)
        await self.reader.readline()
        self.task = asyncio.create_task(self.read())
        await self.command(f"LOGIN {self.dovecot.address(self.user)} {b.PASSWORD}")
        await self.command("SELECT INBOX")

    async def read(self):
        while line := await self.reader.readline():
            if line.endswith(b" EXISTS\r\n"):
                count = int(line.split()[1])
                self.count_at.setdefault(count, time.monotonic())
                self.count = count
            key = b"+" if line.startswith(b"+") else line.split(b" ", 1)[0]
            if key in self.waiting:
                self.waiting.pop(key).set_result(line)

    async def send(self, line, wait_for):
        future = asyncio.get_running_loop().create_future()
        self.waiting[wait_for] = future
        self.writer.write(line.encode() + b"\r\n")
        reply = await asyncio.wait_for(future, 60)
        if not reply.startswith(b"+") and b" OK" not in reply:
            raise RuntimeError(f"{self.user}: {line}: {reply!r}")

    async def command(self, line):
        self.tag += 1
        await self.send(f"a{self.tag} {line}", f"a{self.tag}".encode())

    async def idle(self):
        self.tag += 1
        self.idle_tag = f"a{self.tag}".encode()
        await self.send(f"a{self.tag} IDLE", b"+")

    async def done(self):
        await self.send("DONE", self.idle_tag)


async def lmtp_deliver(dovecot, user, number):
    """One message over LMTP; time.monotonic() at Dovecot's reply to DATA's end."""
    reader, writer = await asyncio.open_unix_connection(str(dovecot.lmtp_path))

    async def command(line):
        writer.write(line + b"\r\n")
        while (reply := await reader.readline())[3:4] == b"-":
            pass
        if not reply.startswith((b"2", b"3")):
            raise RuntimeError(f"LMTP {line!r}: {reply!r}")

    await reader.readline()
    address = dovecot.address(user).encode()
    for line in (b"LHLO meter", b"MAIL FROM:<meter@localhost>", b"RCPT TO:<" + address + b">",
                 b"DATA"):
        await command(line)
    await command(b"Subject: overload %d\r\n\r\n%s\r\n." % (number, b"x" * 2000))
    done = time.monotonic()
    writer.close()
    return done


def build_plugin(directory, revision=None):
    """The plugin's .so in `directory`: from the working tree, or from `revision`."""
    source = b.PLUGIN_SRC
    if revision:
        source = directory / "src"
        source.mkdir()
        for name in ("Makefile", "chatmail-instant-idle-plugin.c"):
            text = subprocess.run(["git", "-C", b.REPO, "show",
                                   f"{revision}:dovecot/plugin/{name}"],
                                  check=True, capture_output=True, text=True).stdout
            (source / name).write_text(text)
    b.build_plugin(directory / b.PLUGIN_SO, source)
    return directory


def user(number):
    return f"ovload{number:03d}"  # 9 characters: the relay's doveauth takes only those


async def run_round(instances, clients, args, number, totals):
    """One burst; returns per instance [(lateness or None, client)] per recipient."""
    plan = [(random.choice(instances), random.randrange(args.recipients))
            for _ in range(args.burst)]
    limit = asyncio.Semaphore(args.senders)
    last = {}  # (label, index) -> reply time of its last delivery
    counter = iter(range(number * args.burst, (number + 1) * args.burst))

    async def deliver(d, index):
        async with limit:
            done = await lmtp_deliver(d, user(index), next(counter))
        key = (d.label, index)
        totals[key] += 1
        last[key] = max(last.get(key, 0), done)

    await asyncio.gather(*(deliver(d, index) for d, index in plan))
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline and any(
            clients[key].count < totals[key] for key in last):
        await asyncio.sleep(0.05)
    result = {d.label: [] for d in instances}
    for key, delivered in last.items():
        client = clients[key]
        if client.count >= totals[key]:
            lateness = max(0.0, client.count_at[totals[key]] - delivered)
            result[key[0]].append((lateness, client))
        else:
            result[key[0]].append((None, client))
    return result


async def settle_missed(client, total, logs):
    """DONE: does the sync it brings report the missed message? Then IDLE again."""
    told = client.count
    await client.done()
    logs.append(f"{client.dovecot.label} {client.user}: told {told} in IDLE, "
                f"{client.count} after DONE, delivered {total}")
    await client.idle()


async def measure(instances, args, cap):
    clients, totals = {}, {}
    for d in instances:
        for index in range(args.recipients):
            client = Client(d, index)
            await client.connect()
            await client.idle()
            clients[(d.label, index)] = client
            totals[(d.label, index)] = 0
    for d in instances:
        cap.add_tree(d.process.pid)
    cap.start_hogs(args.hogs)
    lateness = {d.label: [] for d in instances}
    missed = {d.label: 0 for d in instances}
    logs = []
    throttled_before = cap.throttled()
    started = time.monotonic()
    for number in range(args.rounds):
        result = await run_round(instances, clients, args, number, totals)
        for label, outcomes in result.items():
            for value, client in outcomes:
                if value is None:
                    missed[label] += 1
                    await settle_missed(client, totals[client.key], logs)
                else:
                    lateness[label].append(value)
        print(f"round {number + 1}/{args.rounds}: "
              + ", ".join(f"{label} missed {missed[label]}, "
                          f"max {max(lateness[label], default=0):.2f} s"
                          for label in lateness), flush=True)
        await asyncio.sleep(random.uniform(0, args.pause))
    elapsed = time.monotonic() - started
    throttled = [a - b_ for a, b_ in zip(cap.throttled(), throttled_before)]
    cpu = {d.label: imap_cpu_seconds(d) for d in instances}
    for client in clients.values():
        client.writer.close()
    return lateness, missed, logs, elapsed, throttled, cpu


def imap_cpu_seconds(dovecot):
    """CPU time of the instance's imap processes so far: one per client, alive since its
    login, so this is all their syncs."""
    return sum(b.cpu_seconds(pid) for pid in dovecot.imap_pids())


def classify(values, missed):
    row, below = [], 0
    for _, limit in CLASSES:
        count = sum(1 for value in values if value <= limit) - below
        below += count
        row.append(count)
    row.append(len(values) - below)
    row.append(missed)
    return row


def imap_cpu(seconds, hibernations):
    """A hibernated client's imap process ends and its successor starts from 0, so the
    sum counts all syncs only without hibernations."""
    return f"{seconds:.2f}" if hibernations == 0 else "(hibernated: not comparable)"


def report(args, facts, version, lateness, missed, logs, elapsed, throttled, hibernations,
           cpu):
    head = ["| dovecot | recipients told | " + " | ".join(name for name, _ in CLASSES)
            + " | > 35 s | missed (only at DONE) | p50 | p95 | max | hibernations"
            " | imap CPU s |",
            "|---|" + "---|" * (len(CLASSES) + 8)]
    rows = []
    for label, values in lateness.items():
        counts = classify(values, missed[label])
        rows.append(f"| {label} | {len(values)} | " + " | ".join(map(str, counts))
                    + f" | {percentile(values, 0.5) * 1000:.0f} ms"
                    f" | {percentile(values, 0.95) * 1000:.0f} ms"
                    f" | {max(values) * 1000:.0f} ms | {hibernations[label]}"
                    f" | {imap_cpu(cpu[label], hibernations[label])} |")
    return "\n".join([
        f"- {facts['date']}; {facts['nproc']} CPUs ({facts['cpu']}), {facts['memory']}, "
        f"Linux {facts['kernel']}, {facts['os']}; Dovecot {version[0]} (`{version[1]}`)",
        f"- `{' '.join(sys.argv[1:]) or '(defaults)'}`: {args.rounds} rounds of {args.burst} "
        f"deliveries, {args.senders} at a time, to {args.recipients} IDLE-ing recipients per "
        f"instance; cgroup capped at {args.cpus:g} CPU with {args.hogs} busy loops "
        f"(throttled in {throttled[0]} of {throttled[1]} periods); "
        f"imap_hibernate_timeout {args.hibernate} s; {elapsed:.0f} s",
        "- lateness per recipient and round: from the reply to its last delivery to the "
        "EXISTS reporting all its messages",
        "", *head, *rows, ""] + [f"    {line}" for line in logs])


def main():
    args = parse_args()
    b.HIBERNATE_SECS = args.hibernate
    builds = []
    sys.path.insert(0, str(b.REPO))
    from tests.unit.push_server import PushServer
    push, instances, cap = PushServer(), [], None
    try:
        variants = [("plugin", None)]
        if args.plugin_from:
            variants.append((f"plugin@{args.plugin_from}", args.plugin_from))
        instances = [b.RelayDovecot("stock", push)]
        for label, revision in variants:
            builds.append(Path(tempfile.mkdtemp(prefix="idlp-overload-build-", dir="/tmp")))
            builds[-1].chmod(0o755)
            instances.append(b.RelayDovecot(label, push, build_plugin(builds[-1], revision)))
        for d in instances:
            d.start()
            for index in range(args.recipients):  # accounts and maildirs, outside the cap
                d.create_account(user(index))
        cap = CpuCap(args.cpus)
        lateness, missed, logs, elapsed, throttled, cpu = asyncio.run(
            measure(instances, args, cap))
        hibernations = {d.label: d.count("Successfully hibernated") for d in instances}
        problems = {d.label: d.problems() for d in instances}
    finally:
        if cap:
            cap.remove()
        for d in instances:
            d.stop()
            shutil.rmtree(d.root, ignore_errors=True)
        push.close()
        for build in builds:
            shutil.rmtree(build, ignore_errors=True)
    text = report(args, machine_facts(), b.dovecot_version(), lateness, missed, logs,
                  elapsed, throttled, hibernations, cpu)
    print(text)
    for label, lines in problems.items():
        for line in lines[:20]:
            print(f"{label}: {line}")
    if args.write:
        with RESULTS.open("a") as out:
            out.write(text + "\n\n")
    sys.exit(1 if any(missed.values()) else 0)


if __name__ == "__main__":
    os.umask(0o022)
    main()
