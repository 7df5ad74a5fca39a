"""Hostile chatmail.ini values: every key takes only its form (chatmaild.config.SETTINGS),
from the file and from `chatmail set`, and what reaches a command stays one argument."""

import os
import subprocess

import pytest

from chatmaild.admin import cli
from chatmaild.admin.platform import load_platform
from chatmaild.admin.render import render_all, render_component
from chatmaild.config import SETTINGS, Config, ConfigError, default_config_text, read_config

from ..conftest import REPO

# A valid value of every key, none of them its default.
VALID = {
    "mail_domain": "chat.example.org",
    "max_user_send_per_minute": "30",
    "max_user_send_burst_size": "5",
    "max_mailbox_size": "1G",
    "max_message_size": "1000000",
    "delete_mails_after": "10",
    "delete_large_after": "3",
    "delete_inactive_users_after": "60",
    "username_min_length": "6",
    "username_max_length": "12",
    "password_min_length": "12",
    "max_load_1m": "2.5",
    "min_available_memory": "100M",
    "min_free_disk_space": "2G",
    "max_imap_connections": "500",
    "max_smtp_connections": "100",
    "filtermail_smtp_port": "20080",
    "filtermail_smtp_port_incoming": "20081",
    "filtermail_http_port_incoming": "20082",
    "filtermail_lmtp_port_transport": "20083",
    "postfix_reinject_port": "20025",
    "postfix_reinject_port_incoming": "20026",
    "tls_cert_mode": "external",
    "tls_external_cert_and_key": "/etc/x/full.pem /etc/x/key.pem",
    "acme_email": "admin@example.org",
    "www_folder": "/srv/www",
    "mtail_address": "::1",
    "disable_ipv6": "true",
    "imap_rawlog": "true",
    "imap_compress": "true",
    "iroh_relay": "https://iroh.example.org",
    "notification_url": "http://127.0.0.1:8080/notify",
    "turn_socket_path": "/run/x/turn.socket",
    "turn_secret_path": "/etc/x/turn-secret",
    "backup_dir": "/var/backups/chatmail",
    "mailboxes_dir": "/srv/mail",
    "passdb_path": "/srv/passdb.sqlite",
    "privacy_postal": "Example GmbH",
    "privacy_mail": "privacy@example.org",
    "privacy_pdo": "Data Officer",
    "privacy_supervisor": "The Authority",
}

HOSTILE = {
    "line break": "a@example.org\nssl = no",
    "semicolon": "x; reboot",
    "command substitution": "$(reboot)",
    "backticks": "`reboot`",
    "quotes": "a\"b'c",
    "template expression": "{{ config }}",
    "template statement": "{% raw %}",
    "script": "<script>alert(1)</script>",
    "relative path": "srv/mail",
    "dot-dot path": "/srv/../etc",
    "option": "--server x",
    "overlong": "a" * 1001,
    "NUL": "a\x00b",
    "tab": "a\tb",
    "carriage return": "a\rb",
}
TEXT_KEYS = {"privacy_postal", "privacy_pdo", "privacy_supervisor"}
# Contact details are free text, HTML-escaped on the privacy page, their only place.
ESCAPED = {"line break", "semicolon", "command substitution", "backticks", "quotes",
           "script", "relative path", "dot-dot path", "option"}
# Upstream's cmdeploy takes a relative www_folder; here it only turns our pages off.
ACCEPTED = {(key, name) for key in TEXT_KEYS for name in ESCAPED} | {
    ("www_folder", "relative path")}
REFUSED = [(key, name) for key in SETTINGS for name in HOSTILE if (key, name) not in ACCEPTED]


def params_with(key, value):
    return {"mail_domain": "chat.example.org", key: value}


def test_every_key_has_a_valid_example():
    assert set(VALID) == set(SETTINGS)
    config = Config("chatmail.ini", VALID)
    assert config.unknown_keys == []
    for key, value in VALID.items():
        assert value != SETTINGS[key].default, key


@pytest.mark.parametrize("key,name", REFUSED)
def test_hostile_value_is_refused_naming_key_and_form(key, name):
    with pytest.raises(ConfigError) as excinfo:
        Config("chatmail.ini", params_with(key, HOSTILE[name]))
    message = str(excinfo.value)
    assert f"chatmail.ini: {key} = " in message
    assert any(word in message for word in
               ("expected", "it contains", "characters, more than", "domain")), message


