"""Incoming DKIM verification: real dkimpy signatures made with keys generated here, keys
served by an injected lookup function or by a small DNS server on 127.0.0.1."""

import asyncio
import base64
import secrets
import socket
import threading
import time

import dkim
import pytest

from chatmaild.dkimverify import (
    DNS_TEMPORARY_FAILURE,
    FAILURE_CACHE_TTL,
    NO_SIGNATURE,
    NO_VALID_SIGNATURE,
    DnsTemporaryError,
    TxtLookup,
    check_dkim_async,
    is_ip_literal,
)

from .dkimkeys import SIGNED_HEADERS, KeyDirectory, generate_rsa_key
from .mailfactory import plain_mail


@pytest.fixture(scope="module")
def rsa_key():
    return generate_rsa_key()


@pytest.fixture(scope="module")
def other_rsa_key():
    return generate_rsa_key()


@pytest.fixture
def keys(rsa_key):
    directory = KeyDirectory()
    directory.publish("sel", "example.org", rsa_key[1])
    return directory


def sign(message, domain, key, selector="sel"):
    signature = dkim.sign(message, selector.encode(), domain.encode(), key[0],
                          include_headers=SIGNED_HEADERS)
    return signature + message


def check_dkim(content, from_domain, keys):
    """The incoming filter's DKIM check, with keys from `keys` instead of DNS."""
    return asyncio.run(check_dkim_async(content, from_domain, keys.lookup))


def mail_from(addr, body="Hello there.\n"):
    return plain_mail(addr, "bob@chat.example.net", body=body)


def test_valid_aligned_signature_passes(rsa_key, keys, caplog):
    caplog.set_level("INFO", logger="chatmaild.dkimverify")
    signed = sign(mail_from("alice@example.org"), "example.org", rsa_key)
    assert check_dkim(signed, "example.org", keys) is None
    assert keys.lookups == ["sel._domainkey.example.org."]
    assert ("DKIM signature of d=example.org verified with key sel._domainkey.example.org."
            in caplog.messages)


def test_alignment_ignores_case(rsa_key, keys):
    signed = sign(mail_from("alice@EXAMPLE.org"), "Example.ORG", rsa_key)
    assert check_dkim(signed, "EXAMPLE.org", keys) is None


def test_internationalized_from_domain_matches_its_a_label(rsa_key, keys):
    keys.publish("sel", "xn--bcher-kva.example", rsa_key[1])
    signed = sign(mail_from("info@xn--bcher-kva.example"), "xn--bcher-kva.example", rsa_key)
    assert check_dkim(signed, "bücher.example", keys) is None
    assert check_dkim(signed, "xn--bcher-kva.example.", keys) is None


def test_missing_signature(keys):
    assert check_dkim(mail_from("alice@example.org"), "example.org", keys) == NO_SIGNATURE
    assert keys.lookups == []


def test_altered_body_fails(rsa_key, keys):
    signed = sign(mail_from("alice@example.org"), "example.org", rsa_key)
    tampered = signed.replace(b"Hello there.", b"Hello th3re.")
    assert check_dkim(tampered, "example.org", keys) == NO_VALID_SIGNATURE


def test_altered_signed_header_fails(rsa_key, keys):
    signed = sign(mail_from("alice@example.org"), "example.org", rsa_key)
    tampered = signed.replace(b"Subject: Hi", b"Subject: Ho")
    assert check_dkim(tampered, "example.org", keys) == NO_VALID_SIGNATURE


def test_added_second_from_header_fails(rsa_key, keys):
    signed = sign(mail_from("alice@example.org"), "example.org", rsa_key)
    tampered = signed.replace(b"To: ", b"From: <mallory@example.org>\r\nTo: ", 1)
    assert check_dkim(tampered, "example.org", keys) == NO_VALID_SIGNATURE


def test_signature_of_another_domain_is_not_aligned(rsa_key, keys):
    keys.publish("sel", "other.org", rsa_key[1])
    signed = sign(mail_from("alice@example.org"), "other.org", rsa_key)
    assert check_dkim(signed, "example.org", keys) == NO_VALID_SIGNATURE
    # valid for its own domain, but never even looked up for example.org
    assert keys.lookups == []


def test_subdomain_signatures_are_not_aligned(rsa_key, keys):
    keys.publish("sel", "mail.example.org", rsa_key[1])
    signed = sign(mail_from("alice@example.org"), "mail.example.org", rsa_key)
    assert check_dkim(signed, "example.org", keys) == NO_VALID_SIGNATURE
    signed = sign(mail_from("alice@mail.example.org"), "example.org", rsa_key)
    assert check_dkim(signed, "mail.example.org", keys) == NO_VALID_SIGNATURE


