"""lastlogin: the password file's mtime records the day of the last login."""

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from chatmaild.config import read_config
from chatmaild.dictproxy import tab_escape
from chatmaild.doveauth import encrypt_password
from chatmaild.lastlogin import LastLoginDictServer, parse_timestamp
from chatmaild.mailbox import Mailbox

DOMAIN = "chat.example.org"
ADDR = f"abcdefghi@{DOMAIN}"
DAY = 86400


@pytest.fixture
def mailbox(config):
    mailbox = Mailbox(config, ADDR)
    mailbox.create(encrypt_password("some-password"))
    os.utime(mailbox.password_path, (DAY, DAY))
    return mailbox


@pytest.fixture
def server(config):
    return LastLoginDictServer(config)


def set_last_login(server, addr, value, txid="1"):
    """One Dovecot last_login transaction: begin, set, commit; returns the commit reply."""
    txns, key = {}, tab_escape(f"shared/last-login/{addr}")
    assert server.handle_line(f"B{txid}\t{tab_escape(addr)}", txns) == ""
    assert server.handle_line(f"S{txid}\t{key}\t{tab_escape(str(value))}", txns) == ""
    return server.handle_line(f"C{txid}", txns)


def snapshot(root):
    return {str(p): (p.lstat().st_mtime_ns, p.lstat().st_size) for p in Path(root).rglob("*")}


@pytest.mark.parametrize("value, expected", [
    ("0", 0), ("1700000000", 1700000000), (" 1700000000 ", 1700000000), ("", None),
    ("-5", None), ("1.5", None), ("abc", None), ("१२३", None), (str(10**11), None),
])
def test_parse_timestamp(value, expected):
    assert parse_timestamp(value) == expected


def test_login_sets_mtime_to_the_day(server, mailbox):
    now = int(time.time())
    assert set_last_login(server, ADDR, now) == "O\n"
    assert mailbox.last_login() == now // DAY * DAY
    assert int(mailbox.password_path.stat().st_atime) == now // DAY * DAY


def test_mtime_only_changes_when_the_day_changes(server, mailbox):
    stat_before = mailbox.password_path.stat()
    # Same day, later time: the file is not touched at all (ctime stays).
    time.sleep(0.01)
    assert set_last_login(server, ADDR, DAY + 5000) == "O\n"
    stat_after = mailbox.password_path.stat()
    assert stat_after.st_mtime_ns == stat_before.st_mtime_ns
    assert stat_after.st_ctime_ns == stat_before.st_ctime_ns
    assert set_last_login(server, ADDR, 3 * DAY + 1) == "O\n"
    assert mailbox.last_login() == 3 * DAY


def test_password_content_is_untouched(server, mailbox):
    content = mailbox.password_path.read_bytes()
    set_last_login(server, ADDR, 10 * DAY)
    assert mailbox.password_path.read_bytes() == content


def test_unknown_account_is_ignored(server, config, caplog):
    before = snapshot(config.mailboxes_dir)
    assert set_last_login(server, f"zyxwvutsr@{DOMAIN}", 10 * DAY) == "O\n"
    assert snapshot(config.mailboxes_dir) == before
    assert "Can not get last login timestamp" in caplog.text


@pytest.mark.parametrize("addr", [
    "", "../../etc/passwd", f"../../x@{DOMAIN}", f"a/b@{DOMAIN}", f"..@{DOMAIN}",
    "abcdefghi@other.org", f"{ADDR}/password", "/etc/passwd@" + DOMAIN, f"abc%d@{DOMAIN}",
    "x" * 400 + "@" + DOMAIN, f"abc\x01def@{DOMAIN}", f"abc\tdef@{DOMAIN}", f"abc\x00@{DOMAIN}",
    f"{ADDR}\n",
])
def test_hostile_addresses_touch_nothing(server, config, mailbox, tmp_path, addr):
    before = snapshot(tmp_path)
    assert set_last_login(server, addr, 10 * DAY) == "F\n"
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("value", ["", "abc", "-1", "1.5", str(10**20)])
def test_invalid_timestamps_fail_the_commit(server, mailbox, value):
    assert set_last_login(server, ADDR, value) == "F\n"
    assert mailbox.last_login() == DAY


def test_other_keys_fail_the_commit(server, mailbox):
    txns = {}
    server.handle_line(f"B1\t{ADDR}", txns)
    server.handle_line(f"S1\tshared/other/{ADDR}\t{10 * DAY}", txns)
    server.handle_line(f"S1\tpriv/last-login/{ADDR}\t{10 * DAY}", txns)
    assert server.handle_line("C1", txns) == "F\n"
    assert mailbox.last_login() == DAY


def test_lookups_find_nothing(server, mailbox):
    assert server.handle_line(f"Lshared/last-login/{ADDR}", {}) == "N\n"


# -- the daemon over its unix socket -------------------------------------------------------


@pytest.fixture
def socket_path():
    # Unix socket paths are limited to 108 bytes, too short for pytest's tmp_path.
    directory = Path(tempfile.mkdtemp(prefix="lastlogin-", dir="/tmp"))
    yield directory / "lastlogin.socket"
    shutil.rmtree(directory, ignore_errors=True)


def test_daemon_records_logins(start_daemon, dict_client, make_ini, socket_path, tmp_path):
    ini = make_ini()
    mailbox = Mailbox(read_config(ini), ADDR)
    mailbox.create(encrypt_password("some-password"))
    os.utime(mailbox.password_path, (DAY, DAY))
    daemon = start_daemon("lastlogin", socket_path, ini, ready=socket_path.exists)

    client = dict_client(socket_path)
    client.send("H3\t2\t0\t\tlastlogin")
    now = int(time.time())
    # Dovecot reuses transaction ids; a second connection with the same id is separate.
    other = dict_client(socket_path)
    other.send("B1\tzyxwvutsr@chat.example.org")
    client.send(f"B1\t{ADDR}")
    client.send(f"S1\tshared/last-login/{ADDR}\t{now}")
    assert client.request("C1") == "O"
    assert mailbox.last_login() == now // DAY * DAY
    other.send(f"S1\tshared/last-login/../../evil@{DOMAIN}\t{now}")
    assert other.request("C1") == "F"
    assert not list(tmp_path.rglob("evil*"))
    assert daemon.proc.poll() is None


def test_main_usage_errors(capsys):
    from chatmaild.lastlogin import main

    assert main(["one"]) == 2
    assert "usage: lastlogin SOCKET INI" in capsys.readouterr().err
