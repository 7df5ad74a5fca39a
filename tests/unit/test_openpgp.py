"""The encryption checks, on real OpenPGP output (sqop, gpg) and on crafted breakage."""

import base64

import pytest

from chatmaild.filtermail import parse_message
from chatmaild.openpgp import (
    check_armored_payload,
    check_encrypted,
    check_openpgp_payload,
    is_securejoin,
)

from .mailfactory import (
    armor,
    armor_crlf,
    dearmor_bytes,
    encrypted_mail,
    mdn_mail,
    openpgp,  # noqa: F401  (fixture)
    plain_mail,
    securejoin_mail,
)

FROM, TO = "alice@chat.example.org", "bob@example.net"


def mail(armored, **kwargs):
    return parse_message(encrypted_mail(FROM, TO, armored, **kwargs))


def both_directions(message):
    return check_encrypted(message, outgoing=True), check_encrypted(message, outgoing=False)


# -- packet structure -----------------------------------------------------------------------


def new_packet(tag, body):
    """A new-format packet with a one-, two- or five-octet length."""
    n = len(body)
    if n < 192:
        length = bytes([n])
    elif n < 8384:
        length = bytes([((n - 192) >> 8) + 192, (n - 192) & 0xFF])
    else:
        length = b"\xff" + n.to_bytes(4, "big")
    return bytes([0xC0 | tag]) + length + body


def partial_packet(tag, body, chunk_power=9):
    """A new-format packet using partial body lengths, as streaming encoders write."""
    chunk = 1 << chunk_power
    out = bytes([0xC0 | tag])
    rest = body
    while len(rest) > chunk:
        out += bytes([224 + chunk_power]) + rest[:chunk]
        rest = rest[chunk:]
    return out + new_packet(0, rest)[1:]


PKESK = new_packet(1, b"\x03" + b"k" * 90)
SKESK = new_packet(3, b"\x04\x09\x03" + b"s" * 40)
SEIPD = new_packet(18, b"\x01" + b"e" * 300)


@pytest.mark.parametrize("packets", [
    [PKESK, SEIPD],
    [SKESK, SEIPD],
    [PKESK, PKESK, SKESK, SEIPD],
    [SEIPD],
    [PKESK, new_packet(18, b"\x01" + b"x" * 100_000)],  # five-octet length
    [PKESK, partial_packet(18, b"\x01" + b"p" * 5000)],
])
def test_valid_packet_sequences(packets):
    assert check_openpgp_payload(b"".join(packets))


@pytest.mark.parametrize("packets", [
    [],
    [PKESK],
    [SKESK],
    [SEIPD, SEIPD],
    [SEIPD, PKESK],
    [PKESK, new_packet(11, b"b\x00\x00\x00\x00\x00Hello")],  # literal data
    [new_packet(11, b"b\x00\x00\x00\x00\x00Hello")],
    [new_packet(8, b"\x01compressed")],  # compressed data
    [PKESK, new_packet(9, b"old symmetrically encrypted")],  # SED without MDC
    [new_packet(2, b"signature"), SEIPD],
    [PKESK, SEIPD, new_packet(21, b"padding")],
])
def test_invalid_packet_sequences(packets):
    assert not check_openpgp_payload(b"".join(packets))


def test_old_format_packet_headers_are_refused():
    # Old format: bit 6 clear, tag in bits 5-2, length type in bits 1-0.
    old_pkesk = bytes([0x80 | (1 << 2) | 0, len(PKESK) - 2]) + PKESK[2:]
    assert not check_openpgp_payload(old_pkesk + SEIPD)
    old_seipd = bytes([0x80 | (18 & 0xF) << 2 | 1]) + (len(SEIPD) - 3).to_bytes(2, "big")
    assert not check_openpgp_payload(PKESK + old_seipd + SEIPD[3:])


@pytest.mark.parametrize("cut", [1, 2, 5, 50])
def test_truncated_packets_are_refused(cut):
    assert not check_openpgp_payload((PKESK + SEIPD)[:-cut])
    assert not check_openpgp_payload((PKESK + SEIPD)[:len(PKESK) + 1])


