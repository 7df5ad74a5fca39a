"""The time from the end of an LMTP delivery into Dovecot to the EXISTS an IDLE-ing IMAP
client gets, which is where Dovecot's 500 ms notification delay (and the instant-IDLE
plugin) acts. Run inside a relay's container with Debian's python3 (common.idle_wakeups,
for tests/system/test_install.py), it prints one JSON list of seconds; bench_idle_plugin.py
and tests/config/test_dovecot.py import its functions.
Usage: idle_meter.py DOMAIN COUNT"""

import imaplib
import json
import socket
import ssl
import sys
import time

LMTP_SOCKET = "/var/spool/postfix/private/dovecot-lmtp"
PASSWORD = "idle-meter-password"


def login(address):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    imap = imaplib.IMAP4_SSL("127.0.0.1", 993, ssl_context=ctx)
    imap.login(address, PASSWORD)  # the first login creates the account
    imap.select("INBOX")
    return imap


def lmtp_deliver(address, number, socket_path=LMTP_SOCKET, timeout=None, content=None):
    """Deliver one message straight to Dovecot; returns time.monotonic() at Dovecot's
    reply to DATA (bench_idle_plugin.py uses it too). content: the message's lines
    (CRLF, dot-stuffed, without the final "."); default a bare one with the number."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        stream = sock.makefile("rwb")

        def command(line):
            stream.write(line + b"\r\n")
            stream.flush()
            while (reply := stream.readline())[3:4] == b"-":
                pass
            if not reply.startswith((b"2", b"3")):
                raise RuntimeError(f"LMTP {line!r} to {socket_path}: {reply!r}")

        stream.readline()
        for line in (b"LHLO meter", b"MAIL FROM:<meter@localhost>",
                     b"RCPT TO:<" + address.encode() + b">", b"DATA"):
            command(line)
        command((content or b"Subject: %d\r\n\r\nbody" % number) + b"\r\n.")
        return time.monotonic()


def idle_wakeup(imap, address, number, socket_path=LMTP_SOCKET):
    """Seconds from the end of one LMTP delivery to the EXISTS the IDLE-ing `imap` (its
    INBOX selected) gets (tests/config/test_dovecot.py uses it too)."""
    tag = imap._new_tag()
    imap.send(tag + b" IDLE\r\n")
    imap.readline()  # "+ idling"
    delivered = imap_exists_after(imap, lmtp_deliver(address, number, socket_path))
    imap.send(b"DONE\r\n")
    while not imap.readline().startswith(tag):
        pass
    return delivered


def imap_exists_after(imap, delivered_at):
    while b"EXISTS" not in imap.readline():
        pass
    return time.monotonic() - delivered_at


def main():
    domain, count = sys.argv[1], int(sys.argv[2])
    address = "idlemeter@" + domain
    imap = login(address)
    print(json.dumps([idle_wakeup(imap, address, number) for number in range(count)]))


if __name__ == "__main__":
    main()
