"""`chatmail dkim rotate` on a relay that federates (test_federation's test network: nsd
serves the zones, pebble the certificates): mail from relay a keeps passing relay b's
DKIM check before, during and after a rotation, also mail signed with the old key that
waited in a's queue while the keys switched."""

import re
import time

import pytest

from .test_federation import (  # noqa: F401 (fixtures)
    SUBMIT_ENCRYPTED,
    internet,
    journal,
    publish_dns,
    queue,
    relays,
    reload_postfix,
)

LOGIN = r"""
import smtplib, ssl, sys
with smtplib.SMTP_SSL(sys.argv[1], 465, context=ssl.create_default_context()) as smtp:
    smtp.login(sys.argv[2], sys.argv[3])
"""
PASSWORD = "rotation-password"


def account(box, user):
    """user@<box's domain>, made by its first login (from the other relay's container is
    fine: the relays reach each other's port 465)."""
    address = f"{user}@{box.domain}"
    box.run(f"python3 - {box.domain} {address} {PASSWORD}", input=LOGIN)
    return address


def submit(a, sender, recipient):
    a.run(f"python3 - {sender} {PASSWORD} {recipient}", input=SUBMIT_ENCRYPTED)


def delivery(a, recipient, timeout=60):
    """(queue id, reply) of relay a's delivery to `recipient` on relay b's port 25."""
    deadline = time.monotonic() + timeout
    while True:
        match = re.search(rf"(\w+): to=<{re.escape(recipient)}>, relay=relay-b\.test\[[\d.]+\]:25,"
                          r".* status=\w+ \((.*)\)", journal(a, f"to=<{recipient}>"))
        if match:
            return match.group(1), match.group(2)
        assert time.monotonic() < deadline, journal(a, recipient)
        time.sleep(0.5)


def signing_selector(a, queue_id):
    """The selector relay a's OpenDKIM signed message `queue_id` with."""
    found = re.findall(rf"{queue_id}: DKIM-Signature field added \(s=([\w-]+), d=relay-a\.test\)",
                       journal(a, f"{queue_id}: DKIM-Signature"))
    assert len(found) == 1, journal(a, queue_id)
    return found[0]


def sent_and_signed(a, sender, recipient):
    """Submit sender -> recipient at relay a; the selector it was signed with, once relay
    b has taken it (its incoming filter verifies the signature: an invalid one is 554)."""
    submit(a, sender, recipient)
    queue_id, reply = delivery(a, recipient)
    assert reply.startswith("250"), reply
    return signing_selector(a, queue_id)


def key_table(a):
    return a.run("cat /etc/dkimkeys/KeyTable").stdout.split()


@pytest.fixture(scope="module")
def published(relays, internet):
    publish_dns(relays, internet)
    return relays


