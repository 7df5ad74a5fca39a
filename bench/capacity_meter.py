"""Runs inside a bench container with Debian's python3, next to an installed relay, driven
by bench_capacity.py: a bounded asyncio load generator that logs in COUNT distinct
accounts over IMAP on port 993 (TLS; the first login creates each account), SELECTs INBOX
and leaves every connection in IDLE; waits until the relay has hibernated them
(imap_hibernate_timeout); measures the memory of every process of the relay (from /proc,
footprint_meter.py); then, while all of them stay connected, sends SAMPLES messages by
SMTP submission on 465 (relay_meter.py's client) to sampled clients, one at a time, and
times each from the start of the submission to the `* N EXISTS` its IDLE reads.

It stops by itself: every phase has a deadline, and the whole run ends after --deadline
seconds with whatever it has. Progress goes to stderr; the result is one JSON object on
the last line of stdout.
--groups limits the key exchange groups the clients offer (as set_ecdh_curve: one group),
e.g. X25519 as Delta Chat's core does; by default they offer what Debian's OpenSSL offers
(OpenSSL 3.5, Debian 13: the X25519MLKEM768 hybrid first; OpenSSL 3.0: X25519 first).
Usage: capacity_meter.py DOMAIN COUNT SAMPLES [--parallel N] [--deadline S] [--groups G]"""

import argparse
import asyncio
import json
import os
import random
import resource
import ssl
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from footprint_meter import processes  # noqa: E402
from relay_meter import PASSWORD, SENDER, Submission, message  # noqa: E402

HIBERNATE_TIMEOUT = 30  # the relay's imap_hibernate_timeout (conf/dovecot)
STEP_TIMEOUT = 60  # one IMAP command's answer, one SMTP submission, one EXISTS
NAME = "capa{:05d}"  # doveauth's default names: exactly 9 characters

CONTEXT = ssl.create_default_context()
CONTEXT.check_hostname = False
CONTEXT.verify_mode = ssl.CERT_NONE


def log(text):
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


class Client:
    """One IMAP connection: LOGIN, SELECT INBOX, IDLE; then a reader that notes every
    EXISTS (for the sampled ones) and the end of the connection (for all)."""

    def __init__(self, address):
        self.address = address
        self.tag = 0
        self.reader = self.writer = None
        self.closed = None  # why the connection ended, if it did
        self.exists = None  # a future the sampler waits on

    async def command(self, line):
        self.tag += 1
        tag = f"a{self.tag}".encode()
        self.writer.write(f"a{self.tag} {line}\r\n".encode())
        while not (reply := await self.reader.readline()).startswith(tag):
            if not reply:
                raise RuntimeError(f"connection closed after {line.split()[0]}")
        if b" OK" not in reply:
            raise RuntimeError(f"{line.split()[0]}: {reply.decode(errors='replace').strip()}")

    async def start_idle(self):
        self.tag += 1
        self.idle_tag = f"a{self.tag}".encode()
        self.writer.write(f"a{self.tag} IDLE\r\n".encode())
        if not (await self.reader.readline()).startswith(b"+"):
            raise RuntimeError("IDLE refused")

    async def open(self):
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", 993, ssl=CONTEXT)
        await self.reader.readline()  # the greeting
        await self.command(f"LOGIN {self.address} {PASSWORD}")
        await self.command("SELECT INBOX")
        await self.start_idle()

    async def listen(self):
        """Reads what the server sends in IDLE until the connection ends."""
        try:
            while line := await self.reader.readline():
                if b"EXISTS" in line and self.exists and not self.exists.done():
                    self.exists.set_result(time.monotonic())
                elif (line.startswith(self.idle_tag) and self.exists
                      and not self.exists.done()):
                    self.exists.set_result(line)  # the tagged answer to DONE
            self.closed = "closed by the server"
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError) as error:
            self.closed = f"{type(error).__name__}: {error}"
        if self.exists and not self.exists.done():
            self.exists.set_exception(RuntimeError(self.closed))

    def close(self):
        if self.writer:
            self.writer.transport.abort()


async def log_in(clients, parallel, deadline):
    """Opens every client, at most `parallel` at a time; returns the failures and the
    seconds from the first to the last successful login."""
    queue = list(clients)
    failures, done = {}, []
    started = time.monotonic()

    async def worker():
        while queue and time.monotonic() < deadline:
            client = queue.pop()
            try:
                await asyncio.wait_for(client.open(), STEP_TIMEOUT)
                client.listener = asyncio.create_task(client.listen())
                done.append(time.monotonic())
                if len(done) % 1000 == 0:
                    log(f"{len(done)} logged in, {len(done) / (done[-1] - started):.0f}/s")
            except Exception as error:  # noqa: BLE001 - counted and reported
                reason = f"{type(error).__name__}: {error}"[:200]
                failures[reason] = failures.get(reason, 0) + 1
                client.close()
                client.closed = reason

    await asyncio.gather(*(worker() for _ in range(parallel)))
    return failures, (done[-1] - started) if done else 0, len(done)


