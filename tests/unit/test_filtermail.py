"""The filter rules of both directions, called in-process (check_DATA, check_MAIL,
filter); the daemon over real SMTP is tested in test_filtermail_blackbox.py."""

import asyncio
import logging
import os

import dkim
import pytest
from aiosmtpd.smtp import Envelope

from chatmaild.filtermail import (
    ENCRYPTION_NEEDED_523,
    REINJECT_FAILED_451,
    UNPARSEABLE_554,
    IncomingFilter,
    OutgoingFilter,
    UnparseableMessage,
    make_filter,
    main,
    parse_message,
    reinject_mail_options,
    single_from_address,
)
from chatmaild.mailbox import Mailbox
from tests.conftest import free_port

from .dkimkeys import SIGNED_HEADERS, KeyDirectory, generate_rsa_key
from .mailfactory import (
    autocrypt_setup_mail,
    encrypted_mail,
    mailer_daemon_mail,
    mdn_mail,
    nested_mail,
    openpgp,  # noqa: F401  (fixture)
    plain_mail,
    securejoin_mail,
)
from .smtpsink import smtp_sink  # noqa: F401  (fixture)

DOMAIN = "chat.example.org"
ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"


def envelope(mail_from, rcpt_tos, content):
    env = Envelope()
    env.mail_from = mail_from
    env.rcpt_tos = list(rcpt_tos)
    env.content = env.original_content = content
    return env


@pytest.fixture
def outgoing(make_config):
    return OutgoingFilter(make_config(DOMAIN))


@pytest.fixture
def incoming(make_config):
    return IncomingFilter(make_config(DOMAIN), verify_dkim=False)


def create_account(config, addr, enforce_e2ee=True):
    mailbox = Mailbox(config, addr)
    mailbox.create("{SHA512-CRYPT}$6$notarealhash")
    if not enforce_e2ee:
        mailbox.enforce_e2ee_path.unlink()
    return mailbox


def filtered(mail_filter, env):
    """The reply to DATA: the checks, and the reinjection of what passes."""
    return asyncio.run(mail_filter.filter(env))


def messages(caplog):
    return [record.getMessage() for record in caplog.records]


# -- outgoing ------------------------------------------------------------------------------


def test_outgoing_encrypted_passes(outgoing, openpgp, caplog):
    caplog.set_level(logging.INFO)
    mail = encrypted_mail(ALICE, "bob@example.net", openpgp.encrypt())
    assert outgoing.check_DATA(envelope(ALICE, ["bob@example.net"], mail)) is None
    assert "Outgoing: Filtering encrypted mail." in messages(caplog)


def test_outgoing_symmetric_and_securejoin_pass(outgoing, openpgp):
    mail = encrypted_mail(ALICE, BOB, openpgp.encrypt_with_password())
    assert outgoing.check_DATA(envelope(ALICE, [BOB], mail)) is None
    for kind in ("vc-request", "vg-request"):
        mail = securejoin_mail(ALICE, BOB, kind=kind)
        assert outgoing.check_DATA(envelope(ALICE, [BOB], mail)) is None


def test_outgoing_cleartext_is_refused(outgoing, caplog):
    caplog.set_level(logging.INFO)
    result = outgoing.check_DATA(envelope(ALICE, [BOB], plain_mail(ALICE, BOB)))
    assert result == "523 Encryption Needed: Invalid Unencrypted Mail"
    assert messages(caplog)[-2:] == [
        "Outgoing: Filtering unencrypted mail.", "Rejected unencrypted mail."]


def test_outgoing_unencrypted_mdn_is_refused(outgoing):
    assert outgoing.check_DATA(envelope(ALICE, [BOB], mdn_mail(ALICE, BOB))) == (
        ENCRYPTION_NEEDED_523)


@pytest.mark.parametrize("kind", ["signed", "store", "fake"])
def test_outgoing_fake_encryption_is_refused(outgoing, openpgp, kind):
    armored = {
        "signed": openpgp.inline_sign,
        "store": openpgp.gpg_store,
        "fake": lambda: "-----BEGIN PGP MESSAGE-----\r\n\r\nHi!\r\n-----END PGP MESSAGE-----\r\n",
    }[kind]()
    mail = encrypted_mail(ALICE, BOB, armored)
    assert outgoing.check_DATA(envelope(ALICE, [BOB], mail)) == ENCRYPTION_NEEDED_523