def test_mail_verifies_before_during_and_after_a_rotation(published, internet):
    a, b = published["a"], published["b"]
    sender = account(a, "rotsender")
    recipients = {phase: account(b, f"{phase}") for phase in
                  ("before001", "during001", "inflight1", "after0001")}

    assert sent_and_signed(a, sender, recipients["before001"]) == "opendkim"

    # -- a new key: made, its record printed, not used yet
    out = a.run("chatmail dkim rotate").stdout
    selector = re.search(r"selector (dkim\d{8})", out).group(1)
    assert re.search(rf"^{selector}\._domainkey\.relay-a\.test\.\s+3600\s+IN\s+TXT\s+"
                     r'"v=DKIM1;k=rsa;p=', out, re.M), out
    assert "DNS does not serve the new record yet" in out, out
    a.run(f"test -s /etc/dkimkeys/relay-a.test.{selector}.private")
    assert a.run(f"stat -c '%U %a' /etc/dkimkeys/relay-a.test.{selector}.private"
                 ).stdout.split() == ["opendkim", "600"]
    assert key_table(a)[0] == "opendkim._domainkey.relay-a.test"
    status = a.run("chatmail status", check=False).stdout
    assert re.search(r"DKIM selector\s+opendkim ", status), status
    assert re.search(rf"DKIM rotation\s+new key {selector} waits", status), status
    # dns --check wants the new record too
    check = a.run(f"chatmail dns --check --ipv4 {a.address}", check=False)
    assert check.returncode == 1, check.stdout
    assert re.search(rf"^MISSING\s+{selector}\._domainkey\.relay-a\.test\. TXT", check.stdout,
                     re.M), check.stdout

    assert sent_and_signed(a, sender, recipients["during001"]) == "opendkim"
    out = a.run("chatmail dkim rotate").stdout
    assert f"A rotation to {selector} is pending" in out, out
    assert key_table(a)[0] == "opendkim._domainkey.relay-a.test"

    # -- mail signed with the old key waits in relay a's queue while the keys switch
    a.run("postconf -e defer_transports=smtp")
    reload_postfix(a)
    try:
        # queued after the reinjection that signs it: signed with the old key
        submit(a, sender, recipients["inflight1"])
        assert [message["recipients"][0]["address"] for message in queue(a)] == [
            recipients["inflight1"]], queue(a)
        # the admin publishes what `chatmail dns` now lists; configure switches
        publish_dns({"a": a}, internet)
        out = a.run("chatmail configure").stdout
        assert f"Switched: mail is signed with {selector} from now on." in out, out
    finally:
        a.run("postconf -X defer_transports")
        reload_postfix(a)
    a.run("postqueue -f")
    queue_id, reply = delivery(a, recipients["inflight1"])
    assert reply.startswith("250"), reply
    assert signing_selector(a, queue_id) == "opendkim"

    # -- after: the new key signs, and relay b verifies it
    assert key_table(a) == [f"{selector}._domainkey.relay-a.test",
                            f"relay-a.test:{selector}:/etc/dkimkeys/relay-a.test.{selector}.private"]
    assert sent_and_signed(a, sender, recipients["after0001"]) == selector
    status = a.run("chatmail dkim status").stdout
    assert f"signing with selector {selector}" in status, status
    assert "retired: selector opendkim: keep its record opendkim._domainkey.relay-a.test." in (
        status), status
    zone = a.run(f"chatmail dns --ipv4 {a.address}").stdout
    assert re.search(r"^; Replaced, but keep it until .*: opendkim\._domainkey\.relay-a\.test\. "
                     "TXT$", zone, re.M), zone
    assert a.run("chatmail status", check=False).returncode == 0


def test_a_second_rotation_switches_through_the_command(published, internet):
    """`chatmail dkim rotate` itself switches once the record is published, and writes
    OpenDKIM's tables and reloads it."""
    a, b = published["a"], published["b"]
    out = a.run("chatmail dkim rotate").stdout
    selector = re.search(r"selector (dkim\d{8}(-\d+)?)", out).group(1)
    publish_dns({"a": a}, internet)
    out = a.run("chatmail dkim rotate").stdout
    assert f"Switched: mail is signed with {selector} from now on." in out, out
    assert key_table(a)[0] == f"{selector}._domainkey.relay-a.test"
    sender = account(a, "rotsend02")
    assert sent_and_signed(a, sender, account(b, "second001")) == selector
    # the replaced key is listed with the date its record may go (after the first test:
    # both replaced keys)
    status = a.run("chatmail dkim status").stdout
    assert re.search(rf"^signing with selector {selector} ", status, re.M), status
    assert re.findall(r"^retired: selector \S+: keep its record", status, re.M), status


def test_the_daily_job_switches_once_dns_serves_the_record(published, internet):
    """The admin publishes the new record and does nothing else: chatmail-dkim.service
    (its timer's daily run) switches, writes OpenDKIM's tables and reloads it."""
    a, b = published["a"], published["b"]
    out = a.run("chatmail dkim rotate").stdout
    selector = re.search(r"selector (dkim\d{8}(-\d+)?)", out).group(1)
    a.run("systemctl is-enabled --quiet chatmail-dkim.timer")
    a.run("systemctl start chatmail-dkim.service")  # before the record: nothing changes
    assert key_table(a)[0] != f"{selector}._domainkey.relay-a.test"
    publish_dns({"a": a}, internet)
    a.run("systemctl start chatmail-dkim.service")
    log = a.run("journalctl -u chatmail-dkim.service -o cat --no-pager").stdout
    assert f"Switched: mail is signed with {selector} from now on." in log, log
    assert key_table(a)[0] == f"{selector}._domainkey.relay-a.test"
    sender = account(a, "rotsend03")
    assert sent_and_signed(a, sender, account(b, "daily0001")) == selector