def test_any_aligned_valid_signature_suffices(rsa_key, other_rsa_key, keys):
    keys.publish("sel", "other.org", other_rsa_key[1])
    keys.publish("broken", "example.org", other_rsa_key[1])  # not the signing key
    message = mail_from("alice@example.org")
    message = sign(message, "other.org", other_rsa_key)
    message = sign(message, "example.org", rsa_key, selector="broken")
    assert check_dkim(message, "example.org", keys) == NO_VALID_SIGNATURE
    message = sign(message, "example.org", rsa_key)
    assert check_dkim(message, "example.org", keys) is None


def test_only_a_few_aligned_signatures_are_tried(rsa_key, other_rsa_key, keys):
    message = sign(mail_from("alice@example.org"), "example.org", rsa_key)  # valid, last
    for index in range(10):  # invalid, each with a key of its own
        keys.publish(f"other{index}", "example.org", other_rsa_key[1])
        message = sign(message, "example.org", rsa_key, selector=f"other{index}")
    assert check_dkim(message, "example.org", keys) == NO_VALID_SIGNATURE
    assert len(keys.lookups) == 5


def test_wrong_key_in_dns_fails(rsa_key, other_rsa_key, keys):
    keys.publish("sel", "example.org", other_rsa_key[1])
    signed = sign(mail_from("alice@example.org"), "example.org", rsa_key)
    assert check_dkim(signed, "example.org", keys) == NO_VALID_SIGNATURE


def test_missing_or_broken_key_record_fails(rsa_key, keys):
    signed = sign(mail_from("alice@example.org"), "example.org", rsa_key, selector="gone")
    assert check_dkim(signed, "example.org", keys) == NO_VALID_SIGNATURE
    keys.publish("gone", "example.org", b"v=DKIM1; k=rsa; p=bm90IGEga2V5")
    assert check_dkim(signed, "example.org", keys) == NO_VALID_SIGNATURE
    keys.publish("gone", "example.org", b"v=DKIM1; p=")  # revoked
    assert check_dkim(signed, "example.org", keys) == NO_VALID_SIGNATURE


def test_too_small_key_fails(keys):
    small = generate_rsa_key(512)
    keys.publish("small", "example.org", small[1])
    signed = sign(mail_from("alice@example.org"), "example.org", small, selector="small")
    assert check_dkim(signed, "example.org", keys) == NO_VALID_SIGNATURE


def test_temporary_dns_failure_asks_to_retry(rsa_key, keys):
    keys.records["sel._domainkey.example.org."] = DnsTemporaryError("timeout")
    signed = sign(mail_from("alice@example.org"), "example.org", rsa_key)
    assert check_dkim(signed, "example.org", keys) == DNS_TEMPORARY_FAILURE
    assert DNS_TEMPORARY_FAILURE.startswith("451 ")


def test_ip_literal_from_is_not_checked(keys):
    assert is_ip_literal("[192.0.2.1]") and not is_ip_literal("example.org")
    unsigned = mail_from("alice@[192.0.2.1]")
    assert check_dkim(unsigned, "[192.0.2.1]", keys) is None
    assert keys.lookups == []


def test_no_usable_from_domain(rsa_key, keys):
    signed = sign(mail_from("alice@example.org"), "example.org", rsa_key)
    assert check_dkim(signed, None, keys) == NO_VALID_SIGNATURE
    assert check_dkim(mail_from("alice@example.org"), None, keys) == NO_SIGNATURE


@pytest.mark.parametrize("header", [
    b"DKIM-Signature: garbage\r\n",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org\r\n",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=sel; h=from; bh=!!; b=!!\r\n",
    b"DKIM-Signature: v=1; a=rsa-sha999; d=example.org; s=sel; h=from; bh=AA==; b=AA==\r\n",
    b"DKIM-Signature: v=1; d=\xff\xfe; s=sel\r\n",
    b"DKIM-Signature: d=example.org; d=example.org\r\n",
])
def test_malformed_signatures_fail_without_crash(keys, header):
    message = header + mail_from("alice@example.org")
    assert check_dkim(message, "example.org", keys) == NO_VALID_SIGNATURE


def test_unparsable_message_fails_without_crash(keys):
    assert check_dkim(b"\x00\xff not a header\r\n\r\n", "example.org", keys) in (
        NO_SIGNATURE, NO_VALID_SIGNATURE)


def der(tag, body):
    length = len(body)
    if length < 128:
        return bytes([tag, length]) + body
    octets = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(octets)]) + octets + body