def test_outgoing_version_armor_header_is_refused(outgoing, incoming, openpgp):
    from .mailfactory import armor, dearmor_bytes
    armored = armor(dearmor_bytes(openpgp.encrypt()), headers=["Version: ProtonMail"])
    mail = encrypted_mail(ALICE, BOB, armored)
    assert outgoing.check_DATA(envelope(ALICE, [BOB], mail)) == ENCRYPTION_NEEDED_523
    assert incoming.check_DATA(envelope(ALICE, [BOB], mail)) is None


@pytest.mark.parametrize("from_addr", ["forged@example.org", "alice@chat.example.org.evil",
                                        "bob@chat.example.org"])
def test_outgoing_forged_from_is_refused(outgoing, openpgp, from_addr):
    mail = encrypted_mail(from_addr, BOB, openpgp.encrypt())
    result = outgoing.check_DATA(envelope(ALICE, [BOB], mail))
    assert result == f"500 Invalid FROM <{from_addr}> for <{ALICE}>"


def test_outgoing_from_compare_ignores_case(outgoing, openpgp):
    mail = encrypted_mail("Alice@Chat.Example.org", BOB, openpgp.encrypt())
    assert outgoing.check_DATA(envelope(ALICE, [BOB], mail)) is None


@pytest.mark.parametrize("replace", [
    (b"From: <alice@chat.example.org>\r\n", b""),
    (b"From: <alice@chat.example.org>\r\n",
     b"From: <alice@chat.example.org>\r\nFrom: <mallory@example.org>\r\n"),
    (b"From: <alice@chat.example.org>", b"From: <alice@chat.example.org>, <mallory@example.org>"),
    (b"From: <alice@chat.example.org>",
     b"From: =?utf-8?q?alice=40chat=2Eexample=2Eorg?= <m@x.org>"),
    (b"From: <alice@chat.example.org>", b"From: undisclosed:;"),
    (b"From: <alice@chat.example.org>", b"From: <>"),
])
def test_outgoing_missing_or_ambiguous_from_is_refused(outgoing, openpgp, replace):
    mail = encrypted_mail(ALICE, BOB, openpgp.encrypt()).replace(*replace)
    assert outgoing.check_DATA(envelope(ALICE, [BOB], mail)).startswith("500 Invalid FROM")


@pytest.mark.parametrize("name", [b"=?utf-8?q?Al=C3=AFce?=", b"\"Alice (work)\"",
                                  b"Alice\r\n\t", b"Al\xc3\xafce"])
def test_outgoing_from_with_display_name_passes(outgoing, openpgp, name):
    mail = encrypted_mail(ALICE, BOB, openpgp.encrypt()).replace(
        b"From: <alice", b"From: " + name + b" <alice")
    assert outgoing.check_DATA(envelope(ALICE, [BOB], mail)) is None
    assert single_from_address(parse_message(mail)) == ALICE


def test_outgoing_autocrypt_setup_message_to_self_passes(outgoing):
    mail = autocrypt_setup_mail(ALICE, ALICE)
    assert outgoing.check_DATA(envelope(ALICE, [ALICE], mail)) is None
    assert outgoing.check_DATA(envelope(ALICE, ["Alice@chat.example.org"], mail)) is None


@pytest.mark.parametrize("rcpts,kwargs", [
    ([BOB], {}),
    ([ALICE, BOB], {}),
    ([ALICE], {"subject": "Autocrypt Setup Message (not really)"}),
    ([ALICE], {"content_type": "multipart/alternative"}),
])
def test_outgoing_autocrypt_setup_message_fakes_are_refused(outgoing, rcpts, kwargs):
    mail = autocrypt_setup_mail(ALICE, rcpts[0], **kwargs)
    assert outgoing.check_DATA(envelope(ALICE, rcpts, mail)) == ENCRYPTION_NEEDED_523


@pytest.mark.parametrize("content", [
    b"",
    b"\r\n",
    b"From: <alice@chat.example.org>\r\n\r\n",
    b"From: <alice@chat.example.org>\r\nContent-Type: multipart/encrypted\r\n\r\n--x--\r\n",
    b"From: <alice@chat.example.org>\r\nSubject: \xc3\xa4\xff\r\n\r\n\xff\xfe\x00 body\r\n",
    b"From: <alice@chat.example.org>\r\nContent-Type: multipart/encrypted; boundary=\"x\"\r\n"
    b"\r\n--x\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n--x\r\n"
    b"Content-Type: application/octet-stream\r\n\r\n-----BEGIN PGP MESSAGE-----\r\n\r\n"
    b"wV4DCf8tWu3FWT\r\n",  # truncated mid-armor, no closing boundary
])
def test_outgoing_broken_messages_are_refused_without_crash(outgoing, content):
    result = outgoing.check_DATA(envelope(ALICE, [BOB], content))
    assert result in (ENCRYPTION_NEEDED_523, f"500 Invalid FROM <> for <{ALICE}>")


