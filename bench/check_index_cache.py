"""What Dovecot's index cache does for a relay: the relay's own Dovecot configuration (as
bench_idle_plugin.py --relay runs it), twice side by side: `as-installed` (no index
cache: `mail_never_cache_fields = *`), and `cache-500K`, the cache as upstream's
configuration and ours until 2026-12-07 had it (`mail_cache_max_size = 500K`,
`mail_cache_fields = flags`). One account each gets --messages deliveries over LMTP, in
Delta Chat's form (its headers, an encrypted body), in batches; after each batch an IMAP
client fetches the new messages as Delta Chat prefetches them (size and the header
fields it asks for), and at the end it fetches all of them again, as a new device
would. Batches alternate between the instances.

Reported per instance: Dovecot's error lines (the cache's "Cache file too large"
among them), the cache file's size, LMTP's time per delivery, the time of the fetches
(ms), and, measured first, how long a hibernated client (imap_hibernate_timeout 2 s,
a mailbox of a few messages) takes from a delivery to its EXISTS.

Needs what bench_idle_plugin.py --relay needs (root, the host's Dovecot). Installs
nothing; removes its instances and files when done.

    check_index_cache.py [--messages 4000] [--batch 200] [--hibernated-rounds 10] [--write]
"""

import argparse
import base64
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_idle_plugin as b  # noqa: E402
from common import machine_facts, percentile, print_and_append  # noqa: E402
from idle_meter import lmtp_deliver  # noqa: E402

RESULTS = b.HERE / "results" / "index-cache.md"
USER = "cachebnch"  # 9 characters: the relay's doveauth takes only those
# what Delta Chat's core prefetches of a new message (PREFETCH_FLAGS in src/imap/session.rs)
HEADER_FIELDS = ("MESSAGE-ID DATE X-MICROSOFT-ORIGINAL-MESSAGE-ID FROM CONTENT-TYPE "
                 "SECURE-JOIN CHAT-VERSION CHAT-IS-POST-MESSAGE AUTOCRYPT-SETUP-MESSAGE")
# the index cache as our configuration had it, in place of the setting that turns it off
# (2.3: one line; 2.4: a block)
NO_CACHE = re.compile(r"^mail_never_cache_fields (= \*|\{.*?^\})\n", re.M | re.S)
CACHE_500K = {"2.3": "mail_cache_max_size = 500K\n",
              "2.4": "mail_cache_max_size = 500K\nmail_cache_fields = flags\n"}
FETCH = f"(UID RFC822.SIZE BODY.PEEK[HEADER.FIELDS ({HEADER_FIELDS})])"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=200)
    parser.add_argument("--hibernated-rounds", type=int, default=10,
                        help="rounds of 4 hibernated clients woken by a delivery")
    parser.add_argument("--write", action="store_true", help=f"append to {RESULTS.name}")
    return parser.parse_args()


def delta_chat_message(recipient, number):
    """Headers as Delta Chat writes them (the protected ones are inside the encryption),
    an Autocrypt header with a key's worth of data, and an OpenPGP body of 3 KB."""
    key = base64.encodebytes(os.urandom(700)).decode().replace("\n", "\r\n ").strip()
    body = base64.encodebytes(os.urandom(3000)).decode().replace("\n", "\r\n")
    return (
        f"From: <sender{number % 7}@chat.example.org>\r\nTo: <{recipient}>\r\n"
        f"Subject: [...]\r\nDate: Mon, 07 Dec 2026 10:00:00 +0000\r\n"
        f"Message-ID: <Mr.{os.urandom(9).hex()}.{number}@chat.example.org>\r\n"
        f"Chat-Version: 1.0\r\nAutocrypt: addr=sender@chat.example.org; keydata={key}\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; '
        'boundary="b"\r\n\r\n--b\r\nContent-Type: application/pgp-encrypted\r\n\r\n'
        "Version: 1\r\n\r\n--b\r\nContent-Type: application/octet-stream\r\n\r\n"
        f"-----BEGIN PGP MESSAGE-----\r\n\r\n{body}-----END PGP MESSAGE-----\r\n\r\n--b--"
    ).encode()


