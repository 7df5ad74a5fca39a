"""Runs inside a bench container with Debian's python3, next to an installed relay, driven
by bench_relay_latency.py: plain protocol clients (no Delta Chat) measure the time from
the start of an SMTP submission on port 465 (implicit TLS, AUTH PLAIN) to the `* N EXISTS`
the recipient's IMAP IDLE (port 993) receives. Every step of the way is the relay's:
smtpd, filtermail, Postfix's queue and LMTP, Dovecot.

One JSON command per line on stdin, one JSON reply per line on stdout:
  {"do": "setup", "hibernating": K}   create the accounts (first login), one message each
  {"do": "idle", "number": N}         one submission to the client IDLE-ing for a moment
  {"do": "arm"}                       the K hibernation clients start their IDLE
  {"do": "fire", "client": I, "number": N}   one submission to hibernation client I
  {"do": "imap_processes"}            how many imap processes run (hibernated: gone)
  {"do": "reconnect"}                 new IMAP connections for the hibernation clients
  {"do": "quit"}
A measurement's reply: {"connect": ..., "authed": ..., "accepted": ..., "exists": ...},
seconds after the submission's start (before the TCP connect to port 465); `accepted` is
the 250 to the end of DATA.
Usage: relay_meter.py DOMAIN"""

import base64
import json
import smtplib
import socket
import ssl
import sys
import threading
import time
from pathlib import Path

PASSWORD = "relay-meter-password-1234"
TIMEOUT = 60  # a hibernated client waits up to imap_hibernate_timeout + this, in IDLE
SENDER, IDLER = "sendbench", "idlebench"  # doveauth's default: 9 characters

CONTEXT = ssl.create_default_context()
CONTEXT.check_hostname = False
CONTEXT.verify_mode = ssl.CERT_NONE


