"""Structural checks that tell an OpenPGP-encrypted mail from a cleartext one.

A chatmail relay only carries end-to-end encrypted mail. It cannot decrypt anything, so it
checks the form instead: an RFC 3156 multipart/encrypted message whose armored payload holds
nothing but session-key packets (PKESK, SKESK) followed by one encrypted-data packet (SEIPD).
A literal-data packet (a signed-only or "stored" message) or any other packet type means the
content is readable by the relay and is therefore treated as cleartext.

The rules match upstream's filtermail so that both accept the same mail.
"""

import base64
import binascii

ARMOR_BEGIN = "-----BEGIN PGP MESSAGE-----\r\n"
ARMOR_END = "-----END PGP MESSAGE-----"
VERSION_HEADER = "Version: "

PACKET_PKESK = 1  # Public-Key Encrypted Session Key
PACKET_SKESK = 3  # Symmetric-Key Encrypted Session Key
PACKET_SEIPD = 18  # Symmetrically Encrypted and Integrity Protected Data
SESSION_KEY_PACKETS = (PACKET_PKESK, PACKET_SKESK)

SECUREJOIN_REQUESTS = ("vc-request", "vg-request")


def read_body_length(data, pos):
    """Return (body_length, position after the length octets) of a new-format packet.

    Partial body length chunks (RFC 4880 4.2.2.4) are skipped: they only occur in data
    packets, and what matters here is where the packet ends. Raises IndexError when the
    header runs past the end of `data`.
    """
    while 224 <= data[pos] < 255:
        pos += 1 + (1 << (data[pos] & 0x1F))
    first = data[pos]
    if first < 192:
        return first, pos + 1
    if first < 224:
        return ((first - 192) << 8) + data[pos + 1] + 192, pos + 2
    # first == 255: a four-octet length follows
    if pos + 5 > len(data):
        raise IndexError("truncated five-octet length")
    return int.from_bytes(data[pos + 1 : pos + 5], "big"), pos + 5


def check_openpgp_payload(data):
    """True if `data` is a sequence of PKESK/SKESK packets ending in exactly one SEIPD.

    Only new-format packet headers are accepted (as produced by rPGP, Sequoia and
    OpenPGP.js); old-format headers are refused, as upstream does.
    """
    pos = 0
    try:
        while pos < len(data):
            tag_octet = data[pos]
            if tag_octet & 0xC0 != 0xC0:
                return False
            packet_type = tag_octet & 0x3F
            body_length, pos = read_body_length(data, pos + 1)
            pos += body_length
            if pos == len(data):
                return packet_type == PACKET_SEIPD
            if packet_type not in SESSION_KEY_PACKETS:
                return False
    except IndexError:
        return False
    # Either empty data, or the last packet claimed more bytes than there are.
    return False


def armor_base64_lines(text, outgoing):
    """The base64 lines between the armor lines of an ASCII-armored message, or None.

    Outgoing mail must not carry armor headers. Incoming mail may start with one
    "Version: " header, because ProtonMail adds it. The CRC24 line is dropped: RFC 9580
    makes it optional, and its value does not matter for these checks.
    """
    if not text.startswith(ARMOR_BEGIN):
        return None
    inner = text[len(ARMOR_BEGIN) :]
    while inner.endswith("\r\n"):
        inner = inner[:-2]
    if not inner.endswith(ARMOR_END):
        return None
    inner = inner[: -len(ARMOR_END)]
    if inner.startswith(VERSION_HEADER):
        if outgoing:
            return None
        inner = inner.partition("\r\n")[2]
    lines = [line.rstrip(" \t") for line in inner.replace("\r\n", "\n").split("\n")]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    if lines and lines[-1].startswith("="):
        lines.pop()
    return lines


def check_armored_payload(text, outgoing):
    """True if `text` is an ASCII-armored PGP MESSAGE that contains only encrypted data."""
    lines = armor_base64_lines(text, outgoing)
    if not lines:
        return False
    try:
        data = base64.b64decode("".join(lines), validate=True)
    except (binascii.Error, ValueError):
        return False
    return check_openpgp_payload(data)


def decoded_text(part):
    """The part's body with its transfer encoding undone, as ASCII text, or None."""
    body = part.get_payload(decode=True)
    if not isinstance(body, bytes):
        return None
    try:
        return body.decode("ascii")
    except UnicodeDecodeError:
        return None


def check_encrypted(message, outgoing=True):
    """True if `message` is an RFC 3156 OpenPGP/MIME encrypted message.

    The top level must be multipart/encrypted with exactly two leaf parts: the
    application/pgp-encrypted "Version: 1" part and an application/octet-stream part that
    holds the armored encrypted payload.
    """
    if not message.is_multipart() or message.get_content_type() != "multipart/encrypted":
        return False
    parts = message.get_payload()
    if len(parts) != 2 or any(part.is_multipart() for part in parts):
        return False
    control, payload = parts
    if control.get_content_type() != "application/pgp-encrypted":
        return False
    control_text = decoded_text(control)
    if control_text is None or control_text.strip() != "Version: 1":
        return False
    if payload.get_content_type() != "application/octet-stream":
        return False
    payload_text = decoded_text(payload)
    return payload_text is not None and check_armored_payload(payload_text, outgoing)


def is_securejoin(message):
    """True for the first, necessarily unencrypted, message of a SecureJoin handshake.

    It is a multipart message with a `Secure-Join: vc-request` (or vg-request) header and a
    single text/plain part saying the same; nothing else can be carried in it.
    """
    if str(message.get("secure-join", "")) not in SECUREJOIN_REQUESTS:
        return False
    if not message.is_multipart():
        return False
    parts = message.get_payload()
    if len(parts) != 1:
        return False
    part = parts[0]
    if part.is_multipart() or part.get_content_type() != "text/plain":
        return False
    text = decoded_text(part)
    if text is None:
        return False
    return text.strip().lower() in {f"secure-join: {kind}" for kind in SECUREJOIN_REQUESTS}
