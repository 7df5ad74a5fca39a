#!/usr/bin/python3
"""Does `systemctl restart postfix` wait systemd's 90 s stop timeout in a Debian 13 test
container, with and without our drop-in (PIDFile, Restart=always)? Two relays as in
bench_federation.py (the other one's Postfix running); in relay a, alternating, the
drop-in removed or put back (daemon-reload, restart), one STARTTLS connection to port 25
(so that Postfix has children that have served), then the timed restart. Prints each
restart's duration and relay a's Postfix journal (results/delivery-analysis.md, "The
waits after a Postfix restart"). Needs root, nsd, pebble, `make build`; under the system
tests' lock; a few minutes per round.

    /usr/bin/python3 bench/check_postfix_restart.py ROUNDS
"""
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from tests.system.internet import Internet  # noqa: E402
from tests.system.test_federation import federated_relays  # noqa: E402
from bench_federation import relays_of  # noqa: E402

rounds = int(sys.argv[1])
DROPIN = "/etc/systemd/system/postfix.service.d/chatmail.conf"
TRAFFIC = ("python3 -c \"import smtplib; s = smtplib.SMTP('127.0.0.1', 25); "
           "s.starttls(); s.ehlo(); s.quit()\"")
with Internet() as internet, federated_relays(internet, relays_of("trixie")) as relays:
    a = relays["a"]
    a.run(f"cp {DROPIN} /root/chatmail.conf")
    for n in range(rounds):
        for variant in ("without", "with"):
            if variant == "with":
                a.run(f"cp /root/chatmail.conf {DROPIN}")
            else:
                a.run(f"rm -f {DROPIN}")
            a.run("systemctl daemon-reload && systemctl restart postfix")
            time.sleep(3)
            a.run(TRAFFIC)
            time.sleep(1)
            t0 = time.monotonic()
            a.run("systemctl restart postfix")
            took = time.monotonic() - t0
            print(f"round {n} {variant} drop-in: restart took {took:.1f} s", flush=True)
    print(a.run("journalctl -u postfix -o short-precise --no-pager | grep 'systemd\\|master'",
                check=False).stdout)