def rsa_key_record(modulus, exponent):
    """A DKIM key record with any RSA numbers (PKCS#1 RSAPublicKey, as dkimpy reads it)."""
    numbers = b"".join(der(0x02, number.to_bytes(number.bit_length() // 8 + 1, "big"))
                       for number in (modulus, exponent))
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(der(0x30, numbers))


@pytest.mark.parametrize("modulus_bits, exponent_bits, problem", [
    (16384, 17, "an RSA modulus of 16384 bits"),
    (8192, 8192, "an RSA exponent of 8192 bits"),  # 2.7 s of RSA in Python, were it used
])
def test_keys_too_costly_to_verify_are_refused(rsa_key, keys, caplog, modulus_bits,
                                               exponent_bits, problem):
    modulus = secrets.randbits(modulus_bits) | 1 << (modulus_bits - 1) | 1
    exponent = secrets.randbits(exponent_bits) | 1 << (exponent_bits - 1) | 1
    keys.publish("sel", "example.org", rsa_key_record(modulus, exponent))
    signed = sign(mail_from("alice@example.org"), "example.org", rsa_key)
    started = time.monotonic()
    assert check_dkim(signed, "example.org", keys) == NO_VALID_SIGNATURE
    assert time.monotonic() - started < 1
    assert f"DKIM key sel._domainkey.example.org. refused: {problem}" in caplog.messages


def test_largest_accepted_key_is_used(rsa_key, keys, caplog):
    modulus = int.from_bytes(b"\xff" * 1024, "big")  # 8192 bits, e of 64 bits
    keys.publish("sel", "example.org", rsa_key_record(modulus, (1 << 64) - 1))
    signed = sign(mail_from("alice@example.org"), "example.org", rsa_key)
    assert check_dkim(signed, "example.org", keys) == NO_VALID_SIGNATURE
    assert not [message for message in caplog.messages if "refused" in message]


def test_ed25519_signature(keys):
    nacl_signing = pytest.importorskip("nacl.signing")
    key = nacl_signing.SigningKey.generate()
    keys.publish("ed", "example.org",
                 b"v=DKIM1; k=ed25519; p=" + base64.b64encode(bytes(key.verify_key)))
    message = mail_from("alice@example.org")
    signature = dkim.sign(message, b"ed", b"example.org", base64.b64encode(bytes(key)),
                          signature_algorithm=b"ed25519-sha256",
                          include_headers=SIGNED_HEADERS)
    assert check_dkim(signature + message, "example.org", keys) is None


# -- DNS lookups through a real resolver --------------------------------------------------


class TinyDNS:
    """A UDP DNS server on 127.0.0.1 answering TXT queries from a dict.

    Names in `servfail` get SERVFAIL, names in `silent` get no answer at all.
    """

    def __init__(self, records, ttl=300):
        import dns.message
        import dns.rcode
        import dns.rrset

        self.dns = dns
        self.records = records
        self.ttl = ttl
        self.servfail = set()
        self.silent = set()
        self.queries = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        dns = self.dns
        while self.running:
            try:
                wire, peer = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            query = dns.message.from_wire(wire)
            name = query.question[0].name.to_text().lower()
            self.queries.append(name)
            if name in self.silent:
                continue
            response = dns.message.make_response(query)
            if name in self.servfail:
                response.set_rcode(dns.rcode.SERVFAIL)
            elif name in self.records:
                strings = self.records[name]
                rrset = dns.rrset.from_text(
                    name, self.ttl, "IN", "TXT",
                    *[" ".join(f'"{s}"' for s in record) for record in strings])
                response.answer.append(rrset)
            else:
                response.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(response.to_wire(), peer)

    def stop(self):
        self.running = False
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def tiny_dns():
    servers = []

    def start(records, ttl=300):
        server = TinyDNS(records, ttl)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def lookup_for(server, **kwargs):
    return TxtLookup(nameservers=["127.0.0.1"], port=server.port, **kwargs)


def look_up(lookup, *names):
    """The answers to `names`, looked up concurrently (exceptions returned)."""

    async def run():
        return await asyncio.gather(*(lookup(name) for name in names), return_exceptions=True)

    answers = asyncio.run(run())
    return answers[0] if len(names) == 1 else answers


def test_txt_lookup_joins_strings_and_picks_the_key_record(tiny_dns):
    server = tiny_dns({
        "sel._domainkey.example.org.": [["v=spf1 -all"], ["v=DKIM1; k=rsa; ", "p=QUJD"]],
    })
    lookup = lookup_for(server)
    assert look_up(lookup, b"sel._domainkey.example.org.") == b"v=DKIM1; k=rsa; p=QUJD"


def test_txt_lookup_caches_answers_and_absence(tiny_dns):
    server = tiny_dns({"a._domainkey.example.org.": [["p=QUJD"]]}, ttl=60)
    now = [0.0]
    lookup = lookup_for(server, clock=lambda: now[0])
    for _ in range(3):
        assert look_up(lookup, b"a._domainkey.example.org.") == b"p=QUJD"
        assert look_up(lookup, b"missing._domainkey.example.org.") is None
    assert len(server.queries) == 2
    now[0] += 61  # past the record's TTL; the negative answer is still cached
    assert look_up(lookup, b"A._domainkey.EXAMPLE.org.") == b"p=QUJD"
    assert look_up(lookup, b"missing._domainkey.example.org.") is None
    assert len(server.queries) == 3


def test_txt_lookup_cache_is_bounded(tiny_dns):
    server = tiny_dns({})
    lookup = lookup_for(server, cache_size=3)
    for index in range(5):
        look_up(lookup, f"n{index}.example.org.".encode())
    assert len(lookup._cache) == 3
    look_up(lookup, b"n0.example.org.")
    assert len(server.queries) == 6


def test_txt_lookup_failures_are_temporary_and_remembered_briefly(tiny_dns):
    server = tiny_dns({})
    server.servfail.add("broken.example.org.")
    server.silent.add("slow.example.org.")
    now = [0.0]
    lookup = lookup_for(server, lifetime=0.3, clock=lambda: now[0])
    assert isinstance(look_up(lookup, b"broken.example.org."), DnsTemporaryError)
    assert isinstance(look_up(lookup, b"slow.example.org."), DnsTemporaryError)
    queries = len(server.queries)
    # the sender's retry within FAILURE_CACHE_TTL is answered without waiting again
    assert isinstance(look_up(lookup, b"broken.example.org."), DnsTemporaryError)
    assert isinstance(look_up(lookup, b"slow.example.org."), DnsTemporaryError)
    assert len(server.queries) == queries
    now[0] += FAILURE_CACHE_TTL + 1
    server.servfail.clear()
    assert look_up(lookup, b"broken.example.org.") is None
    assert len(server.queries) > queries


def test_txt_lookup_of_impossible_names(tiny_dns):
    server = tiny_dns({})
    lookup = lookup_for(server)
    assert look_up(lookup, b"\xff\xfe._domainkey.example.org.") is None
    assert look_up(lookup, ("x" * 70 + "._domainkey.example.org.").encode()) is None
    assert server.queries == []


def test_concurrent_lookups_of_one_name_share_one_query(tiny_dns):
    server = tiny_dns({"a._domainkey.example.org.": [["p=QUJD"]]})
    lookup = lookup_for(server)
    assert look_up(lookup, *["a._domainkey.example.org."] * 20) == [b"p=QUJD"] * 20
    assert server.queries == ["a._domainkey.example.org."]


def test_few_lookups_per_signing_domain_run_at_once(tiny_dns):
    server = tiny_dns({})
    for n in range(10):
        server.silent.add(f"s{n}._domainkey.stalled.example.")
    lookup = lookup_for(server, lifetime=0.5, per_domain=2)

    async def run():
        names = [f"s{n}._domainkey.stalled.example." for n in range(10)]
        tasks = [asyncio.ensure_future(lookup(name)) for name in names]
        await asyncio.sleep(0.3)
        in_flight = len(server.queries)
        await asyncio.gather(*tasks, return_exceptions=True)
        return in_flight

    # dnspython sends each query once within 0.3 s; the other eight names wait their turn
    assert asyncio.run(run()) == 2
    assert lookup._domain_slots == {}


def test_check_dkim_through_dns(tiny_dns, rsa_key):
    record = rsa_key[1].decode()
    # long keys are published as several strings of at most 255 characters
    chunks = [record[i:i + 255] for i in range(0, len(record), 255)]
    server = tiny_dns({"sel._domainkey.example.org.": [chunks]})
    lookup = lookup_for(server)
    signed = sign(mail_from("alice@example.org"), "example.org", rsa_key)
    assert asyncio.run(check_dkim_async(signed, "example.org", lookup)) is None
    tampered = signed.replace(b"Hello", b"Jello")
    assert asyncio.run(check_dkim_async(tampered, "example.org", lookup)) == (
        NO_VALID_SIGNATURE)
    assert server.queries == ["sel._domainkey.example.org."]


def test_check_dkim_gives_up_after_its_budget(tiny_dns, rsa_key):
    server = tiny_dns({})
    server.silent.add("sel._domainkey.example.org.")
    lookup = lookup_for(server)
    signed = sign(mail_from("alice@example.org"), "example.org", rsa_key)
    started = time.monotonic()
    reply = asyncio.run(check_dkim_async(signed, "example.org", lookup, budget=0.5))
    assert reply == DNS_TEMPORARY_FAILURE
    assert time.monotonic() - started < 2