def test_outgoing_non_ascii_headers_in_encrypted_mail_pass(outgoing, openpgp):
    mail = encrypted_mail(ALICE, BOB, openpgp.encrypt(), subject="Grüße 👋")
    assert b"Gr\xc3\xbc\xc3\x9fe" in mail
    assert outgoing.check_DATA(envelope(ALICE, [BOB], mail)) is None


def test_outgoing_invalid_mail_from(outgoing):
    assert outgoing.check_MAIL("alice@chat.example.org") is None
    for address in ("nodomain", "a@b@chat.example.org", "<>"):
        assert outgoing.check_MAIL(address) == f"500 Invalid from address <{address}>"


def test_replies_never_carry_raw_control_characters(outgoing):
    for address in ("a@b@\udcff", "a\r\n@b@c", "x\x00@y@z"):
        reply = outgoing.check_MAIL(address)
        assert reply.startswith("500 Invalid from address <") and reply.isprintable()
    mail = plain_mail("mallory@example.org", BOB)
    reply = outgoing.check_DATA(envelope("al\udcffice@chat.example.org", [BOB], mail))
    assert reply == "500 Invalid FROM <mallory@example.org> for <al\\udcffice@chat.example.org>"


def test_outgoing_rate_limit(make_config):
    config = make_config(DOMAIN, max_user_send_per_minute=60, max_user_send_burst_size=3)
    outgoing = OutgoingFilter(config)
    results = [outgoing.check_MAIL(ALICE) for _ in range(5)]
    assert results[:3] == [None] * 3
    assert results[3] == f"450 4.7.1: Too much mail from {ALICE}"
    assert results[3].startswith("450 4.7.1: Too much mail from")
    assert outgoing.check_MAIL(BOB) is None


# -- incoming ------------------------------------------------------------------------------


def test_incoming_encrypted_passes(incoming, openpgp, caplog):
    caplog.set_level(logging.INFO)
    create_account(incoming.config, BOB)
    mail = encrypted_mail("carol@example.net", BOB, openpgp.encrypt())
    assert incoming.check_DATA(envelope("carol@example.net", [BOB], mail)) is None
    assert "Incoming: Filtering encrypted mail." in messages(caplog)
    mail = securejoin_mail("carol@example.net", BOB)
    assert incoming.check_DATA(envelope("carol@example.net", [BOB], mail)) is None


def test_incoming_cleartext_depends_on_recipient(incoming, caplog):
    caplog.set_level(logging.INFO)
    config = incoming.config
    create_account(config, BOB)
    create_account(config, ALICE, enforce_e2ee=False)
    mail = plain_mail("carol@example.net", BOB)
    assert incoming.check_DATA(envelope("carol@example.net", [BOB], mail)) == ENCRYPTION_NEEDED_523
    assert messages(caplog)[-2:] == [
        "Incoming: Filtering unencrypted mail.", "Rejected unencrypted mail."]
    assert incoming.check_DATA(envelope("carol@example.net", [ALICE], mail)) is None
    # an address without account is let through; Dovecot's LMTP bounces it
    nobody = f"nobody@{DOMAIN}"
    assert incoming.check_DATA(envelope("carol@example.net", [nobody], mail)) is None
    both = envelope("carol@example.net", [ALICE, BOB], mail)
    assert incoming.check_DATA(both) == ENCRYPTION_NEEDED_523


@pytest.mark.parametrize("spelling", ["BOB@chat.example.org", "bob@CHAT.example.org",
                                      "bob+tag@chat.example.org", "Bob+x+y@Chat.Example.Org"])
def test_incoming_recipient_spellings_of_enforcing_account(incoming, spelling):
    create_account(incoming.config, BOB)
    mail = plain_mail("carol@example.net", spelling)
    assert incoming.check_DATA(envelope("carol@example.net", [spelling], mail)) == (
        ENCRYPTION_NEEDED_523)