def threads(comm_or_unit):
    """Threads of the processes whose command line names `comm_or_unit`."""
    total = 0
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and comm_or_unit.encode() in (entry / "cmdline").read_bytes():
                status = (entry / "status").read_text()
                total += int(status.split("Threads:")[1].split()[0])
        except (OSError, IndexError):
            pass
    return total


async def watch_peaks(peaks):
    """The most imap processes (logged in, not yet hibernated) and the most threads of
    our dict daemons seen while clients log in; until cancelled."""
    while True:
        for key, value in (("imap processes", count_comm("imap")),
                           ("doveauth threads", threads("doveauth")),
                           ("lastlogin threads", threads("lastlogin"))):
            peaks[key] = max(peaks.get(key, 0), value)
        await asyncio.sleep(1)


def cpu_seconds():
    """CPU time (user + system) used so far, per process name: where a phase's CPU went
    is the difference of two of these."""
    ticks = os.sysconf("SC_CLK_TCK")
    used = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit():
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                name = _comm(entry)
                used[name] = used.get(name, 0) + (int(fields[11]) + int(fields[12])) / ticks
                # children that ended and were waited for (the imap processes that
                # hibernated count in their master's)
                ended = f"{name}'s ended children"
                used[ended] = used.get(ended, 0) + (int(fields[13]) + int(fields[14])) / ticks
        except (OSError, IndexError, ValueError):
            pass
    return used


def held(clients):
    return [c for c in clients if c.reader and c.closed is None]


def count_comm(name):
    return sum(1 for p in Path("/proc").iterdir() if p.name.isdigit() and _comm(p) == name)


def _comm(entry):
    try:
        return (entry / "comm").read_text().strip()
    except OSError:
        return None


async def wait_hibernated(deadline):
    """Until no imap process is left (every IDLE session hibernated) or the deadline;
    returns the imap processes left."""
    while (left := count_comm("imap")) and time.monotonic() < deadline:
        await asyncio.sleep(2)
    return left


def submit(recipient, number):
    """One SMTP submission (blocking, in a thread); the seconds of its parts."""
    sender = f"{SENDER}@{recipient.split('@')[1]}"
    start = time.monotonic()
    smtp = Submission("127.0.0.1", 465, context=CONTEXT, timeout=STEP_TIMEOUT)
    smtp.login(sender, PASSWORD)
    smtp.sendmail(sender, [recipient], message(sender, recipient, number))
    accepted = time.monotonic()
    smtp.quit()
    return start, accepted


async def wake(client, number):
    """A message to hibernated `client`; the seconds from the submission's start to its
    EXISTS. Then DONE and a new IDLE, so it hibernates again."""
    loop = asyncio.get_running_loop()
    client.exists = loop.create_future()
    start, accepted = await loop.run_in_executor(None, submit, client.address, number)
    seen = await asyncio.wait_for(client.exists, STEP_TIMEOUT)
    client.exists = loop.create_future()
    client.writer.write(b"DONE\r\n")
    await asyncio.wait_for(client.exists, STEP_TIMEOUT)  # the tagged OK
    client.exists = None
    client.tag += 1
    client.idle_tag = f"a{client.tag}".encode()
    client.writer.write(f"a{client.tag} IDLE\r\n".encode())
    return {"exists": seen - start, "accepted": accepted - start}


async def prepare(domain, sampled):
    """The sender's account, and one message delivered to each sampled account before it
    connects: its mailbox files exist, as on a relay in use (relay_meter.py does the
    same)."""
    sender = Client(f"{SENDER}@{domain}")
    await sender.open()
    sender.close()
    loop = asyncio.get_running_loop()
    for address in sampled:
        first = Client(address)  # creates the account
        await first.open()
        first.close()
        await loop.run_in_executor(None, submit, address, 0)
    await asyncio.sleep(2)  # delivered before the SELECT


def memory():
    return [{k: p[k] for k in ("pid", "unit", "comm", "rss_kb", "pss_kb", "uss_kb")}
            for p in processes()]


def fd_count(comm):
    """Open file descriptors of every process named `comm`."""
    total = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _comm(entry) == comm:
            try:
                total += sum(1 for _ in (entry / "fd").iterdir())
            except OSError:
                pass
    return total