@pytest.mark.parametrize("header", [b"\xd2", b"\xd2\xc5", b"\xd2\xff\x00\x00", b"\xd2\xe9"])
def test_truncated_length_octets_are_refused(header):
    assert not check_openpgp_payload(PKESK + header)


def test_trailing_garbage_after_seipd_is_refused():
    assert not check_openpgp_payload(PKESK + SEIPD + b"\x00")


def test_huge_claimed_length_is_refused_quickly():
    assert not check_openpgp_payload(PKESK + b"\xd2\xff\xff\xff\xff\xff" + b"x" * 10)
    assert not check_openpgp_payload(PKESK + b"\xd2\xfe" + b"x" * 10)  # 1 GiB partial


# -- ASCII armor ----------------------------------------------------------------------------


def test_real_armor_passes(openpgp):
    armored = armor_crlf(openpgp.encrypt())
    assert check_armored_payload(armored, outgoing=True)
    assert check_armored_payload(armored, outgoing=False)


def test_trailing_newlines_are_tolerated(openpgp):
    armored = armor_crlf(openpgp.encrypt()).rstrip("\r\n")
    for suffix in ("", "\r\n", "\r\n\r\n\r\n"):
        assert check_armored_payload(armored + suffix, outgoing=True)


def test_version_header_only_incoming(openpgp):
    data = dearmor_bytes(openpgp.encrypt())
    armored = armor(data, headers=["Version: ProtonMail"])
    assert not check_armored_payload(armored, outgoing=True)
    assert check_armored_payload(armored, outgoing=False)


@pytest.mark.parametrize("headers", [
    ["Comment: https://example.org"],
    ["Version: ProtonMail", "Comment: hello"],
    ["Charset: UTF-8"],
])
def test_other_armor_headers_are_refused(openpgp, headers):
    armored = armor(dearmor_bytes(openpgp.encrypt()), headers=headers)
    assert not check_armored_payload(armored, outgoing=True)
    assert not check_armored_payload(armored, outgoing=False)


def test_missing_crc_is_tolerated(openpgp):
    # RFC 9580 makes the checksum optional; newer implementations leave it out.
    data = dearmor_bytes(openpgp.encrypt())
    assert check_armored_payload(armor(data, crc=False), outgoing=True)


@pytest.mark.parametrize("armored", [
    "",
    "-----BEGIN PGP MESSAGE-----\r\n\r\n-----END PGP MESSAGE-----\r\n",
    "-----BEGIN PGP MESSAGE-----\r\n\r\nHELLOWORLD\r\n-----END PGP MESSAGE-----\r\n",
    "-----BEGIN PGP MESSAGE-----\r\n\r\n=njUN\r\n-----END PGP MESSAGE-----\r\n",
    "-----BEGIN PGP MESSAGE-----\r\nHi!\r\n-----END PGP MESSAGE-----\r\n",
    "-----BEGIN PGP MESSAGE-----\r\n\r\nwV4D!!!!\r\n=abcd\r\n-----END PGP MESSAGE-----\r\n",
])
def test_garbage_armor_is_refused(armored):
    assert not check_armored_payload(armored, outgoing=True)
    assert not check_armored_payload(armored, outgoing=False)


def test_wrong_armor_lines_are_refused(openpgp):
    armored = armor_crlf(openpgp.encrypt())
    for wrong in ("PGP SIGNATURE", "PGP PUBLIC KEY BLOCK", "PGP SIGNED MESSAGE"):
        assert not check_armored_payload(armored.replace("PGP MESSAGE", wrong), True)
    assert not check_armored_payload(armored.replace("-----END PGP MESSAGE-----", ""), True)
    assert not check_armored_payload("Preamble\r\n" + armored, True)
    assert not check_armored_payload(armored + "Trailer\r\n", True)


