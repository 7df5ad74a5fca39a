"""filtermail as systemd runs it: `python -m chatmaild.filtermail INI MODE` in its own
process, spoken to with smtplib, reinjecting into a real SMTP server."""

import os
import signal
import smtplib
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from chatmaild.dkimverify import KEY_LOOKUP_BUDGET, MAX_ALIGNED_SIGNATURES
from tests.conftest import free_port

from .dkimkeys import dkim_signed, generate_rsa_key, zone_txt

from .mailfactory import (
    encrypted_mail,
    mailer_daemon_mail,
    nested_mail,
    openpgp,  # noqa: F401  (fixture)
    plain_mail,
)
from .nsd import nsd  # noqa: F401  (fixture)
from .smtpsink import smtp_sink  # noqa: F401  (fixture)
from .unbound import unbound  # noqa: F401  (fixture)

DOMAIN = "chat.example.org"
ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
CAROL = "carol@example.net"


def port_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def wait_for_stderr(daemon, text, timeout=5.0):
    deadline = time.monotonic() + timeout
    while text not in daemon.stderr:
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in stderr:\n{daemon.stderr}")
        time.sleep(0.02)


@pytest.fixture
def run_filtermail(make_ini, start_daemon, smtp_sink):
    """run_filtermail(mode, env=None, **ini settings) -> (daemon, listening port)."""

    def run(mode, env=None, prefix=(), **settings):
        port = free_port()
        if mode == "outgoing":
            settings.setdefault("filtermail_smtp_port", port)
            settings.setdefault("postfix_reinject_port", smtp_sink.port)
        else:
            settings.setdefault("filtermail_smtp_port_incoming", port)
            settings.setdefault("postfix_reinject_port_incoming", smtp_sink.port)
        ini = make_ini(DOMAIN, **settings)
        daemon = start_daemon("filtermail", ini, mode, ready=lambda: port_open(port), env=env,
                              prefix=prefix)
        wait_for_stderr(daemon, "entering serving loop")
        return daemon, port

    return run


def connect(port):
    return smtplib.SMTP("127.0.0.1", port, timeout=10)


def test_outgoing_end_to_end(run_filtermail, smtp_sink, openpgp):
    daemon, port = run_filtermail("outgoing")
    mail = encrypted_mail(ALICE, CAROL, openpgp.encrypt(), subject="Grüße")
    with connect(port) as client:
        assert client.sendmail(ALICE, [CAROL, BOB], mail) == {}
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail(ALICE, [CAROL], plain_mail(ALICE, CAROL))
        assert refused.value.smtp_code == 523
        assert refused.value.smtp_error == b"Encryption Needed: Invalid Unencrypted Mail"
        with pytest.raises(smtplib.SMTPDataError) as forged:
            client.sendmail(ALICE, [CAROL], encrypted_mail(CAROL, BOB, openpgp.encrypt()))
        assert forged.value.smtp_code == 500
    assert smtp_sink.messages == [(ALICE, [CAROL, BOB], mail)]  # byte for byte
    wait_for_stderr(daemon, "Rejected unencrypted mail.")
    for line in ("Outgoing: Filtering encrypted mail.", "Outgoing: Filtering unencrypted mail."):
        assert line in daemon.stderr.splitlines()


