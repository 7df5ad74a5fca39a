"""Runs inside a bench container with Debian's python3, next to an installed relay, driven
by bench_throughput.py: N senders, each with its own authenticated SMTP session on port
465 (implicit TLS), submit encrypted messages at an offered rate to N recipients whose
IMAP sessions (993, TLS) wait in IDLE. Every step of the way is the relay's: smtpd,
filtermail, the reinjection smtpd with OpenDKIM, the queue, LMTP, Dovecot and IDLE.

One asyncio loop: the generator has to stay far cheaper than the relay it loads, and
threads would make its latencies the GIL's.

One JSON command per line on stdin, one JSON reply per line on stdout:
  {"do": "setup", "clients": N, "message": TEXT}   accounts, sessions, IDLE; TEXT the
      message (CRLF) with <__FROM__>, <__TO__> and the Message-ID to replace
  {"do": "step", "rate": R, "seconds": S, "tag": T}  one load step; every message
      accepted (250) is then looked for in its recipient's mailbox by Message-ID
  {"do": "reconnect", "recipients": B}            new submission (and IMAP) sessions
  {"do": "quit"}
A step's reply: per message [sender start, 250, EXISTS] times (s, monotonic, relative
to the step's start; EXISTS null if never seen), the SMTP errors, the lost Message-IDs,
and the CPU seconds per systemd unit and per process name while the step ran.
Usage: throughput_meter.py DOMAIN"""

import asyncio
import base64
import json
import os
import re
import ssl
import sys
import threading
import time
from pathlib import Path

PASSWORD = "throughput-meter-password-1234"
DRAIN_TIMEOUT = 60  # how long after a step accepted messages may take to arrive
TEMPLATE_ID = b"<Mr.test.0001@example.org>"  # the Message-ID in the host's message

CONTEXT = ssl.create_default_context()
CONTEXT.check_hostname = False
CONTEXT.verify_mode = ssl.CERT_NONE


async def connect(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=CONTEXT,
                                                   limit=1 << 20)
    # No Nagle on the client side: what remains is the relay's.
    writer.get_extra_info("socket").setsockopt(6, 1, 1)  # IPPROTO_TCP, TCP_NODELAY
    return reader, writer


class Smtp:
    """One authenticated submission session, kept open like a Delta Chat client's."""

    def __init__(self, address):
        self.address = address

    async def open(self):
        self.reader, self.writer = await connect(465)
        await self.reply()
        await self.command("EHLO throughput-meter")
        token = base64.b64encode(f"\0{self.address}\0{PASSWORD}".encode()).decode()
        await self.command(f"AUTH PLAIN {token}", expect=b"235")

    async def reply(self):
        """The last line of a (multi-line) reply."""
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError(f"{self.address}: SMTP connection closed")
            if line[3:4] != b"-":
                return line

    async def command(self, line, expect=b"2"):
        self.writer.write(line.encode() + b"\r\n")
        await self.writer.drain()
        reply = await self.reply()
        if not reply.startswith(expect):
            raise SmtpError(reply.decode(errors="replace").strip())
        return reply

    async def send(self, recipient, content):
        """MAIL, RCPT, DATA (content ends with CRLF and has no line starting with a dot)."""
        await self.command(f"MAIL FROM:<{self.address}> SIZE={len(content)}")
        await self.command(f"RCPT TO:<{recipient}>")
        await self.command("DATA", expect=b"354")
        self.writer.write(content + b".\r\n")
        await self.writer.drain()
        reply = await self.reply()
        if not reply.startswith(b"250"):
            raise SmtpError(reply.decode(errors="replace").strip())


class SmtpError(Exception):
    pass


LITERAL = re.compile(rb"\{(\d+)\}\r\n$")