def test_lf_only_armor_is_refused(openpgp):
    # Mail arrives with CRLF; an armor with bare LF did not come through an SMTP client.
    assert not check_armored_payload(openpgp.encrypt().replace("\r\n", "\n"), True)


def test_truncated_armor_is_refused(openpgp):
    lines = armor_crlf(openpgp.encrypt()).split("\r\n")
    # drop one base64 line from the middle: the packet lengths no longer add up
    broken = "\r\n".join(lines[:3] + lines[4:])
    assert not check_armored_payload(broken, outgoing=True)


def test_non_ascii_in_armor_is_refused(openpgp):
    armored = armor_crlf(openpgp.encrypt())
    assert not check_armored_payload(armored.replace("\r\n\r\n", "\r\n\r\nä", 1), True)


def test_literal_packet_armor_is_refused():
    literal = new_packet(11, b"b\x00\x00\x00\x00\x00Hello world!")
    assert not check_armored_payload(armor(literal), outgoing=True)
    assert not check_armored_payload(armor(literal), outgoing=False)


def test_real_signed_only_message_is_refused(openpgp):
    assert not check_armored_payload(armor_crlf(openpgp.inline_sign()), outgoing=True)


def test_gnupg_old_format_output_is_refused(openpgp):
    assert not check_armored_payload(armor_crlf(openpgp.gpg_store()), outgoing=True)
    assert not check_armored_payload(armor_crlf(openpgp.gpg_symmetric()), outgoing=True)


# -- RFC 3156 MIME structure ----------------------------------------------------------------


def test_public_key_encrypted_mail_is_encrypted(openpgp):
    armored = openpgp.encrypt()
    assert openpgp.decrypt(armored) == b"Hello, encrypted world!\n"  # really encrypted
    assert both_directions(mail(armored)) == (True, True)


def test_mail_to_several_recipients_is_encrypted(openpgp):
    armored = openpgp.encrypt(certs=[openpgp.cert, openpgp.cert2])
    assert both_directions(mail(armored)) == (True, True)


def test_password_encrypted_mail_is_encrypted(openpgp):
    # SecureJoin v3's vc-request-pubkey is symmetrically encrypted: SKESK + SEIPD.
    assert both_directions(mail(openpgp.encrypt_with_password())) == (True, True)
    armored = openpgp.encrypt_with_password(certs=[openpgp.cert])
    assert both_directions(mail(armored)) == (True, True)


def test_large_encrypted_mail_is_encrypted(openpgp):
    armored = openpgp.encrypt(b"x" * 2_000_000)
    assert both_directions(mail(armored)) == (True, True)


def test_base64_transfer_encoded_payload_is_decoded(openpgp):
    armored = armor_crlf(openpgp.encrypt())
    wrapped = base64.encodebytes(armored.encode()).decode()
    message = mail(wrapped, payload_headers=["Content-Transfer-Encoding: base64"])
    assert both_directions(message) == (True, True)


@pytest.mark.parametrize("kind", ["signed", "store", "gpg-symmetric"])
def test_real_unencrypted_pgp_mail_is_refused(openpgp, kind):
    armored = {
        "signed": openpgp.inline_sign,
        "store": openpgp.gpg_store,
        "gpg-symmetric": openpgp.gpg_symmetric,
    }[kind]()
    assert both_directions(mail(armored)) == (False, False)


def test_cleartext_mails_are_not_encrypted():
    assert not check_encrypted(parse_message(plain_mail(FROM, TO)))
    assert not check_encrypted(parse_message(mdn_mail(FROM, TO)))
    armor_lookalike = "-----BEGIN PGP MESSAGE-----\nHi!\n-----END PGP MESSAGE-----\n"
    fake = plain_mail(FROM, TO, body=armor_lookalike)
    assert not check_encrypted(parse_message(fake), outgoing=False)


def test_version_part_must_say_version_1(openpgp):
    armored = openpgp.encrypt()
    assert not check_encrypted(mail(armored, version_part="Version: 2"))
    assert not check_encrypted(mail(armored, version_part="Hello"))
    assert check_encrypted(mail(armored, version_part="  Version: 1  \n"))


