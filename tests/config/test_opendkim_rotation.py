"""OpenDKIM's tables after `chatmail dkim rotate` switched keys: accepted by opendkim
itself, and the mail it signs names the new selector."""

import subprocess
from types import SimpleNamespace

import pytest

from chatmaild.admin.components import opendkim
from chatmaild.admin.platform import load_platform

from .test_opendkim import pytestmark, signature_tags, start_opendkim  # noqa: F401

SELECTOR = "dkim20261130"


@pytest.fixture
def rotated(make_config, render, tmp_path):
    """The opendkim files rendered for a relay whose list of keys (in tmp_path, the state
    directory) names a rotated key as the active one, the install key as retired."""
    platform = SimpleNamespace(**{**vars(load_platform("debian12")),
                                  "state_dir": str(tmp_path)})
    (tmp_path / "dkim-keys").write_text(
        "# comment\n"
        "chat.example.org opendkim retired 2026-11-30T00:53:20Z "
        "/etc/dkimkeys/chat.example.org.private\n"
        f"chat.example.org {SELECTOR} active 2026-11-30T00:53:20Z "
        f"/etc/dkimkeys/chat.example.org.{SELECTOR}.private\n"
        "old.example.org dkim20200101 active 2020-01-01T00:00:00Z /etc/dkimkeys/old.private\n")
    return render("opendkim", make_config(), platform), platform


def test_tables_name_the_active_key_and_validate(rotated):
    rendered, platform = rotated
    assert rendered["/etc/dkimkeys/KeyTable"].content.split() == [
        f"{SELECTOR}._domainkey.chat.example.org",
        f"chat.example.org:{SELECTOR}:/etc/dkimkeys/chat.example.org.{SELECTOR}.private"]
    assert rendered["/etc/dkimkeys/SigningTable"].content.split() == [
        "*@chat.example.org", f"{SELECTOR}._domainkey.chat.example.org"]
    assert opendkim.validate(list(rendered.values()), platform) == []


def test_mail_is_signed_with_the_new_selector(rotated, tmp_path):
    subprocess.run(["/usr/sbin/opendkim-genkey", "-D", str(tmp_path), "-d", "chat.example.org",
                    "-s", SELECTOR], check=True)
    (tmp_path / f"{SELECTOR}.private").rename(tmp_path / f"chat.example.org.{SELECTOR}.private")
    for socket_path in start_opendkim(rotated[0], tmp_path):
        tags = signature_tags(socket_path)
        assert (tags["d"], tags["s"]) == ("chat.example.org", SELECTOR)