class Imap:
    """LOGIN (creates the account), SELECT, IDLE; records when each EXISTS count arrived."""

    def __init__(self, address):
        self.address = address
        self.tag = 0
        self.exists = []  # (count, monotonic time) while in IDLE

    async def open(self):
        self.reader, self.writer = await connect(993)
        await self.reader.readline()
        await self.command(f"LOGIN {self.address} {PASSWORD}")
        await self.command("SELECT INBOX")

    async def line(self):
        """A response line with its literals appended (FETCH of a header field)."""
        line = await self.reader.readline()
        if not line:
            raise ConnectionError(f"{self.address}: IMAP connection closed")
        while match := LITERAL.search(line):
            line += await self.reader.readexactly(int(match.group(1)))
            line += await self.reader.readline()
        return line

    async def command(self, text):
        self.tag += 1
        tag = f"a{self.tag} ".encode()
        self.writer.write(tag + text.encode() + b"\r\n")
        await self.writer.drain()
        untagged = []
        while not (line := await self.line()).startswith(tag):
            untagged.append(line)
        if not line[len(tag):].startswith(b"OK"):
            raise RuntimeError(f"{self.address}: {text}: {line!r}")
        return untagged

    async def idle(self):
        self.tag += 1
        self.idle_tag = f"a{self.tag} ".encode()
        self.exists = []
        self.writer.write(self.idle_tag + b"IDLE\r\n")
        await self.writer.drain()
        if not (await self.line()).startswith(b"+"):
            raise RuntimeError(f"{self.address}: IDLE refused")
        self.watcher = asyncio.create_task(self.watch())

    async def watch(self):
        """Reads IDLE's untagged responses until DONE's tagged OK."""
        while not (line := await self.line()).startswith(self.idle_tag):
            if line.endswith(b" EXISTS\r\n"):
                self.exists.append((int(line.split()[1]), time.monotonic()))

    async def done(self):
        self.writer.write(b"DONE\r\n")
        await self.writer.drain()
        await self.watcher

    async def message_ids(self):
        """Message-ID of each message in the mailbox, in sequence-number order."""
        ids = []
        for line in await self.command("FETCH 1:* (BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])"):
            found = re.search(rb"Message-ID:\s*(<[^>]*>)", line, re.I)
            if found:
                ids.append(found.group(1).decode())
        return ids

    async def empty(self):
        await self.command("STORE 1:* +FLAGS.SILENT (\\Deleted)")
        await self.command("EXPUNGE")

    def seen_at(self, sequence):
        """When IDLE first reported at least `sequence` messages, or None."""
        return next((at for count, at in self.exists if count >= sequence), None)


class CpuSampler(threading.Thread):
    """CPU seconds per process name (per filtermail mode for our python3 daemons),
    from /proc every `interval` s. A process that ends between two samples loses its
    last interval; the per-unit cgroup totals (cgroup_cpu) have no such gap."""

    def __init__(self, interval=0.5):
        super().__init__(daemon=True)
        self.interval = interval
        self.last = {}  # pid -> (name, ticks)
        self.totals = {}
        self.stopping = threading.Event()

    def run(self):
        self.sample(count=False)
        while not self.stopping.wait(self.interval):
            self.sample()
        self.sample()

    def sample(self, count=True):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                ticks = int(fields[11]) + int(fields[12])
                name = self.last[pid][0] if pid in self.last else process_name(pid)
            except (OSError, IndexError, KeyError):
                continue
            before = self.last.get(pid, (name, 0 if count else ticks))[1]
            self.last[pid] = (name, ticks)
            self.totals[name] = self.totals.get(name, 0) + ticks - before

    def stop(self):
        self.stopping.set()
        self.join()
        hertz = os.sysconf("SC_CLK_TCK")
        return {name: ticks / hertz for name, ticks in self.totals.items() if ticks}


def process_name(pid):
    """comm, and for python3 the daemon it runs (filtermail's mode, or our meter)."""
    comm = Path(f"/proc/{pid}/comm").read_text().strip()
    if comm.startswith("python"):
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        words = [a.decode(errors="replace").rsplit("/", 1)[-1] for a in args[1:] if a]
        if "chatmaild.filtermail" in words:
            return "filtermail " + words[-1]
        return "python3 " + " ".join(w for w in words if not w.startswith("-"))[:40]
    return comm


def cgroup_cpu():
    """CPU seconds of each systemd unit so far (cgroup v2 cpu.stat), and the whole
    host's busy and total CPU seconds (/proc/stat is not namespaced)."""
    units = {}
    # cgroup v2, or the v2 part of a hybrid layout (this host's), or v1's cpuacct.
    for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        for stat in Path(root).glob("*.slice/*/cpu.stat"):
            for line in stat.read_text().splitlines():
                if line.startswith("usage_usec "):
                    units[stat.parent.name] = int(line.split()[1]) / 1e6
    if not units:
        for usage in Path("/sys/fs/cgroup/cpuacct").glob("*.slice/*/cpuacct.usage"):
            units[usage.parent.name] = int(usage.read_text()) / 1e9
    cpu = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    hertz = os.sysconf("SC_CLK_TCK")
    idle = cpu[3] + cpu[4]
    return units, (sum(cpu) - idle) / hertz, sum(cpu) / hertz