def per_process(comm):
    """For each process named `comm`: its open descriptors, private memory (USS) and
    the resident part of its heap, in kB; one connection's cost is the slope of memory
    over descriptors across the processes."""
    found = []
    for entry in Path("/proc").iterdir():
        if not (entry.name.isdigit() and _comm(entry) == comm):
            continue
        try:
            fds = sum(1 for _ in (entry / "fd").iterdir())
            heap = anon = 0
            region = None
            for line in (entry / "smaps").read_text().splitlines():
                if not line[0].isupper():
                    region = line.split()[5] if len(line.split()) > 5 else ""
                elif line.startswith("Rss:"):
                    kb = int(line.split()[1])
                    heap += kb if region == "[heap]" else 0
                    anon += kb if region == "" else 0
            uss = memory_of(entry.name)
            found.append({"pid": int(entry.name), "fds": fds, "uss_kb": uss,
                          "heap_kb": heap, "anon_kb": anon})
        except (OSError, ValueError, IndexError):
            pass
    return found


def memory_of(pid):
    values = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    return sum(int(values[k].split()[0]) for k in ("Private_Clean", "Private_Dirty"))


async def run(domain, count, samples, parallel, deadline):
    clients = [Client(f"{NAME.format(i)}@{domain}") for i in range(count)]
    sampled = random.sample(clients, min(samples, count))
    result = {"count": count, "parallel": parallel, "samples": []}
    await prepare(domain, [c.address for c in sampled])
    result["before"] = memory()
    log(f"logging in {count} clients, {parallel} at a time")
    peaks = result["peaks"] = {}
    watcher = asyncio.create_task(watch_peaks(peaks))
    cpu_before = cpu_seconds()
    failures, seconds, logged_in = await log_in(clients, parallel, deadline)
    watcher.cancel()
    cpu_after = cpu_seconds()
    result["login_cpu"] = {name: round(cpu_after[name] - cpu_before.get(name, 0), 1)
                           for name in cpu_after
                           if cpu_after[name] - cpu_before.get(name, 0) >= 0.5}
    result.update(failures=failures, login_seconds=seconds, logged_in=logged_in)
    log(f"{logged_in} logged in in {seconds:.1f} s; failures {failures}")
    await asyncio.sleep(HIBERNATE_TIMEOUT)
    result["imap_left"] = await wait_hibernated(min(deadline, time.monotonic() + 120))
    result["held_hibernated"] = len(held(clients))
    result["hibernated"] = memory()
    result["fds"] = {c: fd_count(c) for c in ("imap-login", "imap-hibernate", "auth",
                                              "anvil", "dovecot")}
    result["per_process"] = {c: per_process(c) for c in ("imap-login", "imap-hibernate",
                                                          "stats", "auth")}
    log(f"{result['held_hibernated']} held, {result['imap_left']} imap processes left")
    for number, client in enumerate(sampled, 1):
        if time.monotonic() > deadline or client.closed:
            continue
        try:
            result["samples"].append(await wake(client, number))
        except Exception as error:  # noqa: BLE001 - reported
            result.setdefault("sample_errors", []).append(f"{type(error).__name__}: {error}")
    result["held_after"] = len(held(clients))
    result["closed"] = {}
    for c in clients:
        if c.closed:
            result["closed"][c.closed[:120]] = result["closed"].get(c.closed[:120], 0) + 1
    result["after"] = memory()
    log(f"{result['held_after']} held after {len(result['samples'])} samples")
    return result, clients


async def main_async(options):
    deadline = time.monotonic() + options.deadline
    clients = []
    try:
        result, clients = await asyncio.wait_for(
            run(options.domain, options.count, options.samples, options.parallel, deadline),
            options.deadline + 60)
    finally:
        for c in clients:
            c.close()
    return result


def prepare_clients(groups=None):
    """The clients' TLS key exchange groups (OpenSSL's default without `groups`), and
    the load generator's file limit raised for its sockets: one per client."""
    if groups:
        CONTEXT.set_ecdh_curve(groups)  # SSL_CTX_set1_groups with OpenSSL 3
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("domain")
    parser.add_argument("count", type=int)
    parser.add_argument("samples", type=int)
    parser.add_argument("--parallel", type=int, default=50)
    parser.add_argument("--deadline", type=int, default=900)
    parser.add_argument("--groups")
    options = parser.parse_args()
    prepare_clients(options.groups)
    result = asyncio.run(main_async(options))
    result["meter_maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(result))


if __name__ == "__main__":
    main()