def test_payload_part_must_be_octet_stream(openpgp):
    assert not check_encrypted(mail(openpgp.encrypt(), payload_type="text/plain"))


def test_missing_or_extra_parts_are_refused(openpgp):
    armored = openpgp.encrypt()
    version = "Content-Type: application/pgp-encrypted\n\nVersion: 1\n"
    payload = "Content-Type: application/octet-stream\n\n" + armored.replace("\r\n", "\n")
    cleartext = "Content-Type: text/plain\n\nReadable by anyone.\n"
    assert check_encrypted(mail(armored, parts=[version, payload]))
    assert not check_encrypted(mail(armored, parts=[version]))
    assert not check_encrypted(mail(armored, parts=[payload]))
    assert not check_encrypted(mail(armored, parts=[payload, version]))
    assert not check_encrypted(mail(armored, parts=[version, payload, cleartext]))
    assert not check_encrypted(mail(armored, parts=[version, payload, payload]))


def test_nested_multipart_is_refused(openpgp):
    armored = openpgp.encrypt()
    nested = (
        "Content-Type: multipart/mixed; boundary=\"inner\"\n\n"
        "--inner\nContent-Type: text/plain\n\nsecret\n--inner--\n"
    )
    version = "Content-Type: application/pgp-encrypted\n\nVersion: 1\n"
    assert not check_encrypted(mail(armored, parts=[version, nested]))
    assert not check_encrypted(mail(armored, parts=[nested, version]))


def test_multipart_encrypted_without_boundary_is_refused(openpgp):
    raw = encrypted_mail(FROM, TO, openpgp.encrypt()).replace(
        b'\tboundary="b0undary-Xq3k9Vt2"', b"\tx-other=1")
    assert not check_encrypted(parse_message(raw))


def test_malformed_mime_does_not_crash():
    for raw in [b"", b"\r\n", b"garbage without headers",
                b"Content-Type: multipart/encrypted\r\n\r\n--x\r\n",
                b"Content-Type: multipart/encrypted; boundary=x\r\n\r\n--x\r\n\r\n--x--\r\n",
                b"\xff\xfe\x00Content-Type: \xff/\xfe\r\n\r\n\xff"]:
        message = parse_message(raw)
        assert not check_encrypted(message)
        assert not is_securejoin(message)


# -- SecureJoin ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["vc-request", "vg-request"])
def test_securejoin_requests_are_recognized(kind):
    assert is_securejoin(parse_message(securejoin_mail(FROM, TO, kind=kind)))
    message = securejoin_mail(FROM, TO, kind=kind, body=f"  SECURE-JOIN: {kind.upper()}  \n")
    assert is_securejoin(parse_message(message))


@pytest.mark.parametrize("kwargs", [
    {"body": "Buy cheap watches!\n"},
    {"body": "Secure-Join: vc-request\nand more text\n"},
    {"header": "vc-auth-required"},
    {"header": "VC-REQUEST"},
    {"kind": "vc-request-with-auth"},
    {"extra_parts": ["Content-Type: text/plain\n\nsecond part\n"]},
])
def test_securejoin_fakes_are_refused(kwargs):
    assert not is_securejoin(parse_message(securejoin_mail(FROM, TO, **kwargs)))


def test_securejoin_must_be_multipart_with_text_part():
    single = plain_mail(FROM, TO, body="Secure-Join: vc-request\n",
                        extra_headers=["Secure-Join: vc-request"])
    assert not is_securejoin(parse_message(single))
    html = securejoin_mail(FROM, TO).replace(b"text/plain", b"text/html")
    assert not is_securejoin(parse_message(html))
    no_header = securejoin_mail(FROM, TO).replace(b"Secure-Join: vc-request\r\nSecure-Join-I",
                                                   b"Secure-Join-I")
    assert not is_securejoin(parse_message(no_header))