@pytest.mark.parametrize("key", sorted(TEXT_KEYS))
def test_contact_text_is_escaped_on_the_privacy_page(key):
    value = "\n".join(HOSTILE[name] for name in sorted(ESCAPED))
    config = Config("chatmail.ini", params_with(key, value))
    page = next(item.content for item in
                render_component("www", config, load_platform("debian12"))
                if item.path.endswith("/privacy.html"))
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "a&#34;b&#39;c" in page


@pytest.mark.parametrize("key", [key for key in SETTINGS if not SETTINGS[key].multiline])
def test_continuation_line_is_refused_naming_key_and_line(tmp_path, key):
    """The review's example: `privacy_mail = a@example.org` and an indented `ssl = no`
    put a separate `ssl = no` line into Dovecot's configuration."""
    lines = ["[params]", "mail_domain = chat.example.org"] if key != "mail_domain" else [
        "[params]"]
    lines += [f"{key} = {VALID[key]}", "  ssl = no"]
    path = tmp_path / "chatmail.ini"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as excinfo:
        read_config(path)
    message = str(excinfo.value)
    assert f"chatmail.ini, line {len(lines)}: " in message
    assert f"continues the value of {key}" in message and f"Write {key} on one line" in message


def test_contact_texts_may_go_on_over_lines(tmp_path):
    path = tmp_path / "chatmail.ini"
    path.write_text("[params]\nmail_domain = chat.example.org\nprivacy_postal =\n"
                    "    Example GmbH\n    Street 1\n\nprivacy_pdo = Data Officer\n")
    config = read_config(path)
    assert config.privacy_postal == "Example GmbH\nStreet 1"
    assert config.privacy_pdo == "Data Officer"


@pytest.mark.parametrize("word", ["true", "True", "false", "False", "yes", "no", "on",
                                  "off", "1", "0", ""])
def test_booleans_read_as_upstream_does(word):
    """Only 'true' is true, as on upstream relays; the other yes/no words load as false."""
    config = Config("chatmail.ini", params_with("imap_rawlog", word))
    assert config.imap_rawlog is (word.lower() == "true")


@pytest.mark.parametrize("key,value,expected", [
    ("mailboxes_dir", "/srv//mail/./x/", "/srv/mail/x"),
    ("turn_secret_path", "/etc/chatmail/turn-secret", "/etc/chatmail/turn-secret"),
    ("iroh_relay", "https://[::1]:8443/relay", "https://[::1]:8443/relay"),
    ("notification_url", "https://push.example.org/n?x=1", "https://push.example.org/n?x=1"),
    ("mtail_address", "127.0.0.1", "127.0.0.1"),
    ("acme_email", "First.Last+tls@Example.ORG", "First.Last+tls@Example.ORG"),
    ("max_load_1m", "-1", -1.0),
    ("www_folder", "disabled", "disabled"),
])
def test_accepted_forms(key, value, expected):
    config = Config("chatmail.ini", params_with(key, value))
    assert str(getattr(config, key)) == str(expected)


@pytest.mark.parametrize("key,value", [
    ("mailboxes_dir", "/"),
    ("mailboxes_dir", "/srv/mail dir"),
    ("passdb_path", "/srv/pass:db"),
    ("iroh_relay", "ftp://iroh.example.org"),
    ("iroh_relay", "javascript:alert(1)"),
    ("iroh_relay", "https://iroh.example.org:99999"),
    ("notification_url", "https://exa mple.org/"),
    ("notification_url", "https://user@example.org/"),
    ("mtail_address", "127.0.0.1:3903"),
    ("mtail_address", "metrics.example.org"),
    ("mtail_address", "::1%$(reboot)"),
    ("acme_email", "-x@example.org"),
    ("acme_email", "a..b@example.org"),
    ("acme_email", "admin@localhost"),
    ("privacy_mail", "Privacy <privacy@example.org>"),
    ("tls_external_cert_and_key", "/a/cert.pem /a/key.pem /a/more.pem"),
    ("tls_external_cert_and_key", "cert.pem key.pem"),
    ("username_max_length", "65"),
    ("max_mailbox_size", "99999999999G"),
    ("delete_mails_after", "-1"),
    ("disable_ipv6", "maybe"),
    ("privacy_postal", "Example \u202eGmbH"),
])
def test_refused_forms(key, value):
    with pytest.raises(ConfigError, match=f"{key} = .*expected|it contains"):
        Config("chatmail.ini", params_with(key, value))


