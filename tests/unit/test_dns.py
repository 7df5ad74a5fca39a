"""`chatmail dns`: the zone it prints, and --check against a real DNS server (NSD)."""

import json
import re

import pytest

from chatmaild.admin import dns as relay_dns
from chatmaild.admin import dnscheck, dnsrecords
from chatmaild.admin.cli import main
from chatmaild.config import read_config

from .dkimkeys import generate_rsa_key
from .nsd import nsd  # noqa: F401 (fixture)

IPV4, IPV6 = "203.0.113.5", "2001:db8:5::1"  # documentation ranges: DNS data only
ACCOUNT = "https://acme-v02.api.letsencrypt.org/acme/acct/1371472956"


@pytest.fixture(scope="session")
def dkim_key(tmp_path_factory):
    """(path of an OpenDKIM-style private key, its public key in base64), by openssl."""
    private, txt = generate_rsa_key(2048)
    path = tmp_path_factory.mktemp("dkimkeys") / "opendkim.private"
    path.write_bytes(private)
    path.chmod(0o600)
    return path, txt.decode().partition("p=")[2]


@pytest.fixture
def letsencrypt(tmp_path):
    """A certbot configuration directory with one Let's Encrypt account."""
    base = tmp_path / "letsencrypt"
    account = base / "accounts" / dnsrecords.LETSENCRYPT_SERVER / "0123abcd"
    account.mkdir(parents=True)
    (account / "regr.json").write_text(json.dumps({"body": {}, "uri": ACCOUNT}))
    return base


def zone_lines(text):
    """{(name, type): [data, ...]} of the records in zone text."""
    records = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith(";"):
            name, ttl, klass, rtype, data = line.split(None, 4)
            assert (ttl, klass) == ("3600", "IN")
            records.setdefault((name, rtype), []).append(data)
    return records


def required_part(text):
    return text.split("; Recommended")[0]


def dns_command(ini, *args, dkim_key=None):
    argv = ["--config", str(ini), "dns", *map(str, args)]
    if dkim_key:
        argv += ["--dkim-key", str(dkim_key)]
    return main(argv)


# -- the zone ------------------------------------------------------------------------------


def test_zone_of_a_domain_with_acme(make_config, dkim_key, letsencrypt, nsd, tmp_path):
    config = make_config("chat.example.org")
    server = nsd("chat.example.org", "")  # nothing published yet
    facts = relay_dns.gather_facts(
        config, ipv4=[IPV4], ipv6=[IPV6], dkim_key=dkim_key[0],
        letsencrypt_dir=letsencrypt,
        resolver=dnscheck.Resolver("chat.example.org.", ["127.0.0.1"], server.port))
    text = dnsrecords.zone_text(config, facts, dnsrecords.relay_records(config, facts))
    records = zone_lines(text)
    d = "chat.example.org."
    sts_id = facts.sts_id
    assert re.fullmatch(r"\d{12}", sts_id)  # a new one: DNS had none
    assert records == {
        (d, "A"): [IPV4],
        (d, "AAAA"): [IPV6],
        (d, "MX"): [f"10 {d}"],
        (f"_mta-sts.{d}", "TXT"): [f'"v=STSv1; id={sts_id}"'],
        (f"mta-sts.{d}", "CNAME"): [d],
        (f"www.{d}", "CNAME"): [d],
        (f"opendkim._domainkey.{d}", "TXT"): records[(f"opendkim._domainkey.{d}", "TXT")],
        (d, "TXT"): ['"v=spf1 a ~all"'],
        (f"_dmarc.{d}", "TXT"): ['"v=DMARC1;p=reject;adkim=s;aspf=s"'],
        (d, "CAA"): [f'0 issue "letsencrypt.org;accounturi={ACCOUNT}"'],
        (f"_adsp._domainkey.{d}", "TXT"): ['"dkim=discardable"'],
        (f"_submission._tcp.{d}", "SRV"): [f"0 1 587 {d}"],
        (f"_submissions._tcp.{d}", "SRV"): [f"0 1 465 {d}"],
        (f"_imap._tcp.{d}", "SRV"): [f"0 1 143 {d}"],
        (f"_imaps._tcp.{d}", "SRV"): [f"0 1 993 {d}"],
    }
    required = required_part(text)
    for name in ["MX", "_mta-sts", "mta-sts.", "www.", "opendkim._domainkey"]:
        assert name in required
    for name in ["v=spf1", "_dmarc", "CAA", "_adsp", "SRV"]:
        assert name not in required


