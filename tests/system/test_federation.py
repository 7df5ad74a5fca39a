"""Two relays federate over a test network (internet.py): each installs chatmail-relay
from our repository with tls_mode acme and gets its certificate from pebble through
certbot (HTTP-01 via nginx on port 80), publishes what `chatmail dns` tells it in the test
DNS server, and a Delta Chat user on one relay writes end-to-end encrypted to a user on the
other: DKIM-signed, verified with strict alignment, over verified TLS, queued while the
other relay is down or cut off and delivered when it is back. A relay's bounces are
DKIM-signed and reach the sender on the other relay; a certificate that does not verify
holds mail back instead of it going out over unverified TLS or in cleartext."""

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time

import pytest

from .conftest import rootfs_of
from .container import HERE, Container, deltachat_venv
from .internet import Internet, ip
from .test_install import install_script

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("systemd-nspawn") or not shutil.which("pebble")
    or not shutil.which("nsd"),
    reason="the federation test needs root, systemd-nspawn, nsd and pebble (apt install "
           "systemd-container nsd pebble)")

# Relay a runs Debian 12, relay b Debian 13: mail crosses between the two releases (and
# relay b, the receiving side of most tests, runs Dovecot 2.4).
RELAYS = {"a": ("relay-a.test", "10.231.0.10", "bookworm"),
          "b": ("relay-b.test", "10.231.0.11", "trixie")}
ACME_EMAIL = "admin@example.org"


def bootstrap_records(domain, address):
    """What an admin publishes before installing: the names certbot validates point to
    the host."""
    return "\n".join(f"{name}. 60 IN A {address}"
                     for name in (domain, f"www.{domain}", f"mta-sts.{domain}"))


def acme_install_script(domain, directory_url):
    """README's install commands, answered for an ACME relay; certbot's configuration
    names the test CA's directory instead of Let's Encrypt's (as `--server` would)."""
    return f"""
set -e
mkdir -p /etc/letsencrypt
echo "server = {directory_url}" >/etc/letsencrypt/cli.ini
echo "chatmail-relay chatmail-relay/tls_mode select acme" | debconf-set-selections
echo "chatmail-relay chatmail-relay/acme_email string {ACME_EMAIL}" | debconf-set-selections
""" + install_script(domain)


def exit_on_signal(signum, frame):
    raise SystemExit(f"terminated by signal {signum}")


@pytest.fixture(scope="module")
def internet():
    """The test network; torn down after the module, also on Ctrl-C (pytest runs the
    finalizers) and on SIGTERM or SIGHUP (turned into SystemExit so that they run)."""
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGHUP)}
    for signum, handler in previous.items():
        if handler == signal.SIG_DFL:
            signal.signal(signum, exit_on_signal)
    try:
        with Internet() as net:
            yield net
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def network_container(internet, name, domain, address, suite, venv):
    """A container (not booted) for host `name` of `internet` at `address`, resolving
    through the test DNS server, with the Delta Chat `venv` mounted; box.domain,
    box.address and box.venv say what it is."""
    namespace = internet.add_host(name, address)
    box = Container(f"{name}-{os.getpid()}", rootfs_of(suite),
                    tempfile.mkdtemp(prefix="chatmail-system-", dir="/var/tmp"),
                    binds=[(venv, venv)], netns=namespace,
                    resolv_conf=internet.resolv_conf(), suite=suite)
    box.domain, box.address, box.venv = domain, address, str(venv)
    return box


def trust_test_network(box, internet):
    """The test network's CAs (pebble's roots among them) in the box's system store, as a
    real relay trusts the real CAs: Postfix verifies the other relays' certificates."""
    for name, pem in internet.ca_certificates().items():
        box.run(f"cat >/usr/local/share/ca-certificates/{name}", input=pem)
    box.run("update-ca-certificates >/dev/null 2>&1")


def install_acme_relay(box, internet):
    """README's install of box (booted) with tls_mode acme, its certificate from pebble;
    the install's result (not checked)."""
    return box.run(acme_install_script(box.domain, internet.directory_url)
                   # Postfix says how it secured each delivery
                   + "postconf -e smtp_tls_loglevel=1 && postfix reload\n",
                   check=False, timeout=900)