@pytest.mark.parametrize("recipient", [
    "../../../etc/passwd@chat.example.org",
    "../bob@chat.example.org",
    "a/b@chat.example.org",
    "..@chat.example.org",
    "@chat.example.org",
    "bob\x00@chat.example.org",
    "bob\n@chat.example.org",
    "\"bob smith\"@chat.example.org",
    "ä@chat.example.org",
    "x" * 400 + "@chat.example.org",
])
def test_incoming_hostile_recipients_are_refused_safely(incoming, tmp_path, recipient):
    before = sorted(tmp_path.rglob("*"))
    mail = plain_mail("carol@example.net", BOB)
    assert incoming.check_DATA(envelope("carol@example.net", [recipient], mail)) == (
        ENCRYPTION_NEEDED_523)
    assert sorted(tmp_path.rglob("*")) == before


def test_incoming_foreign_recipient_is_not_a_mailbox(incoming, tmp_path):
    mail = plain_mail("carol@example.net", "dave@example.com")
    for rcpt in ("dave@example.com", "../x@example.com", "bob@chat.example.org.evil"):
        assert incoming.check_DATA(envelope("carol@example.net", [rcpt], mail)) is None


def test_incoming_mailer_daemon_report_passes(incoming, caplog):
    caplog.set_level(logging.INFO)
    create_account(incoming.config, BOB)
    mail = mailer_daemon_mail("MAILER-DAEMON@example.net", BOB)
    assert incoming.check_DATA(envelope("", [BOB], mail)) is None
    assert messages(caplog)[-1] == (
        "Incoming: Filtering mailer-daemon message from MAILER-DAEMON@example.net")


@pytest.mark.parametrize("kwargs", [
    {"auto_submitted": None},
    {"from_addr": "postmaster@example.net"},
    {"from_addr": "x-mailer-daemon@example.net"},
    {"content_type": "multipart/mixed"},
])
def test_incoming_mailer_daemon_fakes_are_refused(incoming, kwargs):
    create_account(incoming.config, BOB)
    args = {"from_addr": "mailer-daemon@example.net", "to_addr": BOB, **kwargs}
    mail = mailer_daemon_mail(**args)
    assert incoming.check_DATA(envelope("", [BOB], mail)) == ENCRYPTION_NEEDED_523


def test_incoming_mail_from_differing_from_header_is_reinjected_as_null_sender(
        incoming, openpgp):
    mail = encrypted_mail("carol@example.net", BOB, openpgp.encrypt())

    def reinjected_sender(mail_from):
        return asyncio.run(incoming.check(envelope(mail_from, [BOB], mail)))

    assert reinjected_sender("carol@example.net") == (None, "carol@example.net")
    assert reinjected_sender("Carol@Example.net") == (None, "Carol@Example.net")
    srs = "SRS0=HHH=TT=example.net=carol@forwarder.example"
    assert reinjected_sender(srs) == (None, "")
    assert reinjected_sender("<>") == (None, "")


# -- content the parser cannot take apart -------------------------------------------------


def test_deeply_nested_mail_is_refused_for_good(make_config, smtp_sink):
    config = make_config(DOMAIN, postfix_reinject_port=smtp_sink.port,
                         postfix_reinject_port_incoming=smtp_sink.port)
    outgoing, incoming = OutgoingFilter(config), IncomingFilter(config, verify_dkim=False)
    create_account(config, BOB)
    create_account(config, ALICE, enforce_e2ee=False)
    carol = "carol@example.net"
    mail = nested_mail(ALICE, BOB, depth=1000)
    assert len(mail) < 100_000
    with pytest.raises(UnparseableMessage):
        parse_message(mail)
    assert filtered(outgoing, envelope(ALICE, [BOB], mail)) == ENCRYPTION_NEEDED_523
    # incoming: refused as cleartext where the recipient wants only encrypted mail, and
    # refused all the same where cleartext would do: not even its From can be checked
    assert filtered(incoming, envelope(carol, [BOB], mail)) == ENCRYPTION_NEEDED_523
    assert filtered(incoming, envelope(carol, [ALICE, BOB], mail)) == ENCRYPTION_NEEDED_523
    assert filtered(incoming, envelope(carol, [ALICE], mail)) == UNPARSEABLE_554
    assert filtered(incoming, envelope(carol, [f"nobody@{DOMAIN}"], mail)) == UNPARSEABLE_554
    assert UNPARSEABLE_554.startswith("554 5.")
    assert smtp_sink.messages == []


def test_nesting_the_parser_handles_is_judged_as_usual(outgoing, incoming, openpgp):
    mail = nested_mail(ALICE, BOB, depth=200)
    assert parse_message(mail).is_multipart()
    assert outgoing.check_DATA(envelope(ALICE, [BOB], mail)) == ENCRYPTION_NEEDED_523
    assert incoming.check_DATA(envelope("carol@example.net", [BOB], mail)) is None