def test_dkim_record_carries_the_public_key_in_255_character_strings(make_config, dkim_key):
    config = make_config("_chat.example.org")
    facts = relay_dns.gather_facts(config, ipv4=[IPV4], dkim_key=dkim_key[0])
    text = dnsrecords.zone_text(config, facts, dnsrecords.relay_records(config, facts))
    [data] = zone_lines(text)[("opendkim._domainkey._chat.example.org.", "TXT")]
    strings = re.findall(r'"([^"]*)"', data)
    assert len(strings) == 2 and all(len(s) <= 255 for s in strings)
    assert len(strings[0]) == 255
    assert "".join(strings) == f"v=DKIM1;k=rsa;p={dkim_key[1]};s=email;t=s"
    # the one-string variant for web forms, as a comment
    assert f"; v=DKIM1;k=rsa;p={dkim_key[1]};s=email;t=s" in text


def test_zone_of_an_underscore_domain_has_no_mta_sts_and_no_caa(make_ini, dkim_key, tmp_path,
                                                                 capsys):
    """Self-signed relays: no ACME, so neither MTA-STS nor CAA; no DNS lookup at all."""
    ini = make_ini("_chat.example.org")
    zone = tmp_path / "zone"
    assert dns_command(ini, "--zonefile", zone, "--ipv4", IPV4, "--ipv6", IPV6,
                       dkim_key=dkim_key[0]) == 0
    assert f"to {zone}" in capsys.readouterr().out
    records = zone_lines(zone.read_text())
    d = "_chat.example.org."
    assert records[(d, "A")] == [IPV4] and records[(d, "MX")] == [f"10 {d}"]
    assert records[(f"www.{d}", "CNAME")] == [d]
    assert (f"opendkim._domainkey.{d}", "TXT") in records
    assert not any("mta-sts" in name for name, _ in records)
    assert not any(rtype == "CAA" for _, rtype in records)


def test_zone_without_ipv6_when_disabled(make_config):
    config = make_config("_chat.example.org", disable_ipv6="true")
    facts = dnsrecords.RelayFacts(ipv4=[IPV4], ipv6=[IPV6], dkim_public_key="AAAA")
    types = {r.rtype for r in dnsrecords.relay_records(config, facts)}
    assert "A" in types and "AAAA" not in types


def test_an_ipv4_relay_needs_no_dns(make_ini, capsys):
    assert dns_command(make_ini("192.0.2.7"), "--check") == 0
    out = capsys.readouterr().out
    assert "needs no DNS records" in out and "name@[192.0.2.7]" in out


def test_missing_dkim_key_is_reported(make_ini, tmp_path, capsys):
    ini = make_ini("_chat.example.org")
    assert dns_command(ini, "--ipv4", IPV4, dkim_key=tmp_path / "none.private") == 1
    captured = capsys.readouterr()
    assert "does not exist; 'chatmail configure' creates it" in captured.out
    assert "The DKIM record is missing" in captured.out


def test_existing_mta_sts_id_is_kept(make_ini, dkim_key, nsd, tmp_path, capsys):
    """A new id would tell sending servers the policy changed when it did not."""
    server = nsd("chat.example.org",
                 '_mta-sts.chat.example.org. 3600 IN TXT "v=STSv1; id=202403211706"\n')
    zone = tmp_path / "zone"
    dns_command(make_ini("chat.example.org"), "--zonefile", zone, "--ipv4", IPV4,
                "--nameserver", "127.0.0.1", "--nameserver-port", server.port,
                dkim_key=dkim_key[0])
    assert zone_lines(zone.read_text())[("_mta-sts.chat.example.org.", "TXT")] == [
        '"v=STSv1; id=202403211706"']


# -- facts from the host and from certbot -----------------------------------------------------


FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
           |-- 127.0.0.1
              /32 host LOCAL
     |-- 10.1.2.3
        /32 host LOCAL
     |-- 203.0.113.255
        /32 link BROADCAST
     |-- 93.184.216.34
        /32 host LOCAL
Local:
     |-- 93.184.216.34
        /32 host LOCAL