def assert_installed(key, result):
    assert result and result.returncode == 0, (
        f"install on relay {key}:\n{result.stdout[-5000:]}{result.stderr[-3000:]}"
        if result else f"install on relay {key} did not finish")


@contextlib.contextmanager
def federated_relays(internet, relays=RELAYS):
    """{"a": container, "b": container}, each in its namespace of `internet`, on its
    Debian release (`relays`, like RELAYS), installed with tls_mode acme; the Delta Chat
    venv is mounted in both (clients run in a's)."""
    venv = deltachat_venv()
    boxes = {}
    try:
        for key, (domain, address, suite) in relays.items():
            box = boxes[key] = network_container(internet, f"relay-{key}", domain, address,
                                                 suite, venv)
            internet.set_zone(domain, bootstrap_records(domain, address))
            box.boot()
            trust_test_network(box, internet)
        results = {}

        def install(key):
            results[key] = install_acme_relay(boxes[key], internet)

        # daemon threads: an interrupted test must not wait for the installs to end
        threads = [threading.Thread(target=install, args=(key,), daemon=True)
                   for key in boxes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for key in boxes:
            assert_installed(key, results.get(key))
        yield boxes
    finally:
        for box in boxes.values():
            box.stop()


def publish_dns(relays, internet):
    """Each relay's `chatmail dns` zone (its address given: it is a private one, which
    the command does not take for public), published in the test DNS server."""
    zones = {}
    for key, box in relays.items():
        out = box.run(f"chatmail dns --ipv4 {box.address}")
        zones[key] = out.stdout
        internet.set_zone(box.domain, out.stdout)
    return zones


@pytest.fixture(scope="module")
def relays(internet):
    with federated_relays(internet) as boxes:
        yield boxes


def served_certificate(client, host, port, starttls=None, alpn=None):
    """The certificate `host`:`port` serves, seen from container `client`: issuer, serial,
    names, and whether it verifies against the client's CA store for `host`."""
    options = f" -starttls {starttls}" if starttls else ""
    options += f" -alpn {alpn}" if alpn else ""
    out = client.run(
        f"echo | openssl s_client -connect {host}:{port} -servername {host} "
        f"-verify_hostname {host} -showcerts{options} 2>/dev/null >/tmp/s_client.out; "
        "grep 'Verify return code' /tmp/s_client.out; "
        "openssl x509 -in /tmp/s_client.out -noout -issuer -serial -ext subjectAltName",
        check=False).stdout
    return {
        "verify": re.search(r"Verify return code: (\d+)", out).group(1) if "Verify" in out
        else "no answer",
        "issuer": (re.search(r"issuer=(.*)", out) or [None, ""])[1],
        "serial": (re.search(r"serial=(\w+)", out) or [None, ""])[1],
        "names": re.findall(r"DNS:([^,\s]+)", out),
    }


PORTS = [(993, None, None), (465, None, None), (443, None, "http/1.1"), (25, "smtp", None)]


def certificates(relays, key):
    other = relays["b" if key == "a" else "a"]
    domain = relays[key].domain
    return {port: served_certificate(other, domain, port, starttls, alpn)
            for port, starttls, alpn in PORTS}


# -- 1. certificates ----------------------------------------------------------------------


@pytest.mark.parametrize("key", ["a", "b"])
def test_relay_got_a_certificate_from_the_acme_server(relays, key):
    box = relays[key]
    box.run(f"test -s /etc/letsencrypt/live/{box.domain}/fullchain.pem")
    for port, cert in certificates(relays, key).items():
        assert cert["verify"] == "0", (port, cert)
        assert "Pebble" in cert["issuer"], (port, cert)
        assert set(cert["names"]) == {box.domain, f"www.{box.domain}",
                                      f"mta-sts.{box.domain}"}, (port, cert)
    assert box.run("chatmail status", check=False).returncode == 0


def test_forced_renewal_reaches_postfix_dovecot_and_nginx(relays):
    before = certificates(relays, "a")
    assert len({cert["serial"] for cert in before.values()}) == 1, before
    out = relays["a"].run("certbot renew --force-renewal --no-random-sleep-on-renew 2>&1",
                          timeout=300)
    assert "Congratulations, all renewals succeeded" in out.stdout, out.stdout
    after = certificates(relays, "a")
    for port, cert in after.items():
        assert cert["verify"] == "0" and "Pebble" in cert["issuer"], (port, cert)
        assert cert["serial"] != before[port]["serial"], (port, before[port], cert)
    assert len({cert["serial"] for cert in after.values()}) == 1, after


# -- 2. DNS -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def published_dns(relays, internet):
    return publish_dns(relays, internet)


def test_chatmail_dns_gives_the_records(published_dns, relays):
    for key, zone in published_dns.items():
        d = relays[key].domain
        for expected in (rf"^{d}\.\s+\d+\s+IN\s+A\s+{relays[key].address}$",
                         rf"^{d}\.\s+\d+\s+IN\s+MX\s+10 {d}\.$",
                         rf'^_mta-sts\.{d}\.\s+\d+\s+IN\s+TXT\s+"v=STSv1; id=\w+"$',
                         rf"^mta-sts\.{d}\.\s+\d+\s+IN\s+CNAME\s+{d}\.$",
                         rf'^opendkim\._domainkey\.{d}\.\s+\d+\s+IN\s+TXT\s+"v=DKIM1;k=rsa;p=',
                         rf'^_dmarc\.{d}\.\s+\d+\s+IN\s+TXT\s+"v=DMARC1;p=reject;adkim=s;aspf=s"$'):
            assert re.search(expected, zone, re.M), (expected, zone)


def test_dns_check_all_good_then_reports_a_missing_record_with_the_fix(
        published_dns, relays, internet):
    box = relays["b"]
    check = f"chatmail dns --check --ipv4 {box.address}"
    out = box.run(check, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "All required records are in place." in out.stdout
    assert not re.search(r"^(MISSING|WRONG)", out.stdout, re.M), out.stdout
    # the same answer through the authoritative server named explicitly
    out = box.run(f"{check} --nameserver {internet.query(f'ns1.{box.domain}.', 'A').strip()}",
                  check=False)
    assert out.returncode == 0, out.stdout

    zone = published_dns["b"]
    dkim = re.search(r"^opendkim\._domainkey\..*$", zone, re.M).group(0)
    try:
        internet.set_zone(box.domain, zone.replace(dkim, "").replace(
            f"IN  MX     10 {box.domain}.", "IN  MX     10 elsewhere.example."))
        out = box.run(check, check=False)
        assert out.returncode == 1, out.stdout
        assert re.search(rf"^MISSING\s+opendkim\._domainkey\.{box.domain}\. TXT", out.stdout,
                         re.M), out.stdout
        assert f"publish: {dkim}" in out.stdout, out.stdout
        assert re.search(rf"^WRONG\s+{box.domain}\. MX: 10 elsewhere\.example\.", out.stdout,
                         re.M), out.stdout
        assert re.search(rf"publish: {box.domain}\.\s+\d+\s+IN\s+MX\s+10 {box.domain}\.",
                         out.stdout), out.stdout
        assert "2 required record(s) missing or wrong" in out.stdout, out.stdout
    finally:
        internet.set_zone(box.domain, zone)


# -- 3. federation ------------------------------------------------------------------------

# Runs in relay a's container with the Delta Chat venv's python. Accounts persist in
# ACCOUNTS between runs: alice on relay a, bob on relay b.
CLIENTS = r'''
import json, time

ACCOUNTS, MODE, ARGS = ARGS[0], ARGS[1], ARGS[2:]
A, B = "relay-a.test", "relay-b.test"


def wait_for_texts(account, sender, texts, timeout):
    """{text: shown with a padlock} of the messages from `sender` (an account) with these
    texts, as soon as all are there (polling the chat: bring_online() drops events)."""
    chat, texts = account.create_chat(sender), set(texts)
    deadline = time.monotonic() + timeout
    while True:
        got = {}
        for msg in chat.get_messages():
            snapshot = msg.get_snapshot()
            if snapshot.from_id != 1 and snapshot.text in texts:  # 1: self
                got[snapshot.text] = snapshot.show_padlock
        if set(got) == texts or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


result = {}
with open_rpc(VENV, ACCOUNTS) as rpc:
    dc = DeltaChat(rpc)
    if MODE == "setup":
        alice, bob = verified_pair(rpc, A, B)
        result["addrs"] = [alice.get_config("configured_addr"), bob.get_config("configured_addr")]
    else:
        alice, bob = dc.get_all_accounts()
        alice.bring_online()
        if MODE != "send":  # sending needs no connection to bob's relay, which may be cut off
            bob.bring_online()
    if MODE == "exchange":
        started = time.monotonic()
        alice.create_chat(bob).send_text("hello bob, from alice on relay a")
        result["a_to_b"] = wait_for_texts(bob, alice, ["hello bob, from alice on relay a"], 60)
        result["a_to_b_seconds"] = time.monotonic() - started
        started = time.monotonic()
        bob.create_chat(alice).send_text("hello alice, from bob on relay b")
        result["b_to_a"] = wait_for_texts(alice, bob, ["hello alice, from bob on relay b"], 60)
        result["b_to_a_seconds"] = time.monotonic() - started
    elif MODE == "send":  # send ARGS as texts from alice to bob, return when a has them
        chat = alice.create_chat(bob)
        msgs = [chat.send_text(text) for text in ARGS]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = [m.get_snapshot().state for m in msgs]
            if all(state >= 26 for state in states):  # OUT_DELIVERED: handed to relay a
                break
            time.sleep(0.5)
        result["states"] = [m.get_snapshot().state for m in msgs]
    elif MODE == "receive":  # wait for ARGS as texts at bob
        result["received"] = wait_for_texts(bob, alice, ARGS, 120)
print(json.dumps(result))
'''


def run_clients(box, mode, *args, timeout=240):
    box.run("cat >/root/federation_clients.py",
            input=(HERE / "deltachat_pair.py").read_text() + CLIENTS)
    quoted = " ".join(f"'{arg}'" for arg in args)
    out = box.run(f"timeout {timeout} {box.venv}/bin/python /root/federation_clients.py "
                  f"relay-a.test {box.venv} /root/dc-accounts {mode} {quoted}", check=False,
                  timeout=timeout + 60)
    assert out.returncode == 0, f"{mode}: {out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def accounts(relays, published_dns):
    """alice@relay-a.test and bob@relay-b.test, verified with each other by SecureJoin
    across the relays. The clients accept any certificate (ic=3): the Delta Chat core
    trusts its built-in roots only, not the system's CA store where pebble's root is, so
    with strict checks it reports "Could not find your mail server". Relay-to-relay TLS
    is verified (by Postfix, against the system's store)."""
    return setup_accounts(relays)


def setup_accounts(relays):
    box = relays["a"]
    box.run("rm -rf /root/dc-accounts")
    result = run_clients(box, "setup")
    assert result["addrs"] == ["alice0001@relay-a.test", "bobby0002@relay-b.test"]
    return result


def journal(box, grep):
    return box.run(f"journalctl --no-pager -o cat | grep -E '{grep}'", check=False).stdout


def test_encrypted_messages_both_ways_between_relays(accounts, relays):
    result = run_clients(relays["a"], "exchange")
    assert result["a_to_b"] == {"hello bob, from alice on relay a": True}, result
    assert result["b_to_a"] == {"hello alice, from bob on relay b": True}, result
    # both relays delivered to each other on port 25, certificates verified
    assert "Verified TLS connection established to relay-b.test[10.231.0.11]:25" in journal(
        relays["a"], "Verified TLS connection established"), journal(relays["a"], "TLS")
    assert "Verified TLS connection established to relay-a.test[10.231.0.10]:25" in journal(
        relays["b"], "Verified TLS connection established")
    # a signed what it sent (OpenDKIM), b accepted it (its filter verifies DKIM)
    assert "DKIM-Signature field added (s=opendkim, d=relay-a.test)" in journal(
        relays["a"], "DKIM-Signature field added")
    assert "DKIM-Signature field added (s=opendkim, d=relay-b.test)" in journal(
        relays["b"], "DKIM-Signature field added")


# Sent from relay a's container to relay b's port 25 (STARTTLS, certificate verified):
# messages signed with relay a's real DKIM key, whose public half b finds in DNS.
DKIM_PROBES = r'''
import json, smtplib, ssl, sys
import dkim

key = open("/etc/dkimkeys/relay-a.test.private", "rb").read()
to = "nobodyhere@relay-b.test"  # no mailbox: the cleartext rule does not answer first


def message(from_addr):
    return (f"From: {from_addr}\r\nTo: {to}\r\nSubject: probe\r\n"
            "Message-ID: <probe@relay-a.test>\r\n\r\nDKIM probe\r\n").encode()


def signed(from_addr, domain=b"relay-a.test"):
    msg = message(from_addr)
    return dkim.sign(msg, b"opendkim", domain, key, include_headers=[b"from", b"to", b"subject"]) + msg


def send(content):
    smtp = smtplib.SMTP("relay-b.test", 25, local_hostname="relay-a.test")
    smtp.starttls(context=ssl.create_default_context())
    try:
        smtp.sendmail("", [to], content)
        return "250"
    except smtplib.SMTPResponseException as e:
        return f"{e.smtp_code} {e.smtp_error.decode()}"
    except smtplib.SMTPRecipientsRefused as e:
        code, text = list(e.recipients.values())[0]
        return f"{code} {text.decode()}"
    finally:
        smtp.close()


result = {
    "valid": send(signed("probe@relay-a.test")),
    "broken": send(signed("probe@relay-a.test").replace(b"DKIM probe", b"DKIM prob3")),
    "subdomain_from": send(signed("probe@mail.relay-a.test")),
    "unsigned": send(message("probe@relay-a.test")),
}
print(json.dumps(result))
'''


def test_relay_b_verifies_dkim_with_strict_alignment(accounts, relays):
    out = relays["a"].run("python3 -", input=DKIM_PROBES)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["valid"] == "250", result
    assert result["broken"] == "554 5.7.1 No valid DKIM signature found", result
    # d=relay-a.test does not cover From: ...@mail.relay-a.test under strict alignment
    assert result["subdomain_from"] == "554 5.7.1 No valid DKIM signature found", result
    assert result["unsigned"] == "554 5.7.1 No DKIM signature found", result


# Runs in relay a's container: a client of relay a submits (port 465, its account created
# by this first login, as the apps' are) an end-to-end encrypted message, by the form the
# filters check, to an address of relay b that has no mailbox. Relay b accepts it (unknown
# local users are accepted and filtered, then refused by Dovecot's LMTP), so relay b has to
# bounce it to relay a.
SUBMIT_ENCRYPTED = r"""
import base64, smtplib, ssl, sys, time

sender, password, to = sys.argv[1:4]
# a PKESK packet, then the SEIPD packet (new-format headers), ASCII-armored
packets = bytes([0xC1, 12]) + bytes(12) + bytes([0xD2, 40, 1]) + bytes(39)
boundary = "b0undary-ndr"
message = (
    f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: [...]\r\n"
    f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
    f"Message-ID: <ndr-{time.time()}@relay-a.test>\r\nMIME-Version: 1.0\r\n"
    'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; '
    f'boundary="{boundary}"\r\n\r\n'
    f"--{boundary}\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n\r\n"
    f"--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n"
    "-----BEGIN PGP MESSAGE-----\r\n\r\n" + base64.b64encode(packets).decode()
    + "\r\n-----END PGP MESSAGE-----\r\n\r\n"
    f"--{boundary}--\r\n")
with smtplib.SMTP_SSL("relay-a.test", 465, context=ssl.create_default_context()) as smtp:
    smtp.login(sender, password)
    smtp.sendmail(sender, [to], message.encode())
"""

# Runs in relay a's container: the messages in an account's INBOX (IMAPS, certificate
# verified), as soon as there are any (at most argv[3] seconds).
READ_INBOX = r"""
import email, imaplib, json, ssl, sys, time
from email import policy

user, password, deadline = sys.argv[1], sys.argv[2], time.monotonic() + float(sys.argv[3])
while True:
    with imaplib.IMAP4_SSL("relay-a.test", 993, ssl_context=ssl.create_default_context()) as imap:
        imap.login(user, password)
        imap.select("INBOX", readonly=True)
        messages = []
        for number in imap.search(None, "ALL")[1][0].split():
            raw = imap.fetch(number, "(RFC822)")[1][0][1]
            msg = email.message_from_bytes(raw, policy=policy.default)
            messages.append({"from": str(msg["From"]), "content_type": msg.get_content_type(),
                             "auto_submitted": str(msg["Auto-Submitted"]),
                             "dkim_signatures": len(msg.get_all("DKIM-Signature") or []),
                             "text": raw.decode(errors="replace")})
    if messages or time.monotonic() > deadline:
        break
    time.sleep(0.3)
print(json.dumps(messages))
"""


def reload_postfix(box):
    """`postfix reload`, returning once the queue manager runs with the new settings (the
    reload only asks the running one to exit)."""
    box.run("old=$(pgrep -x qmgr); postfix reload 2>/dev/null; "
            "for i in $(seq 200); do new=$(pgrep -x qmgr); "
            '[ -n "$new" ] && [ "$new" != "$old" ] && exit 0; sleep 0.1; done; exit 1')


def test_bounce_from_relay_b_is_dkim_signed_and_reaches_the_sender_on_relay_a(
        accounts, relays):
    a, b = relays["a"], relays["b"]
    sender, password = "ndrsender@relay-a.test", "ndr-sender-password"
    ghost = f"ghost{os.getpid() % 10000:04d}@relay-b.test"
    # relay b holds what it sends, so that the bounce can be read as it leaves: relay a
    # removes DKIM-Signature fields before mail reaches a mailbox (lmtp_header_cleanup)
    b.run("postconf -e defer_transports=smtp")
    reload_postfix(b)
    try:
        a.run(f"python3 - {sender} {password} {ghost}", input=SUBMIT_ENCRYPTED)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            bounces = [m for m in queue(b) if m["sender"] == "MAILER-DAEMON"
                       and [r["address"] for r in m["recipients"]] == [sender]]
            if bounces:
                break
            time.sleep(0.3)
        assert len(bounces) == 1, (queue(b), journal(b, ghost))
        # relay b took the message at SMTP time; its LMTP refused the recipient afterwards
        assert re.search(rf"to=<{ghost}>, relay=relay-b\.test\[10\.231\.0\.11\]:25, .*"
                         r"status=sent \(250 OK\)", journal(a, ghost)), journal(a, ghost)
        assert re.search(rf"to=<{ghost}>, relay=relay-b\.test\[private/dovecot-lmtp\], .*"
                         r"dsn=5\.1\.1, status=bounced \(.*User doesn't exist",
                         journal(b, ghost)), journal(b, ghost)
        headers = b.run(f"postcat -h -q {bounces[0]['queue_id']}").stdout
        assert re.search(r"^From: Mail Delivery System <MAILER-DAEMON@relay-b\.test>$",
                         headers, re.M), headers
        assert re.search(r"^Content-Type: multipart/report;", headers, re.M), headers
        signatures = re.findall(r"^DKIM-Signature:.*(?:\n\s.*)*", headers, re.M)
        assert len(signatures) == 1, headers
        assert re.search(r"\bd=relay-b\.test;", signatures[0]), signatures
        assert re.search(r"\bs=opendkim;", signatures[0]), signatures
    finally:
        b.run("postconf -X defer_transports")
        reload_postfix(b)
    b.run("postqueue -f")
    out = a.run(f"python3 - {sender} {password} 30", input=READ_INBOX)
    messages = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(messages) == 1, messages
    bounce = messages[0]
    assert bounce["from"] == "Mail Delivery System <MAILER-DAEMON@relay-b.test>", bounce
    assert bounce["content_type"] == "multipart/report", bounce
    assert bounce["auto_submitted"] == "auto-replied", bounce
    assert f"<{ghost}>: host relay-b.test[private/dovecot-lmtp] said: 550" in bounce["text"]
    assert bounce["dkim_signatures"] == 0, bounce  # removed after the filter checked it
    # relay a's incoming filter took it as a report, with a valid signature of relay-b.test
    assert "Incoming: Filtering mailer-daemon message from MAILER-DAEMON@relay-b.test" in (
        journal(a, "Filtering mailer-daemon message"))
    assert not [m for m in queue(b) if m["sender"] == "MAILER-DAEMON"], queue(b)


@pytest.mark.parametrize("key", ["a", "b"])
def test_mta_sts_policy_is_served(relays, published_dns, key):
    domain = relays[key].domain
    other = relays["b" if key == "a" else "a"]
    policy = other.run(f"curl -fsS https://mta-sts.{domain}/.well-known/mta-sts.txt").stdout
    assert "version: STSv1" in policy and "mode: enforce" in policy, policy
    assert f"mx: {domain}" in policy, policy


# -- 4. outage ----------------------------------------------------------------------------


def queue(box):
    out = box.run("postqueue -j").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def queued_for(box, domain):
    return [m for m in queue(box) if any(domain in r["address"] for r in m["recipients"])]


def wait_until_deferred(box, domain, count, timeout):
    """The `count` messages for `domain` in box's queue, once all are deferred."""
    deadline = time.monotonic() + timeout
    while True:
        waiting = queued_for(box, domain)
        if len(waiting) == count and all(m["queue_name"] == "deferred" for m in waiting):
            return waiting
        assert time.monotonic() < deadline, queue(box)
        time.sleep(0.5)


def wait_until_nothing_queued_for(box, domain, timeout=30):
    """Mail still on its way (e.g. a client's automatic messages from a test before) must
    not be mistaken for the mail of the test that starts now."""
    deadline = time.monotonic() + timeout
    while queued_for(box, domain):
        assert time.monotonic() < deadline, queue(box)
        time.sleep(0.5)


def test_mail_to_a_relay_that_is_down_is_queued_and_delivered_later(accounts, relays):
    a, b = relays["a"], relays["b"]
    texts = [f"while b was down {i}" for i in range(3)]
    b.run("systemctl stop postfix")
    try:
        result = run_clients(a, "send", *texts)
        assert all(state >= 26 for state in result["states"]), result
        wait_until_deferred(a, b.domain, len(texts), timeout=30)
    finally:
        b.run("systemctl start postfix")
    a.run("postqueue -f")
    result = run_clients(a, "receive", *texts)
    assert result["received"] == {text: True for text in texts}, result
    assert not queued_for(a, b.domain)


def test_mail_to_a_relay_cut_off_the_network_is_queued_and_delivered_later(
        accounts, relays, internet):
    a, b = relays["a"], relays["b"]
    texts = ["while b was cut off"]
    internet.set_link("relay-b", False)
    try:
        # relay a forgets b's link-layer address, as it does once the entry expires: its
        # connection attempts then fail within seconds, not after Postfix's 30 s timeout
        ip("-n", internet.namespace("relay-a"), "neigh", "flush", "to", b.address)
        result = run_clients(a, "send", *texts)
        assert all(state >= 26 for state in result["states"]), result
        waiting = wait_until_deferred(a, b.domain, len(texts), timeout=45)
        reasons = [r.get("delay_reason", "") for m in waiting for r in m["recipients"]]
        assert all(re.search(r"connect to relay-b\.test\[10\.231\.0\.11\]:25: "
                             r"(No route to host|Connection timed out)", reason)
                   for reason in reasons), reasons
    finally:
        internet.set_link("relay-b", True)
    a.run("postqueue -f")
    result = run_clients(a, "receive", *texts)
    assert result["received"] == {text: True for text in texts}, result
    assert not queued_for(a, b.domain)


# -- 5. TLS -------------------------------------------------------------------------------


SELF_SIGNED = ("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -noenc "
               "-days 2 -keyout /etc/postfix/self-signed.key -out /etc/postfix/self-signed.pem "
               "-subj /CN=relay-b.test -addext subjectAltName=DNS:relay-b.test 2>/dev/null")


def test_no_delivery_to_a_relay_whose_certificate_does_not_verify(accounts, relays):
    """Relay b serves a self-signed certificate for its name on port 25: relay a neither
    falls back to cleartext nor delivers over the unverified connection; the mail waits in
    its queue and goes out once b's certificate verifies again."""
    a, b = relays["a"], relays["b"]
    texts = ["while b served a self-signed certificate"]
    cert, key = b.run("postconf -h smtpd_tls_cert_file smtpd_tls_key_file").stdout.split()
    wait_until_nothing_queued_for(a, b.domain)
    incoming = journal(b, "Incoming: Filtering").count("\n")
    since = a.run("date '+%Y-%m-%d %H:%M:%S'").stdout.strip()
    # relay a resumes no TLS session (main.cf), so it sees the new certificate at once
    b.run(f"{SELF_SIGNED} && postconf -e smtpd_tls_cert_file=/etc/postfix/self-signed.pem "
          "smtpd_tls_key_file=/etc/postfix/self-signed.key && systemctl restart postfix")
    try:
        assert served_certificate(a, b.domain, 25, "smtp")["verify"] == "18", (
            served_certificate(a, b.domain, 25, "smtp"))  # self-signed certificate
        result = run_clients(a, "send", *texts)
        assert all(state >= 26 for state in result["states"]), result
        waiting = wait_until_deferred(a, b.domain, len(texts), timeout=30)
        reasons = [r.get("delay_reason") for m in waiting for r in m["recipients"]]
        assert set(reasons) == {"Server certificate not verified"}, waiting
        log = a.run(f"journalctl --no-pager -o cat --since '{since}' "
                    "SYSLOG_IDENTIFIER=postfix/smtp").stdout
        assert ("certificate verification failed for relay-b.test[10.231.0.11]:25: "
                "self-signed certificate") in log, log
        for m in waiting:
            assert not re.search(rf"{m['queue_id']}: to=<[^\n]*status=sent", log), log
            assert re.search(rf"{m['queue_id']}: to=<.*dsn=4\.7\.5, status=deferred "
                             r"\(Server certificate not verified\)", log), log
        # nothing reached relay b's filter: relay a quit after the TLS handshake
        assert journal(b, "Incoming: Filtering").count("\n") == incoming
    finally:
        b.run(f"postconf -e smtpd_tls_cert_file={cert} smtpd_tls_key_file={key} && "
              "rm -f /etc/postfix/self-signed.* && systemctl restart postfix")
    assert served_certificate(a, b.domain, 25, "smtp")["verify"] == "0"
    a.run("postqueue -f")
    result = run_clients(a, "receive", *texts)
    assert result["received"] == {text: True for text in texts}, result
    assert not queued_for(a, b.domain)


def session_tickets(client, host, port, starttls=None):
    """Two TLS connections from container `client` to `host`:`port`, the second offering
    the session of the first: (TLS 1.3 session tickets the server sent on each, whether
    the second resumed)."""
    options = f"-starttls {starttls} " if starttls else ""
    counts = []
    for session in ("-sess_out /tmp/tickets.sess", "-sess_in /tmp/tickets.sess"):
        # the pause lets the tickets, written after the handshake, arrive
        out = client.run(f"(sleep 1; printf 'QUIT\\r\\n') | openssl s_client {options}"
                         f"-connect {host}:{port} -servername {host} -msg -ign_eof "
                         f"{session} 2>&1", check=False).stdout
        counts.append(len(re.findall(r"<<< TLS 1.3, Handshake \[length \w+\], "
                                     r"NewSessionTicket", out)))
    return counts, "Reused, TLSv1.3" in out


@pytest.mark.parametrize("client,server", [("a", "b"), ("b", "a")])
def test_session_tickets_on_the_smtp_ports(relays, client, server):
    """Ports 25 and 587 (STARTTLS) send one TLS 1.3 session ticket after every handshake,
    also when the client offers an earlier session: it acknowledges the client's Finished
    at once, or the EHLO the client writes after it waits for a delayed ACK (40 ms, Nagle;
    bench/results/delivery-analysis.md). The tickets resume nothing. Port 465 sends none:
    there the ticket held smtpd's greeting back instead. Both releases serve (a is
    Debian 12, b Debian 13)."""
    box, host = relays[client], relays[server].domain
    assert session_tickets(box, host, 25, "smtp") == ([1, 1], False)
    assert session_tickets(box, host, 587, "smtp") == ([1, 1], False)
    assert session_tickets(box, host, 465) == ([0, 0], False)
