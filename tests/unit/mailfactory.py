"""Test mail for the filtermail tests: real OpenPGP output and the MIME around it.

Encrypted payloads are made at test time by `sqop` (Sequoia's Stateless OpenPGP CLI,
Debian package sqop) with keys generated in a temporary directory; the old-format packets
that must be refused come from `gpg` (GnuPG still writes those) in a temporary GNUPGHOME.
"""

import base64
import shutil
import subprocess
from pathlib import Path

import pytest

BOUNDARY = "b0undary-Xq3k9Vt2"


def crlf(text):
    """Bytes with CRLF line ends, as mail is on the wire."""
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")


def armor_crlf(armored):
    return armored.replace("\r\n", "\n").replace("\n", "\r\n")


def dearmor_bytes(armored):
    """The binary packets of an armored message (helper to craft broken variants)."""
    lines = armored.replace("\r\n", "\n").strip().split("\n")
    body = [line for line in lines[1:-1] if line and not line.startswith("=") and ":" not in line]
    return base64.b64decode("".join(body))


def armor(data, headers=(), crc=True):
    """ASCII-armor `data` as a PGP MESSAGE (CRLF line ends)."""
    text = base64.b64encode(data).decode()
    lines = ["-----BEGIN PGP MESSAGE-----", *headers, ""]
    lines += [text[i:i + 64] for i in range(0, len(text), 64)]
    if crc:
        lines.append("=" + base64.b64encode(crc24(data).to_bytes(3, "big")).decode())
    lines.append("-----END PGP MESSAGE-----")
    return "\r\n".join(lines) + "\r\n"


def crc24(data):
    crc = 0xB704CE
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return crc & 0xFFFFFF


def headers_text(from_addr, to_addr, subject, extra):
    lines = [
        f"From: <{from_addr}>",
        f"To: <{to_addr}>",
        f"Subject: {subject}",
        "Date: Mon, 02 Jun 2025 10:00:00 +0000",
        "Message-ID: <Mr.test.0001@example.org>",
        "Chat-Version: 1.0",
        "MIME-Version: 1.0",
        *extra,
    ]
    return "\n".join(lines)


def encrypted_mail(from_addr, to_addr, armored, subject="[...]", extra_headers=(),
                   version_part="Version: 1", payload_type="application/octet-stream",
                   payload_headers=(), parts=None):
    """An RFC 3156 multipart/encrypted message around `armored` (CRLF bytes).

    `parts` replaces the two standard parts with other MIME part texts, for fakes.
    """
    if parts is None:
        parts = [
            "Content-Type: application/pgp-encrypted\n"
            "Content-Description: PGP/MIME version identification\n\n"
            f"{version_part}\n",
            f"Content-Type: {payload_type}; name=\"encrypted.asc\"\n"
            "Content-Description: OpenPGP encrypted message\n"
            "Content-Disposition: inline; filename=\"encrypted.asc\"\n"
            + "".join(h + "\n" for h in payload_headers) + "\n"
            + armored.replace("\r\n", "\n"),
        ]
    head = headers_text(from_addr, to_addr, subject, [
        *extra_headers,
        "Content-Type: multipart/encrypted; protocol=\"application/pgp-encrypted\";",
        f"\tboundary=\"{BOUNDARY}\"",
    ])
    body = "".join(f"--{BOUNDARY}\n{part}\n" for part in parts) + f"--{BOUNDARY}--\n"
    return crlf(f"{head}\n\n\n{body}")


def plain_mail(from_addr, to_addr, body="Hello, this is cleartext.\n", subject="Hi",
               extra_headers=()):
    head = headers_text(from_addr, to_addr, subject, [
        *extra_headers, "Content-Type: text/plain; charset=utf-8",
    ])
    return crlf(f"{head}\n\n{body}")


def securejoin_mail(from_addr, to_addr, kind="vc-request", body=None, header=None,
                    extra_parts=()):
    body = f"Secure-Join: {kind}\n" if body is None else body
    head = headers_text(from_addr, to_addr, "Message from " + from_addr, [
        f"Secure-Join: {header or kind}",
        "Secure-Join-Invitenumber: 8dK2xQ9wVt",
        f"Content-Type: multipart/mixed; boundary=\"{BOUNDARY}\"",
    ])
    parts = [f"Content-Type: text/plain; charset=utf-8\n\n{body}", *extra_parts]
    text = "".join(f"--{BOUNDARY}\n{part}\n" for part in parts) + f"--{BOUNDARY}--\n"
    return crlf(f"{head}\n\n\n{text}")


def autocrypt_setup_mail(from_addr, to_addr, subject="Autocrypt Setup Message",
                         content_type="multipart/mixed"):
    head = headers_text(from_addr, to_addr, subject, [
        "Autocrypt-Setup-Message: v1",
        f"Content-Type: {content_type}; boundary=\"{BOUNDARY}\"",
    ])
    body = (
        f"--{BOUNDARY}\nContent-Type: text/plain\n\n"
        "This message holds your Autocrypt setup, encrypted with a setup code.\n"
        f"--{BOUNDARY}\nContent-Type: application/autocrypt-setup\n"
        "Content-Disposition: attachment; filename=\"autocrypt-setup-message.html\"\n\n"
        "<html><body><pre>\n-----BEGIN PGP MESSAGE-----\nPassphrase-Format: numeric9x4\n\n"
        "jA0EBwMCFAxADoCdzeX/0ukBlqI5\n=pulM\n-----END PGP MESSAGE-----\n</pre></body></html>\n"
        f"--{BOUNDARY}--\n"
    )
    return crlf(f"{head}\n\n{body}")