"""

IF_INET6 = """\
00000000000000000000000000000001 01 80 10 80       lo
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
2a0104f8c0120000000000000000000a 02 40 00 80     eth0
2a0104f8c0120000abcdef0123456789 02 40 00 01     eth0
2a0104f8c012000000000000000000bb 02 40 00 20     eth0
fd000000000000000000000000000002 04 40 00 82     eth0
"""


def test_host_addresses_are_the_public_stable_ones(tmp_path):
    (tmp_path / "fib_trie").write_text(FIB_TRIE)
    (tmp_path / "if_inet6").write_text(IF_INET6)
    assert dnsrecords.host_ipv4_addresses(tmp_path / "fib_trie") == ["93.184.216.34"]
    # not loopback, link-local, ULA, temporary (0x01) or deprecated (0x20)
    assert dnsrecords.host_ipv6_addresses(tmp_path / "if_inet6") == ["2a01:4f8:c012::a"]


def test_host_addresses_of_this_machine_are_readable():
    for address in dnsrecords.host_ipv4_addresses() + dnsrecords.host_ipv6_addresses():
        assert ":" in address or address.count(".") == 3


def test_acme_account_of_the_domains_certificate_wins(letsencrypt):
    other = letsencrypt / "accounts" / dnsrecords.LETSENCRYPT_SERVER / "ffff"
    other.mkdir()
    (other / "regr.json").write_text(json.dumps({"body": {}, "uri": ACCOUNT + "0"}))
    assert dnsrecords.acme_account_uri("chat.example.org", letsencrypt) == ""  # ambiguous
    (letsencrypt / "renewal").mkdir()
    (letsencrypt / "renewal" / "chat.example.org.conf").write_text(
        "version = 2.1.0\n[renewalparams]\naccount = ffff\nauthenticator = webroot\n")
    assert dnsrecords.acme_account_uri("chat.example.org", letsencrypt) == ACCOUNT + "0"


def test_no_caa_record_for_another_acme_server(make_config, dkim_key, letsencrypt, nsd):
    """certbot set up with another ACME server (its `server` in the renewal file): a CAA
    record naming Let's Encrypt would forbid that CA, and its own CAA name is unknown."""
    (letsencrypt / "renewal").mkdir()
    (letsencrypt / "renewal" / "chat.example.org.conf").write_text(
        "[renewalparams]\naccount = 0123\nserver = https://acme.example.net/dir\n")
    config = make_config("chat.example.org")
    server = nsd("chat.example.org", "")
    facts = relay_dns.gather_facts(
        config, ipv4=[IPV4], dkim_key=dkim_key[0], letsencrypt_dir=letsencrypt,
        resolver=dnscheck.Resolver("chat.example.org.", ["127.0.0.1"], server.port))
    records = dnsrecords.relay_records(config, facts)
    assert not [record for record in records if record.rtype == "CAA"]
    assert facts.acme_account_uri == ""


def test_no_acme_account(tmp_path):
    assert dnsrecords.acme_account_uri("chat.example.org", tmp_path / "none") == ""


# -- --check against a real DNS server ------------------------------------------------------------


@pytest.fixture
def published(make_ini, dkim_key, letsencrypt, nsd, tmp_path):
    """publish(edit=None) -> (ini, server): the relay's own zone, as `chatmail dns
    --zonefile` wrote it (edited by edit(text) -> text), served by NSD."""
    config = read_config(make_ini("chat.example.org"))
    facts = relay_dns.gather_facts(config, ipv4=[IPV4], ipv6=[IPV6], dkim_key=dkim_key[0],
                                   letsencrypt_dir=letsencrypt)
    text = dnsrecords.zone_text(config, facts, dnsrecords.relay_records(config, facts))

    def publish(edit=None):
        server = nsd("chat.example.org", edit(text) if edit else text)
        return config, text, server

    return publish


def zone_line(zone, name, rtype):
    """The line of `zone` for record `name` `rtype`, as the check tells to publish it."""
    [line] = [line for line in zone.splitlines()
              if line.split()[:1] == [name] and line.split()[3:4] == [rtype]]
    return line


def check(config, server, dkim_key, letsencrypt, out):
    return relay_dns.run(config, check=True, ipv4=[IPV4], ipv6=[IPV6],
                         nameservers=["127.0.0.1"], port=server.port, dkim_key=dkim_key[0],
                         letsencrypt_dir=letsencrypt, out=out.append)