def test_dsn_and_other_esmtp_parameters_are_tolerated(run_filtermail, smtp_sink, openpgp):
    _, port = run_filtermail("outgoing")
    mail = encrypted_mail(ALICE, CAROL, openpgp.encrypt())
    with connect(port) as client:
        client.sendmail(ALICE, [CAROL], mail,
                        mail_options=["BODY=8BITMIME", "ENVID=QQ314159", "RET=HDRS"],
                        rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;carol@example.net"])
        client.ehlo()
        assert client.docmd("MAIL FROM:<alice@chat.example.org> SMTPUTF8 SIZE=100")[0] == 250
        assert client.docmd("RCPT TO:<carol@example.net> NOTIFY=NEVER X-FOO")[0] == 250
        assert client.docmd("RSET")[0] == 250
    assert len(smtp_sink.messages) == 1


def test_declared_or_actual_size_over_the_limit(run_filtermail, smtp_sink, openpgp):
    _, port = run_filtermail("outgoing", max_message_size=200_000)
    small = encrypted_mail(ALICE, CAROL, openpgp.encrypt(b"x" * 10_000))
    big = encrypted_mail(ALICE, CAROL, openpgp.encrypt(b"x" * 300_000))
    with connect(port) as client:
        client.ehlo()
        code, _ = client.docmd(f"MAIL FROM:<{ALICE}> SIZE=300000")
        assert code == 552
        with pytest.raises(smtplib.SMTPException) as too_big:
            client.sendmail(ALICE, [CAROL], big)
        assert "552" in str(too_big.value)
    with connect(port) as client:
        client.sendmail(ALICE, [CAROL], small)
    assert len(smtp_sink.messages) == 1


def test_rate_limit_after_burst(run_filtermail, smtp_sink, openpgp):
    _, port = run_filtermail("outgoing", max_user_send_per_minute=60,
                             max_user_send_burst_size=3)
    mail = encrypted_mail(ALICE, CAROL, openpgp.encrypt())
    with connect(port) as client:
        for _ in range(3):
            client.sendmail(ALICE, [CAROL], mail)
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail(ALICE, [CAROL], mail)
    assert refused.value.smtp_code == 450
    assert refused.value.smtp_error.startswith(b"4.7.1: Too much mail from")
    assert len(smtp_sink.messages) == 3


def test_invalid_sender_address(run_filtermail):
    _, port = run_filtermail("outgoing")
    with connect(port) as client:
        client.ehlo()
        code, text = client.docmd("MAIL FROM:<>")
        assert code == 500 and text.startswith(b"Invalid from address")


def test_hostile_smtp_input_does_not_break_the_server(run_filtermail, smtp_sink, openpgp):
    _, port = run_filtermail("outgoing")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        reader = raw.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        for line in [b"EHLO x\r\n", b"MAIL FROM:<\xff\xfe@a@b>\r\n", b"RCPT TO:<x@y>\r\n",
                     b"\x00\x01\x02\r\n", b"MAIL FROM:" + b"a" * 5000 + b"\r\n",
                     b"DATA\r\n", b"NOOP\r\n"]:
            raw.sendall(line)
            reply = reader.readline()
            while reply[3:4] == b"-":
                reply = reader.readline()
            assert reply[:1] in (b"2", b"5"), (line, reply)
    with connect(port) as client:  # still serving
        client.sendmail(ALICE, [CAROL], encrypted_mail(ALICE, CAROL, openpgp.encrypt()))
    assert len(smtp_sink.messages) == 1


def test_reinjection_down_gives_temporary_error(run_filtermail, openpgp):
    _, port = run_filtermail("outgoing", postfix_reinject_port=free_port())
    with connect(port) as client:
        with pytest.raises(smtplib.SMTPDataError) as error:
            client.sendmail(ALICE, [CAROL], encrypted_mail(ALICE, CAROL, openpgp.encrypt()))
    assert 400 <= error.value.smtp_code < 500


def test_concurrent_clients(run_filtermail, smtp_sink, openpgp):
    import threading
    _, port = run_filtermail("outgoing", max_user_send_burst_size=100)
    mail = encrypted_mail(ALICE, CAROL, openpgp.encrypt(b"y" * 50_000))
    errors = []

    def send_some():
        try:
            with connect(port) as client:
                for _ in range(5):
                    client.sendmail(ALICE, [CAROL], mail)
        except Exception as exc:  # collected and reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=send_some) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert len(smtp_sink.messages) == 30
    assert all(content == mail for _, _, content in smtp_sink.messages)


def test_sigterm_stops_cleanly(run_filtermail):
    daemon, _ = run_filtermail("outgoing")
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(10) == 0


def test_incoming_without_dkim(run_filtermail, smtp_sink, openpgp, make_config):
    daemon, port = run_filtermail("incoming", env={"FILTERMAIL_SKIP_DKIM": "1"})
    lines = daemon.stderr.splitlines()
    assert lines.index("DKIM verification DISABLED!") < lines.index("entering serving loop")
    config = make_config(DOMAIN)
    from chatmaild.mailbox import Mailbox
    Mailbox(config, BOB).create("{SHA512-CRYPT}$6$x")
    mail = encrypted_mail(CAROL, BOB, openpgp.encrypt())
    with connect(port) as client:
        client.sendmail(CAROL, [BOB], mail)
        client.sendmail("SRS0=ab=cd=example.net=carol@forwarder.example", [BOB], mail)
        client.sendmail("", [BOB], mailer_daemon_mail("mailer-daemon@example.net", BOB))
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail(CAROL, [BOB], plain_mail(CAROL, BOB))
        assert refused.value.smtp_code == 523
        client.sendmail(CAROL, [f"nobody@{DOMAIN}"], plain_mail(CAROL, BOB))
    assert [(m[0], m[1]) for m in smtp_sink.messages] == [
        (CAROL, [BOB]), ("<>", [BOB]), ("<>", [BOB]), (CAROL, [f"nobody@{DOMAIN}"])]
    assert smtp_sink.messages[0][2] == mail
    wait_for_stderr(daemon, "Rejected unencrypted mail.")
    assert "Incoming: Filtering mailer-daemon message from mailer-daemon@example.net" in (
        daemon.stderr)


@pytest.mark.parametrize("mode, code", [("outgoing", 523), ("incoming", 554)])
def test_deeply_nested_mail_is_refused_for_good(run_filtermail, smtp_sink, mode, code):
    _, port = run_filtermail(mode)
    sender = ALICE if mode == "outgoing" else CAROL
    with connect(port) as client:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail(sender, [BOB], nested_mail(sender, BOB, depth=1000))
        assert refused.value.smtp_code == code
        client.noop()  # the session goes on
    assert smtp_sink.messages == []


def test_incoming_utf8_sender(run_filtermail, smtp_sink, openpgp):
    _, port = run_filtermail("incoming", env={"FILTERMAIL_SKIP_DKIM": "1"})
    sender = "jörg@bücher.example"
    mail = encrypted_mail(sender, BOB, openpgp.encrypt())
    with connect(port) as client:
        client.sendmail(sender, [BOB], mail, mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    assert smtp_sink.messages == [(sender, [BOB], mail)]


def test_incoming_requires_dkim(run_filtermail, smtp_sink, openpgp):
    _, port = run_filtermail("incoming")
    with connect(port) as client:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail(CAROL, [BOB], encrypted_mail(CAROL, BOB, openpgp.encrypt()))
        assert refused.value.smtp_code == 554
        assert refused.value.smtp_error == b"5.7.1 No DKIM signature found"
        # IP-only relays cannot sign; their mail passes on encryption alone
        ip_sender = "carol@[192.0.2.7]"
        client.sendmail(ip_sender, [BOB], encrypted_mail(ip_sender, BOB, openpgp.encrypt()))
    assert [m[0] for m in smtp_sink.messages] == [ip_sender]


# -- DKIM keys from a real resolver, some of whose zones never answer ----------------------

STALLED_MESSAGES = 50


def timed_send(port, sender, mail):
    """(SMTP code of the answer to DATA, seconds from connecting to that answer)."""
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        try:
            client.sendmail(sender, [BOB], mail)
            code = 250
        except smtplib.SMTPDataError as exc:
            code = exc.smtp_code
    return code, time.monotonic() - started


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a mount namespace for resolv.conf")
def test_stalled_dkim_lookups_do_not_delay_other_senders(run_filtermail, smtp_sink, openpgp,
                                                         nsd, unbound):
    key = generate_rsa_key()
    sender_dns = nsd("sender.example", f"sel._domainkey IN TXT {zone_txt(key[1])}\n")
    resolver = unbound({"sender.example": sender_dns.port}, stalled=["stalled.example"])
    _, port = run_filtermail("incoming", prefix=resolver.command_prefix())
    # each from a domain of its own (no lookup is shared, no per-domain limit applies),
    # with as many signatures as the filter tries, each with a key name of its own
    selectors = [f"k{index}" for index in range(MAX_ALIGNED_SIGNATURES)]
    stalled = [dkim_signed(encrypted_mail(f"mallory@s{n}.stalled.example", BOB,
                                          openpgp.encrypt()), key, selectors)
               for n in range(STALLED_MESSAGES)]
    valid = dkim_signed(encrypted_mail("dave@sender.example", BOB, openpgp.encrypt()), key)
    with ThreadPoolExecutor(STALLED_MESSAGES) as pool:
        waiting = [pool.submit(timed_send, port, f"mallory@s{n}.stalled.example", mail)
                   for n, mail in enumerate(stalled)]
        time.sleep(2)
        assert not any(answer.done() for answer in waiting), "stalled lookups answered"
        code, seconds = timed_send(port, "dave@sender.example", valid)
        stalled_answers = [answer.result() for answer in waiting]
    assert code == 250
    assert seconds < 2
    assert {code for code, _ in stalled_answers} == {451}
    assert max(seconds for _, seconds in stalled_answers) < KEY_LOOKUP_BUDGET + 2
    assert [m[0] for m in smtp_sink.messages] == ["dave@sender.example"]