# -- incoming DKIM -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dkim_key():
    return generate_rsa_key()


def dkim_sign(mail, domain, key):
    return dkim.sign(mail, b"sel", domain.encode(), key[0], include_headers=SIGNED_HEADERS) + mail


def test_incoming_dkim_is_checked_after_content(make_config, openpgp, dkim_key):
    keys = KeyDirectory()
    keys.publish("sel", "example.net", dkim_key[1])
    incoming = IncomingFilter(make_config(DOMAIN), key_lookup=keys.lookup)
    create_account(incoming.config, BOB)
    mail = encrypted_mail("carol@example.net", BOB, openpgp.encrypt())
    env = envelope("carol@example.net", [BOB], mail)
    assert incoming.check_DATA(env) == "554 5.7.1 No DKIM signature found"
    env = envelope("carol@example.net", [BOB], dkim_sign(mail, "example.net", dkim_key))
    assert incoming.check_DATA(env) is None
    tampered = dkim_sign(mail, "example.net", dkim_key).replace(
        b"version identification", b"version identificatiom")
    env = envelope("carol@example.net", [BOB], tampered)
    assert incoming.check_DATA(env) == "554 5.7.1 No valid DKIM signature found"
    # cleartext to an encrypting account is refused for that reason first
    plain = dkim_sign(plain_mail("carol@example.net", BOB), "example.net", dkim_key)
    assert incoming.check_DATA(envelope("carol@example.net", [BOB], plain)) == (
        ENCRYPTION_NEEDED_523)
    # alignment with the From header, not with MAIL FROM
    other = encrypted_mail("carol@other.example", BOB, openpgp.encrypt())
    env = envelope("carol@example.net", [BOB], dkim_sign(other, "example.net", dkim_key))
    assert incoming.check_DATA(env) == "554 5.7.1 No valid DKIM signature found"


def test_incoming_dkim_skipped_for_ip_literal_from(make_config, openpgp):
    keys = KeyDirectory()
    incoming = IncomingFilter(make_config(DOMAIN), key_lookup=keys.lookup)
    mail = encrypted_mail("carol@[192.0.2.7]", BOB, openpgp.encrypt())
    assert incoming.check_DATA(envelope("carol@[192.0.2.7]", [BOB], mail)) is None
    assert keys.lookups == []


def test_skip_dkim_environment(make_config, monkeypatch, caplog):
    config = make_config(DOMAIN)
    monkeypatch.setenv("FILTERMAIL_SKIP_DKIM", "1")
    assert make_filter(config, "incoming").verify_dkim is False
    assert "DKIM verification DISABLED!" in messages(caplog)
    monkeypatch.setenv("FILTERMAIL_SKIP_DKIM", "0")
    assert make_filter(config, "incoming").verify_dkim is True
    monkeypatch.delenv("FILTERMAIL_SKIP_DKIM")
    assert make_filter(config, "incoming").verify_dkim is True


# -- reinjection ---------------------------------------------------------------------------


def test_reinjection_sends_original_bytes(make_config, openpgp, smtp_sink):
    config = make_config(DOMAIN, postfix_reinject_port=smtp_sink.port)
    outgoing = OutgoingFilter(config)
    mail = encrypted_mail(ALICE, BOB, openpgp.encrypt(), subject="Grüße")
    mail = mail.replace(b"\r\n\r\n--", b"\r\n\r\n.leading dot\r\n--", 1)
    assert filtered(outgoing, envelope(ALICE, [BOB, "x@example.net"], mail)) == "250 OK"
    assert smtp_sink.messages == [(ALICE, [BOB, "x@example.net"], mail)]


def test_incoming_reinjection_uses_null_sender_for_forwarded_mail(make_config, openpgp,
                                                                  smtp_sink):
    config = make_config(DOMAIN, postfix_reinject_port_incoming=smtp_sink.port)
    incoming = IncomingFilter(config, verify_dkim=False)
    mail = encrypted_mail("carol@example.net", BOB, openpgp.encrypt())
    assert filtered(incoming, envelope("bounces@lists.example", [BOB], mail)) == "250 OK"
    assert filtered(incoming, envelope("carol@example.net", [BOB], mail)) == "250 OK"
    assert [m[0] for m in smtp_sink.messages] == ["<>", "carol@example.net"]