def fetch_ms(client, first, last):
    start = time.monotonic()
    client.command(f"UID FETCH {first}:{last} {FETCH}")
    return (time.monotonic() - start) * 1000


def deliver_batch(instance, first, last, record):
    address = instance.address(USER)
    for number in range(first, last + 1):
        content = delta_chat_message(address, number)
        start = time.monotonic()
        lmtp_deliver(address, number, instance.lmtp_path, b.TIMEOUT, content)
        record["delivery"].append((time.monotonic() - start) * 1000)
    record["client"].command("NOOP")
    record["batch_fetch"].append(fetch_ms(record["client"], first, last))


def run(instances, args):
    """Batches interleaved between the instances, in random order per batch."""
    records = {}
    for d in instances:
        d.create_account(USER)
        records[d.label] = {"client": b.imap_client(d, USER), "delivery": [],
                            "batch_fetch": []}
    for first in range(1, args.messages + 1, args.batch):
        last = min(first + args.batch - 1, args.messages)
        for d in random.sample(instances, len(instances)):
            deliver_batch(d, first, last, records[d.label])
    for d in instances:
        record = records[d.label]
        record["full_fetch"] = fetch_ms(record["client"], 1, "*")
        record.pop("client").close()
        cache = next((d.root / "mail").glob(f"*/{USER}@*")) / "dovecot.index.cache"
        record["cache_kb"] = cache.stat().st_size / 1024 if cache.exists() else 0
        record["errors"] = d.problems()
    return records


def with_cache(instance):
    """`instance` with the index cache of our configuration before 2026-12-07 (edited
    in its dovecot.conf: a second setting would add to 2.4's list, not replace it)."""
    conf = Path(instance.relay.path(instance.relay.platform.dovecot_main_config))
    version = instance.relay.platform.dovecot_version
    text, found = NO_CACHE.subn(CACHE_500K[version], conf.read_text())
    assert found == 1, conf
    conf.write_text(text)
    return instance


def report(args, facts, version, results):
    lines = [
        f"## {facts['date']}: `bench/check_index_cache.py --messages {args.messages} "
        f"--batch {args.batch}`",
        "",
        f"- machine: {facts['nproc']} CPUs ({facts['cpu']}), {facts['memory']}, "
        f"Linux {facts['kernel']}, {facts['os']}; Dovecot {version}",
        "",
        "| instance | error lines | \"Cache file too large\" | cache file | LMTP per message, "
        "median (p95) | fetch of each batch, median | fetch of all at the end | "
        "hibernated client woken, median (p95) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        too_large = sum("Cache file too large" in line for line in r["errors"])
        lines.append(
            f"| {label} | {len(r['errors'])} | {too_large} | {r['cache_kb']:.0f} KB | "
            f"{percentile(r['delivery'], 0.5):.2f} ({percentile(r['delivery'], 0.95):.2f}) "
            f"ms | {percentile(r['batch_fetch'], 0.5):.1f} ms | {r['full_fetch']:.0f} ms | "
            f"{percentile(r['woken'], 0.5):.1f} ({percentile(r['woken'], 0.95):.1f}) ms |")
    for label, r in results.items():
        if r["errors"]:
            lines += ["", f"{label}, first error lines:", "", "```", *r["errors"][:3], "```"]
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    sys.path.insert(0, str(b.REPO))
    from tests.unit.push_server import PushServer

    push = PushServer()
    instances = []
    try:
        instances = [b.RelayDovecot("as-installed", push),
                     with_cache(b.RelayDovecot("cache-500K", push))]
        for d in instances:
            d.start()
        woken, _ = b.measure_hibernated(instances, args.hibernated_rounds, 4,
                                        time.monotonic())
        results = run(instances, args)
        for label, values in woken.items():
            results[label]["woken"] = [v * 1000 for v in values]
    finally:
        for d in instances:
            d.stop()
        push.close()
        for d in instances:
            shutil.rmtree(d.root, ignore_errors=True)
    text = report(args, machine_facts(), b.dovecot_version()[0], results)
    print_and_append(text, RESULTS, args.write)


if __name__ == "__main__":
    main()
