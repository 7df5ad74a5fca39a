"""What our OpenRC scripts (alpine/*.initd) call where a systemd unit has a setting.

    python3 -m chatmaild.openrc wait-for-filter INI outgoing|incoming

supervise-daemon counts a service as started as soon as its process runs. filtermail
listens about a second later, and meanwhile Postfix answers mail with 451. systemd waits
for filtermail's READY=1 (Type=notify); OpenRC's supervise-daemon can do so only from
0.62 on (notify=socket:ready), and Debian 13's 0.56, which tests/openrc runs, cannot. So
the scripts' start_post waits with this until the filter greets an SMTP client, within
WAIT_SECONDS, or says why not.
"""

import argparse
import smtplib
import sys
import time

from .config import ConfigError, read_config
from .filtermail import LISTEN_HOST, listen_port

WAIT_SECONDS = 20
POLL_SECONDS = 0.1


def greets(port, timeout=2):
    """True when an SMTP server on LISTEN_HOST:port answers a connection with 220."""
    try:
        with smtplib.SMTP(LISTEN_HOST, port, local_hostname="localhost", timeout=timeout):
            return True
    except (OSError, smtplib.SMTPException):
        return False


def wait_until_greeting(port, seconds):
    deadline = time.monotonic() + seconds
    while not greets(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_SECONDS)
    return True


def wait_for_filter(inipath, mode, seconds=WAIT_SECONDS):
    """Exit status for the init script: 0 once the filter serves, else 1 with the reason
    on stderr."""
    try:
        port = listen_port(read_config(inipath), mode)
    except ConfigError as exc:
        print(f"filtermail: error: {exc}", file=sys.stderr)
        return 1
    if wait_until_greeting(port, seconds):
        return 0
    print(f"filtermail ({mode}) does not answer on {LISTEN_HOST}:{port} after {seconds} s:"
          " see its messages in the system log", file=sys.stderr)
    return 1


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 -m chatmaild.openrc")
    commands = parser.add_subparsers(dest="command", required=True)
    wait = commands.add_parser("wait-for-filter", help="wait until filtermail serves")
    wait.add_argument("inipath", metavar="INI")
    wait.add_argument("mode", choices=["outgoing", "incoming"])
    wait.add_argument("--seconds", type=float, default=WAIT_SECONDS)
    args = parser.parse_args(argv)
    return wait_for_filter(args.inipath, args.mode, args.seconds)


if __name__ == "__main__":
    sys.exit(main())
