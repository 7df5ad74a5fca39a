"""Runs inside a bench container next to an installed relay, driven by
check_imaplogin_memory.py: what one IMAP-over-TLS connection costs Dovecot's imap-login
processes. Opens COUNT connections on 993 (capacity_meter.py's client), either logged in
(LOGIN, SELECT INBOX, IDLE: imap-login then only relays the TLS to the imap process) or
only greeted (TLS handshake and greeting, no login), waits a moment, and measures every
imap-login process (PSS, USS, resident heap, descriptors) before and while they are held.
--groups restricts the key exchange groups the client offers (TLS 1.3 key shares).
Prints one JSON object on the last line of stdout.
Usage: imaplogin_meter.py DOMAIN COUNT [--greet-only] [--groups X25519] [--parallel N]"""

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import capacity_meter  # noqa: E402
from capacity_meter import CONTEXT, NAME, Client, log_in, per_process  # noqa: E402
from footprint_meter import processes  # noqa: E402


class Greeted(Client):
    """A connection that stops after the greeting: a client before its login."""

    async def open(self):
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", 993,
                                                                 ssl=CONTEXT)
        await self.reader.readline()

    async def listen(self):
        try:
            while await self.reader.readline():
                pass
            self.closed = "closed by the server"
        except (OSError, asyncio.IncompleteReadError) as error:
            self.closed = f"{type(error).__name__}: {error}"


def imap_login():
    """Sum of PSS and USS (kB) and the count of the imap-login processes."""
    found = [p for p in processes() if p["comm"] == "imap-login"]
    return {"n": len(found), "pss_kb": sum(p["pss_kb"] for p in found),
            "uss_kb": sum(p["uss_kb"] for p in found)}


def negotiated(client):
    ssl_object = client.writer.get_extra_info("ssl_object")
    group = getattr(ssl_object, "group", None)  # Python 3.15 and later only
    return {"version": ssl_object.version(), "cipher": ssl_object.cipher()[0],
            "group": group() if callable(group) else None}


async def run(options):
    kind = Greeted if options.greet_only else Client
    clients = [kind(f"{NAME.format(i)}@{options.domain}") for i in range(options.count)]
    result = {"before": imap_login()}
    deadline = time.monotonic() + 600
    try:
        failures, seconds, logged_in = await log_in(clients, options.parallel, deadline)
        await asyncio.sleep(5)
        held = [c for c in clients if c.reader and c.closed is None]
        result.update(failures=failures, seconds=seconds, opened=logged_in, held=len(held),
                      held_mem=imap_login(), per_process=per_process("imap-login"),
                      tls=negotiated(held[0]) if held else None)
    finally:
        for c in clients:
            c.close()
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("domain")
    parser.add_argument("count", type=int)
    parser.add_argument("--greet-only", action="store_true")
    parser.add_argument("--groups")
    parser.add_argument("--parallel", type=int, default=50)
    options = parser.parse_args()
    capacity_meter.prepare_clients(options.groups)
    capacity_meter.log(f"{options}")
    result = asyncio.run(run(options))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