def test_check_all_good(published, dkim_key, letsencrypt):
    config, _, server = published()
    out = []
    assert check(config, server, dkim_key, letsencrypt, out) == 0
    text = "\n".join(out)
    assert "MISSING" not in text and "WRONG" not in text
    assert len([line for line in out if line.startswith("OK ")]) == 15
    assert "All required records are in place." in text


def test_check_reports_a_missing_required_record(published, dkim_key, letsencrypt):
    config, zone, server = published(
        lambda text: "\n".join(line for line in text.splitlines()
                               if not line.startswith("opendkim._domainkey")) + "\n")
    out = []
    assert check(config, server, dkim_key, letsencrypt, out) == 1
    text = "\n".join(out)
    assert "MISSING   opendkim._domainkey.chat.example.org. TXT" in text
    line = zone_line(zone, "opendkim._domainkey.chat.example.org.", "TXT")
    assert f'"v=DKIM1;k=rsa;p={dkim_key[1][:20]}' in line
    assert "publish: " + line in text
    assert "1 required record(s) missing or wrong" in text
    assert text.count("MISSING") == 1 and "WRONG" not in text


def test_check_reports_a_wrong_required_record(published, dkim_key, letsencrypt):
    config, zone, server = published(
        lambda text: text.replace("MX     10 chat.example.org.", "MX     10 mx.example.net."))
    out = []
    assert check(config, server, dkim_key, letsencrypt, out) == 1
    text = "\n".join(out)
    assert "WRONG     chat.example.org. MX: 10 mx.example.net." in text
    assert "publish: " + zone_line(zone, "chat.example.org.", "MX") in text
    assert "WRONG" in text and "MISSING" not in text


def test_check_a_missing_recommended_record_only_warns(published, dkim_key, letsencrypt):
    config, _, server = published(lambda text: text.replace('"v=spf1 a ~all"', '"other"'))
    out = []
    assert check(config, server, dkim_key, letsencrypt, out) == 0
    text = "\n".join(out)
    assert "MISSING*  chat.example.org. TXT" in text
    assert "1 recommended record(s)" in text


def test_check_wrong_dkim_key_and_address(published, dkim_key, letsencrypt):
    def edit(text):
        text = re.sub(r"p=[A-Za-z0-9+/]{20}", "p=AAAAAAAAAAAAAAAAAAAA", text, count=1)
        return text.replace(f"A      {IPV4}", "A      198.51.100.9")

    config, _, server = published(edit)
    out = []
    assert check(config, server, dkim_key, letsencrypt, out) == 1
    text = "\n".join(out)
    assert "WRONG     opendkim._domainkey.chat.example.org. TXT" in text
    assert "WRONG     chat.example.org. A: 198.51.100.9" in text
    assert "198.51.100.9 is not an address of this relay" in text


def test_check_caa_that_forbids_lets_encrypt_fails(published, dkim_key, letsencrypt):
    config, _, server = published(
        lambda text: re.sub(r'CAA .*', 'CAA    0 issue "sectigo.com"', text))
    out = []
    assert check(config, server, dkim_key, letsencrypt, out) == 1
    assert "forbids Let's Encrypt" in "\n".join(out)


def test_check_accepts_address_records_instead_of_cname(published, dkim_key, letsencrypt):
    def edit(text):
        line = zone_line(text, "www.chat.example.org.", "CNAME")
        return text.replace(line, f"www.chat.example.org. 3600 IN A {IPV4}")

    config, _, server = published(edit)
    out = []
    assert check(config, server, dkim_key, letsencrypt, out) == 0
    assert "address records instead of a CNAME" in "\n".join(out)


def test_check_through_the_command(published, dkim_key, letsencrypt, capsys):
    config, _, server = published()
    status = dns_command(config.inipath, "--check", "--ipv4", IPV4, "--ipv6", IPV6,
                         "--nameserver", "127.0.0.1", "--nameserver-port", server.port,
                         dkim_key=dkim_key[0])
    out = capsys.readouterr().out
    assert status == 0, out
    assert f"Checking the DNS records of chat.example.org with 127.0.0.1 port {server.port}" in out


def test_check_without_an_answering_server_fails(make_config, dkim_key):
    from ..conftest import free_port

    config = make_config("_chat.example.org")
    out = []
    assert relay_dns.run(config, check=True, ipv4=[IPV4], nameservers=["127.0.0.1"],
                         port=free_port(), dkim_key=dkim_key[0], timeout=0.5,
                         out=out.append) == 1
    assert "DNS lookup failed" in "\n".join(out)
