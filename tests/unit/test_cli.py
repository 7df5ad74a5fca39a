"""The `chatmail` admin command: help texts, `setup`, and the commands still to come."""

import os
import stat
import subprocess
import sys

import pytest

from chatmaild.admin.cli import main
from chatmaild.config import read_config

from ..conftest import REPO

SUBCOMMANDS = ("setup", "configure", "status", "dns")


def run_chatmail(*args):
    """The command as an admin runs it: its own process, output as printed."""
    return subprocess.run(
        [sys.executable, "-m", "chatmaild.admin.cli", *map(str, args)],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=60,
    )


def test_without_arguments_prints_help():
    result = run_chatmail()
    assert result.returncode == 2
    assert result.stdout.startswith("usage: chatmail")
    for command in SUBCOMMANDS:
        assert command in result.stdout
    assert "--config" in result.stdout


def test_main_help_names_the_default_config(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "/etc/chatmail/chatmail.ini" in out
    assert "chatmail relay" in out


@pytest.mark.parametrize("command,expected", [
    ("setup", ["DOMAIN", "self-signed", "never overwritten", "--no-configure"]),
    ("configure", ["Apply chatmail.ini", "changes nothing"]),
    ("status", ["services are running"]),
    ("dns", ["DNS records", "--check", "--zonefile F"]),
])
def test_subcommand_help(command, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: chatmail {command}")
    for text in expected:
        assert text in " ".join(out.split()), text


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


@pytest.mark.parametrize("domain", ["chat.example.org", "_test.example.org", "192.0.2.7"])
def test_setup_writes_a_loadable_config(tmp_path, domain, capsys):
    ini = tmp_path / "etc" / "chatmail" / "chatmail.ini"

    assert main(["--config", str(ini), "setup", "--no-configure", domain]) == 0

    config = read_config(ini)
    assert config.mail_domain_bare == domain
    assert stat.S_IMODE(ini.stat().st_mode) == 0o644
    assert sorted(os.listdir(ini.parent)) == ["chatmail.ini"]
    assert "chatmail configure" in capsys.readouterr().out


@pytest.mark.parametrize("domain,reason", [
    ("localhost", "fully qualified"),
    ("Chat.Example.org", "lower case"),
    ("chat..example.org", "not a valid domain label"),
    ("-chat.example.org", "not a valid domain label"),
    ("chat.example.123", "all digits"),
    ("", "empty"),
])
def test_setup_refuses_bad_domains(tmp_path, domain, reason, capsys):
    ini = tmp_path / "chatmail.ini"
    assert main(["--config", str(ini), "setup", "--no-configure", "--", domain]) == 1
    err = capsys.readouterr().err
    assert "cannot be a mail domain" in err and reason in err
    assert not ini.exists()


def test_setup_keeps_an_existing_config_for_the_same_domain(tmp_path, capsys):
    ini = tmp_path / "chatmail.ini"
    main(["--config", str(ini), "setup", "--no-configure", "chat.example.org"])
    edited = ini.read_text() + "max_mailbox_size = 2G\n"
    ini.write_text(edited)

    assert main(["--config", str(ini), "setup", "--no-configure", "chat.example.org"]) == 0

    assert ini.read_text() == edited
    assert "left unchanged" in capsys.readouterr().out


def test_setup_never_overwrites_another_domain(tmp_path):
    ini = tmp_path / "chatmail.ini"
    main(["--config", str(ini), "setup", "--no-configure", "chat.example.org"])
    before = ini.read_text()

    result = run_chatmail("--config", ini, "setup", "--no-configure", "other.example.net")

    assert result.returncode == 1
    assert ini.read_text() == before
    assert "already exists for mail domain 'chat.example.org', not 'other.example.net'" \
        in result.stderr
    assert "not overwriting" in result.stderr
    assert "Traceback" not in result.stderr


def test_setup_never_overwrites_an_unreadable_file(tmp_path, capsys):
    ini = tmp_path / "chatmail.ini"
    ini.write_text("this is not an ini file\n")
    assert main(["--config", str(ini), "setup", "--no-configure", "chat.example.org"]) == 1
    assert ini.read_text() == "this is not an ini file\n"
    assert "cannot be read" in capsys.readouterr().err


def test_setup_reports_an_unwritable_place(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["--config", str(blocker / "chatmail.ini"), "setup", "--no-configure", "chat.example.org"]) == 1
    assert "cannot write" in capsys.readouterr().err


def test_configure_with_a_broken_ini_changes_nothing(tmp_path):
    ini = tmp_path / "chatmail.ini"
    ini.write_text("[params]\nmail_domain = Not A Domain\n")
    result = run_chatmail("--config", ini, "configure")
    assert result.returncode == 1
    assert "mail_domain" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["status"], ["dns"],
                                  ["dns", "--check"], ["dns", "--zonefile", "zone.txt"]])
def test_status_and_dns_without_config_say_what_is_missing(args, tmp_path):
    result = run_chatmail("--config", tmp_path / "chatmail.ini", *args)
    assert result.returncode == 1
    assert "chatmail.ini does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_set_changes_keys_and_keeps_comments(tmp_path):
    ini = tmp_path / "chatmail.ini"
    assert run_chatmail("--config", ini, "setup", "--no-configure", "chat.example.org").returncode == 0
    result = run_chatmail("--config", ini, "set", "mail_domain=new.example.org",
                          "max_mailbox_size=1G")
    assert result.returncode == 0, result.stderr
    text = ini.read_text()
    assert "mail_domain = new.example.org\n" in text and "max_mailbox_size = 1G\n" in text
    assert "# Mailbox quota" in text


@pytest.mark.parametrize("setting", ["mail_domain=Bad Domain", "max_mailbox_size=lots",
                                     "tls_cert_mode=magic"])
def test_set_refuses_invalid_values_and_changes_nothing(tmp_path, setting):
    ini = tmp_path / "chatmail.ini"
    run_chatmail("--config", ini, "setup", "--no-configure", "chat.example.org")
    before = ini.read_bytes()
    result = run_chatmail("--config", ini, "set", setting)
    assert result.returncode == 1 and "nothing was changed" in result.stderr
    assert ini.read_bytes() == before


def test_get_prints_settings_as_written(tmp_path, capsys):
    """The Debian package's questions start from what chatmail.ini says."""
    ini = tmp_path / "chatmail.ini"
    ini.write_text("[params]\nmail_domain = chat.example.org\n"
                   "tls_external_cert_and_key = /etc/c.pem   /etc/k.pem\n")
    assert main(["--config", str(ini), "get", "mail_domain", "acme_email",
                 "tls_external_cert_and_key"]) == 0
    assert capsys.readouterr().out == "chat.example.org\n\n/etc/c.pem /etc/k.pem\n"
    ini.write_text("mail_domain = chat.example.org\n")
    assert main(["--config", str(ini), "get", "mail_domain"]) == 1
    assert "no [params] section" in capsys.readouterr().err


@pytest.mark.parametrize("domain, status, out", [
    ("chat.example.org", 0, "acme"),
    ("_test.example.org", 0, "self"),
    ("203.0.113.5", 0, "self"),
    ("Chat.example.org", 1, "write the domain in lower case"),
    ("localhost", 1, "use a fully qualified domain name such as chat.example.org"),
    ("", 1, "the mail domain is empty"),
])
def test_check_domain_answers_as_setup_would(domain, status, out, capsys):
    assert main(["check-domain", domain]) == status
    assert capsys.readouterr().out == out + "\n"