def mailer_daemon_mail(from_addr, to_addr, auto_submitted="auto-replied",
                       content_type="multipart/report"):
    extra = [f"Auto-Submitted: {auto_submitted}"] if auto_submitted else []
    head = "\n".join([
        f"From: Mail Delivery System <{from_addr}>",
        f"To: <{to_addr}>",
        "Subject: Undelivered Mail Returned to Sender",
        "Date: Mon, 02 Jun 2025 10:00:00 +0000",
        *extra,
        "MIME-Version: 1.0",
        f"Content-Type: {content_type}; report-type=delivery-status;",
        f"\tboundary=\"{BOUNDARY}\"",
    ])
    body = (
        f"--{BOUNDARY}\nContent-Type: text/plain; charset=us-ascii\n\n"
        "Your message could not be delivered to one or more recipients.\n\n"
        f"--{BOUNDARY}\nContent-Type: message/delivery-status\n\n"
        "Reporting-MTA: dns; mx.example.net\n\n"
        "Final-Recipient: rfc822; nobody@example.net\nAction: failed\nStatus: 5.1.1\n\n"
        f"--{BOUNDARY}--\n"
    )
    return crlf(f"{head}\n\n{body}")


def mdn_mail(from_addr, to_addr):
    head = headers_text(from_addr, to_addr, "Message opened", [
        "Auto-Submitted: auto-replied",
        "Content-Type: multipart/report; report-type=disposition-notification;",
        f"\tboundary=\"{BOUNDARY}\"",
    ])
    body = (
        f"--{BOUNDARY}\nContent-Type: text/plain; charset=utf-8\n\n"
        "The message was displayed on the screen of the recipient.\n\n"
        f"--{BOUNDARY}\nContent-Type: message/disposition-notification\n\n"
        "Reporting-UA: Delta Chat\nOriginal-Message-ID: <Mr.abc@example.org>\n"
        "Disposition: manual-action/MDN-sent-automatically; displayed\n\n"
        f"--{BOUNDARY}--\n"
    )
    return crlf(f"{head}\n\n\n{body}")


def nested_mail(from_addr, to_addr, depth):
    """A message of `depth` multipart/mixed levels, each the only part of the one above,
    around one text part: about 70 bytes a level."""
    opening = "".join(f'Content-Type: multipart/mixed; boundary="n{level}"\n\n--n{level}\n'
                      for level in range(depth))
    closing = "".join(f"--n{level}--\n" for level in reversed(range(depth)))
    head = headers_text(from_addr, to_addr, "[...]", [])
    return crlf(f"{head}\n{opening}Content-Type: text/plain\n\nHello\n{closing}")


class OpenPGP:
    """Real OpenPGP output from sqop (new-format packets) and gpg (old-format packets)."""

    def __init__(self, workdir):
        self.dir = Path(workdir)
        if shutil.which("sqop") is None:
            pytest.fail("sqop is not installed (apt-get install sqop): it makes the "
                        "encrypted test mail")
        self.key = self.dir / "alice.key"
        self.cert = self.dir / "alice.cert"
        self.cert2 = self.dir / "bob.cert"
        self.password_file = self.dir / "password"
        self.password_file.write_text("Securejoin-shared-secret-42")
        self.key.write_bytes(self._run("generate-key", "Alice <alice@example.org>"))
        self.cert.write_bytes(self._run("extract-cert", stdin=self.key.read_bytes()))
        bob_key = self._run("generate-key", "Bob <bob@example.org>")
        self.cert2.write_bytes(self._run("extract-cert", stdin=bob_key))
        self.gnupghome = self.dir / "gnupg"
        self.gnupghome.mkdir(mode=0o700)

    def _run(self, *args, stdin=b""):
        return subprocess.run(["sqop", *map(str, args)], input=stdin, check=True,
                              capture_output=True, timeout=60).stdout

    def encrypt(self, data=b"Hello, encrypted world!\n", certs=None):
        """PKESK(s) + SEIPD, armored."""
        certs = certs or [self.cert]
        return self._run("encrypt", *certs, stdin=data).decode()

    def encrypt_with_password(self, data=b"vc-request-pubkey\n", certs=()):
        """SKESK (+ PKESKs) + SEIPD, armored: what SecureJoin v3 sends."""
        return self._run("encrypt", "--with-password", self.password_file, *certs,
                         stdin=data).decode()

    def inline_sign(self, data=b"Signed, not encrypted.\n"):
        """One-pass signature + literal data + signature: readable by anyone."""
        return self._run("inline-sign", self.key, stdin=data).decode()

    def decrypt(self, armored):
        return self._run("decrypt", self.key, stdin=armored.encode())

    def _gpg(self, *args, stdin):
        if shutil.which("gpg") is None:
            pytest.fail("gpg is not installed (apt-get install gpg)")
        return subprocess.run(
            ["gpg", "--homedir", str(self.gnupghome), "--batch", "--quiet",
             "--no-tty", *args],
            input=stdin, check=True, capture_output=True, timeout=60,
        ).stdout.decode()

    def gpg_store(self, data=b"Stored, not encrypted.\n"):
        """A literal data packet in GnuPG's old packet format."""
        return self._gpg("--store", "--armor", stdin=data)

    def gpg_symmetric(self, data=b"Symmetric, old format.\n"):
        """SKESK + SEIPD as GnuPG 2.2 writes them: old-format packet headers."""
        return self._gpg("--pinentry-mode", "loopback", "--passphrase", "pw",
                         "--symmetric", "--armor", stdin=data)

    def close(self):
        if shutil.which("gpgconf"):
            subprocess.run(["gpgconf", "--homedir", str(self.gnupghome), "--kill", "all"],
                           capture_output=True, timeout=30)


@pytest.fixture(scope="session")
def openpgp(tmp_path_factory):
    tool = OpenPGP(tmp_path_factory.mktemp("openpgp"))
    yield tool
    tool.close()