class Meter:
    def __init__(self, domain):
        self.domain = domain

    async def setup(self, clients, message):
        self.template = message.encode()
        assert TEMPLATE_ID in self.template and not re.search(rb"\n\.", self.template)
        self.senders = [Smtp(f"tpsend{i:03d}@{self.domain}") for i in range(clients)]
        self.recipients = [Imap(f"tprecv{i:03d}@{self.domain}") for i in range(clients)]
        for client in self.senders:  # their accounts exist from the first IMAP login
            imap = Imap(client.address)
            await imap.open()
            await imap.command("LOGOUT")
        await asyncio.gather(*(c.open() for c in self.senders + self.recipients))
        for imap in self.recipients:
            await imap.idle()
        return {"message_bytes": len(self.template)}

    async def reconnect(self, recipients=False):
        """New submission sessions, so that they meet Postfix's configuration as it is
        now (an smtpd process keeps the one it started with); with `recipients`, new
        IMAP sessions in IDLE too (after a restart of Dovecot, which ended them)."""
        for smtp in self.senders:
            smtp.writer.close()
        await asyncio.gather(*(smtp.open() for smtp in self.senders))
        if recipients:
            for imap in self.recipients:
                imap.watcher.cancel()
                imap.writer.close()
                imap.tag = 0
            await asyncio.gather(*(imap.open() for imap in self.recipients))
            for imap in self.recipients:
                await imap.idle()
        return {}

    def content(self, sender, recipient, message_id):
        return (self.template.replace(b"<__FROM__>", f"<{sender}>".encode())
                .replace(b"<__TO__>", f"<{recipient}>".encode())
                .replace(TEMPLATE_ID, message_id.encode()))

    async def sender(self, index, queue, start, results, errors):
        """Sends what the scheduler queues for this session, one message at a time."""
        smtp = self.senders[index]
        while (item := await queue.get()) is not None:
            number, recipient, message_id = item
            content = self.content(smtp.address, recipient, message_id)
            began = time.monotonic()
            try:
                await smtp.send(recipient, content)
            except SmtpError as error:
                errors.append([number, str(error)])
                await smtp.command("RSET")
                continue
            results[number] = [began - start, time.monotonic() - start]

    async def step(self, rate, seconds, tag):
        count = int(rate * seconds)
        queues = [asyncio.Queue() for _ in self.senders]
        results, errors, targets = {}, [], {}
        sampler = CpuSampler()
        units_before, busy_before, total_before = cgroup_cpu()
        own_before = sum(os.times()[:2])
        sampler.start()
        start = time.monotonic()
        tasks = [asyncio.create_task(self.sender(i, q, start, results, errors))
                 for i, q in enumerate(queues)]
        for number in range(count):
            # Open loop: message n is offered at n / rate whether or not earlier ones
            # are done; a busy session queues it (its wait shows in `offered`).
            await asyncio.sleep(max(0, start + number / rate - time.monotonic()))
            sender = number % len(queues)
            recipient = (sender + number // len(queues)) % len(self.recipients)
            message_id = f"<tp.{tag}.{number}@throughput-meter>"
            targets[number] = (recipient, message_id)
            queues[sender].put_nowait((number, self.recipients[recipient].address, message_id))
        for q in queues:
            q.put_nowait(None)
        await asyncio.gather(*tasks)
        sending_ended = time.monotonic() - start
        await self.drain(results, targets)
        cpu = sampler.stop()
        units_after, busy_after, total_after = cgroup_cpu()
        window = time.monotonic() - start
        return {
            "offered": count, "seconds": seconds, "sending_ended": sending_ended,
            "window": window,
            **(await self.collect(results, targets, start)),
            "errors": errors,
            "units_cpu": {u: units_after[u] - units_before.get(u, 0) for u in units_after
                          if units_after[u] - units_before.get(u, 0) > 0.01},
            "process_cpu": cpu,
            "meter_cpu": sum(os.times()[:2]) - own_before,
            "host_busy": busy_after - busy_before, "host_total": total_after - total_before,
            "offsets": {str(n): results[n] for n in results},
        }

    async def drain(self, results, targets):
        """Wait until every recipient's IDLE reported as many messages as were accepted
        for it, or DRAIN_TIMEOUT passed."""
        expected = {}
        for number in results:
            recipient = targets[number][0]
            expected[recipient] = expected.get(recipient, 0) + 1
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while time.monotonic() < deadline:
            if all((imap.exists[-1][0] if imap.exists else 0) >= expected.get(i, 0)
                   for i, imap in enumerate(self.recipients)):
                return
            await asyncio.sleep(0.1)

    async def collect(self, results, targets, start):
        """Each accepted message's EXISTS time, found by Message-ID in its recipient's
        mailbox: the message at sequence number s became visible with the first EXISTS
        that reported s or more. Then the mailboxes are emptied and IDLE again."""
        by_id = {targets[n][1]: n for n in results}
        lost = set(by_id)
        for imap in self.recipients:
            await imap.done()
            for sequence, message_id in enumerate(await imap.message_ids(), 1):
                number = by_id.get(message_id)
                if number is None:
                    continue
                lost.discard(message_id)
                seen = imap.seen_at(sequence)
                results[number].append(None if seen is None else seen - start)
            await imap.empty()
        for imap in self.recipients:
            await imap.idle()
        return {"accepted": len(results), "lost": sorted(lost)}


async def serve(meter):
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        command = json.loads(line)
        verb = command.pop("do")
        if verb == "quit":
            break
        try:
            reply = await getattr(meter, verb)(**command)
        except Exception as error:  # noqa: BLE001 - the driver stops on it
            reply = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    asyncio.run(serve(Meter(sys.argv[1])))
