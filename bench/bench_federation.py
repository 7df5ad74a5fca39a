#!/usr/bin/python3
"""Cross-relay delivery latency: two relays installed from dist/repo with ACME
certificates from pebble, on the test network of tests/system/internet.py; a Delta Chat
user on relay A writes to one on relay B (verified by SecureJoin, encrypted), one message
at a time, and the time from send to B's incoming-message event is recorded. Needs root,
nsd, pebble and `make build`. Writes bench/results/federation.md.

    /usr/bin/python3 bench/bench_federation.py [--messages 50]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.system.container import DELTACHAT_VERSION  # noqa: E402
from tests.system.internet import Internet  # noqa: E402
from tests.system.test_federation import (  # noqa: E402
    federated_relays, publish_dns, run_clients, setup_accounts)

from common import machine_facts, percentile  # noqa: E402



def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=50)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "federation.md")
    args = parser.parse_args()
    started = time.monotonic()
    with Internet() as internet, federated_relays(internet) as relays:
        setup_seconds = time.monotonic() - started
        publish_dns(relays, internet)
        setup_accounts(relays)
        latencies = run_clients(relays["a"], "bench", str(args.messages),
                                timeout=60 + 30 * args.messages)["latencies"]
    m = machine_facts()
    median, p95 = statistics.median(latencies) * 1000, percentile(latencies, 0.95) * 1000
    report = f"""# Cross-relay delivery latency

Measured by `bench/bench_federation.py` on {m['date']}.

- machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory']}, Linux {m['kernel']}
- relays: a Debian 12 and a Debian 13 container (systemd-nspawn), each in its own
  network namespace on a bridge (tests/system/internet.py), chatmail-relay installed from dist/repo with
  certificates from pebble (ACME, HTTP-01), DNS from nsd; both relays, DNS and the ACME
  server share this machine's {m['nproc']} CPUs
- clients: deltachat-rpc-server {DELTACHAT_VERSION} in relay A's container, alice on
  relay A and bob on relay B, verified by SecureJoin; alice sends, one message at a time,
  and the time until bob's client reports the incoming message is recorded
  (submission to A, A's filter and DKIM signing, SMTP to B with verified TLS, B's DKIM
  check and filter, LMTP, IMAP IDLE)

| what | result |
|---|---|
| network, both containers, both installs with certificates | {setup_seconds:.0f} s |
| messages | {len(latencies)} |
| median A→B | {median:.0f} ms |
| p95 A→B | {p95:.0f} ms |
| min / max | {min(latencies) * 1000:.0f} / {max(latencies) * 1000:.0f} ms |
"""
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