# -- chatmail set ----------------------------------------------------------------------


@pytest.fixture
def ini(tmp_path, monkeypatch):
    """A chatmail.ini, and no command may run while `chatmail set` works on it."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"chatmail set ran a command: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    path = tmp_path / "chatmail.ini"
    path.write_text(default_config_text("chat.example.org"))
    return path


@pytest.mark.parametrize("key,name", REFUSED)
def test_set_refuses_hostile_value_and_changes_nothing(ini, capsys, key, name):
    before = ini.read_bytes()
    assert cli.main(["--config", str(ini), "set", f"{key}={HOSTILE[name]}"]) == 1
    err = capsys.readouterr().err
    assert f"{key} = " in err and "nothing was changed" in err
    assert ini.read_bytes() == before


def test_set_refuses_unknown_keys(ini, capsys):
    before = ini.read_bytes()
    assert cli.main(["--config", str(ini), "set", "ssl=no"]) == 1
    assert "'ssl' is not a setting of the relay" in capsys.readouterr().err
    assert ini.read_bytes() == before


def test_set_writes_a_contact_text_over_lines_and_replaces_it_whole(ini):
    assert cli.main(["--config", str(ini), "set", "privacy_postal=Example GmbH\nStreet 1"]) == 0
    assert "privacy_postal = Example GmbH\n    Street 1\n" in ini.read_text()
    assert cli.main(["--config", str(ini), "set", "privacy_postal=Other AG"]) == 0
    assert read_config(ini).privacy_postal == "Other AG"
    assert "Street 1" not in ini.read_text()


# -- what reaches templates and commands -------------------------------------------------


def test_templates_see_no_unknown_value(make_ini):
    """Keys the relay does not read are reported, never handed on: not even a template
    could reach them through the Config object."""
    path = make_ini()
    path.write_text(path.read_text() + "oauth2_client_secret = {{ 7*7 }}<script>\n")
    config = read_config(path)
    assert config.unknown_keys == ["oauth2_client_secret"]
    assert "<script>" not in repr(vars(config))
    for item in render_all(config, load_platform("debian12")):
        assert "<script>" not in str(item.content), item.path


@pytest.mark.parametrize("email,expected", [
    ("admin@example.org", ["--email=admin@example.org"]),
    # as if the check were bypassed: still one argument, never options of certbot's
    ("me@example.org --server http://x --deploy-hook /x",
     ["--email=me@example.org --server http://x --deploy-hook /x"]),
    ("", ["--register-unsafely-without-email"]),
])
def test_acme_step_gives_certbot_the_address_as_one_argument(tmp_path, email, expected):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    certbot = bin_dir / "certbot"
    certbot.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >{tmp_path}/args\n')
    certbot.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CHATMAIL_DATA_DIR=str(REPO),
               CHATMAIL_TLS_CERT_MODE="acme", CHATMAIL_MAIL_DOMAIN="chat.example.org",
               CHATMAIL_ACME_EMAIL=email, CHATMAIL_NO_RELOAD="",
               PLATFORM_CERTBOT_LIVE_DIR=str(tmp_path / "live"),
               PLATFORM_ACME_WEBROOT=str(tmp_path / "webroot"))
    subprocess.run([str(REPO / "steps" / "acme-certificate")], env=env, check=True,
                   capture_output=True)
    args = (tmp_path / "args").read_text().splitlines()
    account = [arg for arg in args if arg.startswith(("--email", "--register"))]
    assert account == expected
    assert "--server" not in args
    assert [arg for arg in args if arg.startswith("--deploy-hook")] == [
        f"--deploy-hook={REPO}/hooks/certbot-deploy"]
    assert "--domains=mta-sts.chat.example.org" in args