def nodelay(sock):
    """The clients do not wait for ACKs (no Nagle): what remains is the relay's."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class Submission(smtplib.SMTP_SSL):
    def _get_socket(self, host, port, timeout):
        sock = nodelay(socket.create_connection((host, port), timeout))
        return self.context.wrap_socket(sock, server_hostname=host)


def message(sender, recipient, number):
    """What filtermail lets through: an OpenPGP-encrypted message's form (PKESK + SEIPD
    packets), as tests/system/test_debian13.py sends it."""
    packets = bytes([0xC1, 12]) + bytes(12) + bytes([0xD2, 40, 1]) + bytes(39)
    return (
        f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: [...]\r\n"
        f"Message-ID: <bench.{number}.{time.time_ns()}@relay-meter>\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; '
        'boundary="b"\r\n\r\n--b\r\nContent-Type: application/pgp-encrypted\r\n\r\n'
        "Version: 1\r\n\r\n--b\r\nContent-Type: application/octet-stream\r\n\r\n"
        "-----BEGIN PGP MESSAGE-----\r\n\r\n" + base64.b64encode(packets).decode()
        + "\r\n-----END PGP MESSAGE-----\r\n\r\n--b--\r\n").encode()


class Imap:
    """LOGIN (creates the account), SELECT INBOX, IDLE, EXISTS, DONE, over TLS on 993 by
    default (bench_idle_plugin.py uses it too, against its own Dovecot)."""

    def __init__(self, address, password=PASSWORD, port=993, tls=True, timeout=TIMEOUT):
        self.address = address
        self.sock = nodelay(socket.create_connection(("127.0.0.1", port), timeout=timeout))
        if tls:
            self.sock = CONTEXT.wrap_socket(self.sock)
        self.stream = self.sock.makefile("rwb")
        self.tag = 0
        self.stream.readline()
        self.command(f"LOGIN {address} {password}")
        self.command("SELECT INBOX")

    def send(self, line):
        self.stream.write(line.encode() + b"\r\n")
        self.stream.flush()

    def command(self, line):
        self.tag += 1
        tag = f"a{self.tag}".encode()
        self.send(f"a{self.tag} {line}")
        while not (reply := self.stream.readline()).startswith(tag):
            if not reply:
                raise RuntimeError(f"{self.address}: connection closed")
        if b" OK" not in reply:
            raise RuntimeError(f"{self.address}: {line}: {reply!r}")

    def idle(self):
        self.tag += 1
        self.idle_tag = f"a{self.tag}".encode()
        self.send(f"a{self.tag} IDLE")
        if not self.stream.readline().startswith(b"+"):
            raise RuntimeError(f"{self.address}: IDLE refused")

    def exists_at(self):
        """time.monotonic() when IDLE reads the next EXISTS."""
        while b"EXISTS" not in (line := self.stream.readline()):
            if not line:
                raise RuntimeError(f"{self.address}: connection closed in IDLE")
        return time.monotonic()

    def wait_exists(self, found):
        """exists_at() into `found`, or the error (a reader thread's result)."""
        try:
            found.append(self.exists_at())
        except Exception as error:  # noqa: BLE001 - reported by the caller
            found.append(error)

    def done(self):
        self.send("DONE")
        while not (line := self.stream.readline()).startswith(self.idle_tag):
            if not line:
                raise RuntimeError(f"{self.address}: connection closed after DONE")

    def close(self):
        try:
            self.command("LOGOUT")
        except (OSError, RuntimeError):
            pass
        self.sock.close()


class Meter:
    def __init__(self, domain):
        self.domain = domain
        self.sender = f"{SENDER}@{domain}"
        self.idler = None
        self.hibernating = []

    def submit(self, recipient, number):
        start = time.monotonic()
        smtp = Submission("127.0.0.1", 465, context=CONTEXT, timeout=TIMEOUT)
        connected = time.monotonic()
        smtp.login(self.sender, PASSWORD)
        authed = time.monotonic()
        smtp.sendmail(self.sender, [recipient], message(self.sender, recipient, number))
        accepted = time.monotonic()
        return smtp, start, {"connect": connected - start, "authed": authed - start,
                             "accepted": accepted - start}

    def measure(self, client, number):
        """Submission to `client`, IDLE-ing; its EXISTS timed by a thread reading it."""
        found = []
        reader = threading.Thread(target=client.wait_exists, args=(found,))
        reader.start()
        smtp, start, times = self.submit(client.address, number)
        reader.join(TIMEOUT)
        smtp.quit()
        if not found or isinstance(found[0], Exception):
            raise RuntimeError(f"no EXISTS for {client.address}: {found}")
        times["exists"] = found[0] - start
        client.done()
        return times

    def setup(self, hibernating):
        Imap(self.sender).command("LOGOUT")  # the account exists from its first login
        names = [IDLER] + [f"hibern{i:03d}" for i in range(hibernating)]
        for name in names:  # accounts, and their mailbox files outside the measurement
            Imap(f"{name}@{self.domain}").command("LOGOUT")
            smtp, _, _ = self.submit(f"{name}@{self.domain}", 0)
            smtp.quit()
        time.sleep(2)  # delivered before SELECT, else IDLE would report them at once
        self.idler = Imap(f"{IDLER}@{self.domain}")
        self.hibernating = [Imap(f"{name}@{self.domain}") for name in names[1:]]
        self.idler.idle()  # warm-up: one measured delivery, not reported
        self.measure(self.idler, 0)
        return {}

    def idle(self, number):
        self.idler.idle()
        return self.measure(self.idler, number)

    def reconnect(self):
        """New connections for the hibernation clients (after a `doveadm reload`: the
        new configuration applies to new sessions only)."""
        for client in self.hibernating:
            try:
                client.command("LOGOUT")
            except (OSError, RuntimeError):
                pass
            client.sock.close()
        self.hibernating = [Imap(client.address) for client in self.hibernating]
        return {}

    def arm(self):
        for client in self.hibernating:
            client.idle()
        return {}

    def fire(self, client, number):
        return self.measure(self.hibernating[client], number)

    @staticmethod
    def imap_processes():
        count = 0
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and (entry / "comm").read_text().strip() == "imap":
                    count += 1
            except OSError:
                pass
        return {"count": count}


def main():
    meter = Meter(sys.argv[1])
    for line in sys.stdin:
        command = json.loads(line)
        verb = command.pop("do")
        if verb == "quit":
            break
        try:
            reply = getattr(meter, verb)(**command)
        except Exception as error:  # noqa: BLE001 - the driver stops on it
            reply = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