def test_reinjection_of_utf8_addresses(make_config, openpgp, smtp_sink):
    config = make_config(DOMAIN, postfix_reinject_port_incoming=smtp_sink.port)
    incoming = IncomingFilter(config, verify_dkim=False)
    sender = "jörg@bücher.example"
    mail = encrypted_mail(sender, BOB, openpgp.encrypt())
    env = envelope(sender, [BOB], mail)
    env.mail_options = ["BODY=8BITMIME"]
    assert filtered(incoming, env) == "250 OK"
    assert smtp_sink.messages == [(sender, [BOB], mail)]
    assert "SMTPUTF8" in smtp_sink.recorder.mail_options[0]
    assert "BODY=8BITMIME" in smtp_sink.recorder.mail_options[0]


def test_reinject_mail_options():
    assert reinject_mail_options([], "a@x.org", ["b@y.org"]) == []
    assert reinject_mail_options(["SIZE=10", "BODY=8BITMIME", "RET=HDRS", "SMTPUTF8"],
                                 "a@x.org", ["b@y.org"]) == ["BODY=8BITMIME", "SMTPUTF8"]
    assert reinject_mail_options([], "ä@x.org", ["b@y.org"]) == ["SMTPUTF8"]
    assert reinject_mail_options(["SMTPUTF8"], "a@x.org", ["ö@y.org"]) == ["SMTPUTF8"]


def test_reinjection_failure_asks_to_retry(make_config, openpgp):
    config = make_config(DOMAIN, postfix_reinject_port=free_port())  # nobody listens
    outgoing = OutgoingFilter(config)
    mail = encrypted_mail(ALICE, BOB, openpgp.encrypt())
    assert filtered(outgoing, envelope(ALICE, [BOB], mail)) == REINJECT_FAILED_451
    assert REINJECT_FAILED_451.startswith("451 ")


@pytest.mark.parametrize("reply", ["554 5.7.1 Rejected by policy", "452 4.3.1 Out of space"])
def test_reinjection_data_errors_are_passed_on(make_config, openpgp, smtp_sink, reply):
    smtp_sink.recorder.reply = reply
    outgoing = OutgoingFilter(make_config(DOMAIN, postfix_reinject_port=smtp_sink.port))
    mail = encrypted_mail(ALICE, BOB, openpgp.encrypt())
    assert filtered(outgoing, envelope(ALICE, [BOB], mail)) == reply


def test_reinjection_recipient_errors_are_passed_on(make_config, openpgp, smtp_sink):
    smtp_sink.recorder.rcpt_reply = "450 4.2.0 Try later"
    outgoing = OutgoingFilter(make_config(DOMAIN, postfix_reinject_port=smtp_sink.port))
    mail = encrypted_mail(ALICE, BOB, openpgp.encrypt())
    assert filtered(outgoing, envelope(ALICE, [BOB], mail)) == "450 4.2.0 Try later"


def test_unexpected_error_asks_to_retry(outgoing, monkeypatch):
    def explode(envelope):
        raise RuntimeError("bug")

    monkeypatch.setattr(outgoing, "inspect", explode)
    assert filtered(outgoing, envelope(ALICE, [BOB], b"")).startswith("451 ")


# -- command line --------------------------------------------------------------------------


def test_main_help(capsys):
    assert main(["--help"]) == 0
    assert "outgoing" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [[], ["x.ini"], ["x.ini", "sideways"], ["a", "b", "c"]])
def test_main_bad_arguments(make_ini, capsys, argv):
    assert main(argv) == 1
    assert "filtermail: error:" in capsys.readouterr().err


def test_main_bad_config(tmp_path, capsys):
    assert main([str(tmp_path / "missing.ini"), "outgoing"]) == 1
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.ini"
    bad.write_text("[params]\nmail_domain = chat.example.org\nmax_message_size = lots\n")
    assert main([str(bad), "incoming"]) == 1
    assert "max_message_size" in capsys.readouterr().err


def test_main_port_in_use(make_ini, capsys):
    import socket
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        ini = make_ini(DOMAIN, filtermail_smtp_port=blocker.getsockname()[1])
        assert main([str(ini), "outgoing"]) == 1
    assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err


def test_outgoing_mode_does_not_load_dkim(make_ini):
    import subprocess
    import sys
    code = (
        "import sys; from chatmaild.filtermail import make_filter; "
        "from chatmaild.config import read_config; "
        f"make_filter(read_config({str(make_ini(DOMAIN))!r}), 'outgoing'); "
        "print('dkim' in sys.modules, 'dns.resolver' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
                         check=True, timeout=60).stdout
    assert out.split() == ["False", "False"]
