"""Runs inside a bench container next to an installed relay, started by
check_dovecot_restart.py: keeps COUNT distinct accounts logged in over IMAP on 993 (TLS)
and IDLE-ing, like Delta Chat clients: a client whose connection ends connects again
after a second, for as long as the script runs. Writes the number of clients in IDLE to
STATUS every 0.2 s. Stops by itself after --deadline seconds.
Usage: dovecot_holder.py DOMAIN COUNT STATUS [--deadline S]"""

import argparse
import asyncio
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from capacity_meter import NAME, Client  # noqa: E402

RETRY_SECONDS = 1


async def keep_connected(client, idle):
    while True:
        try:
            await asyncio.wait_for(client.open(), 30)
            idle.add(client.address)
            await client.listen()
        except (OSError, RuntimeError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            idle.discard(client.address)
            client.close()
        client.tag, client.reader, client.writer = 0, None, None
        await asyncio.sleep(RETRY_SECONDS)


async def report(idle, status):
    while True:
        Path(status).write_text(f"{len(idle)}\n")
        await asyncio.sleep(0.2)


async def main_async(options):
    idle = set()
    clients = [Client(f"{NAME.format(i)}@{options.domain}") for i in range(options.count)]
    tasks = [asyncio.create_task(keep_connected(c, idle)) for c in clients]
    tasks.append(asyncio.create_task(report(idle, options.status)))
    await asyncio.sleep(options.deadline)
    for task in tasks:
        task.cancel()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("domain")
    parser.add_argument("count", type=int)
    parser.add_argument("status")
    parser.add_argument("--deadline", type=int, default=1800)
    options = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    started = time.monotonic()
    asyncio.run(main_async(options))
    print(f"stopped after {time.monotonic() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
