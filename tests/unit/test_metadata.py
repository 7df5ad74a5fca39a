"""chatmail-metadata: token storage, lookups, and the daemon spoken to as Dovecot does."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chatmaild.metadata import (
    DeviceTokens,
    MetadataServer,
    is_valid_token_timestamp,
    make_metadata_server,
    valid_tokens,
)
from chatmaild.notifier import Notifier
from chatmaild.turn import generate_secret, make_credentials, read_secret
from tests.conftest import REPO
from tests.unit.push_server import push_server  # noqa: F401

DOMAIN = "chat.example.org"
ADDR = f"user1234@{DOMAIN}"
VENDOR = "shared/0123/vendor/vendor.dovecot/pvt/server/vendor/deltachat/"
DAY = 24 * 3600
HOSTILE_USERS = [
    "",
    "../../../../tmp/evil",
    f"../{ADDR}",
    f"..@{DOMAIN}",
    f".@{DOMAIN}",
    f"a/b@{DOMAIN}",
    f"a/../../x@{DOMAIN}",
    f"{ADDR}/../../x",
    "user@other.org",
    f"user@{DOMAIN}@{DOMAIN}",
    f"us\0er@{DOMAIN}",
    f"us\ner@{DOMAIN}",
    "/etc/passwd",
]


def make_mailbox(config, addr=ADDR):
    """As doveauth does at the first login: the metadata lives in the mailbox directory."""
    path = config.mailboxes_dir / addr
    path.mkdir(parents=True, exist_ok=True)
    return path


def metadata_json(config, addr=ADDR):
    return json.loads((config.mailboxes_dir / addr / "metadata.json").read_text())


@pytest.fixture
def tokens(config):
    make_mailbox(config)
    return DeviceTokens(config)


@pytest.fixture
def server(config, tokens):
    """A server whose notifier queues but sends nothing (no worker threads)."""
    queue_dir = config.mailboxes_dir / "pending_notifications"
    queue_dir.mkdir()
    notifier = Notifier(queue_dir, config.notification_url, tokens.remove)
    return MetadataServer(config, tokens, notifier)


def transaction(server, user, *sets):
    """B/S/C as Dovecot sends them; returns the commit reply."""
    txns = {}
    server.handle_line(f"B1\t{user}", txns)
    for key, value in sets:
        server.handle_line(f"S1\t{key}\t{value}", txns)
    return server.handle_line("C1", txns)


# -- token storage ---------------------------------------------------------------------


def test_token_timestamps_expire_after_90_days_and_never_lie_ahead():
    now = 1_700_000_000
    assert is_valid_token_timestamp(now, now)
    assert is_valid_token_timestamp(now - 89 * DAY, now)
    assert not is_valid_token_timestamp(now - 90 * DAY, now)
    assert is_valid_token_timestamp(now + 30, now)
    assert not is_valid_token_timestamp(now + 3600, now)
    for garbage in (None, "1700000000", [now], True):
        assert not is_valid_token_timestamp(garbage, now)


def test_valid_tokens_migrates_the_old_list_format():
    now = 1_700_000_000
    assert valid_tokens(["a", "b", "", 7], now) == {"a": now, "b": now}
    assert valid_tokens({"a": now - 91 * DAY, "b": now - DAY}, now) == {"b": now - DAY}
    assert valid_tokens(None, now) == {} and valid_tokens("x", now) == {}


def test_tokens_persist_in_metadata_json(config, tokens):
    tokens.add(ADDR, "tok1")
    tokens.add(ADDR, "tok2")
    assert DeviceTokens(config).get(ADDR) == ["tok1", "tok2"]
    stored = metadata_json(config)["devicetoken"]
    assert set(stored) == {"tok1", "tok2"}
    assert all(abs(ts - time.time()) < 5 for ts in stored.values())
    tokens.remove(ADDR, "tok1")
    tokens.remove(ADDR, "never-set")
    assert DeviceTokens(config).get(ADDR) == ["tok2"]


def test_setting_a_token_again_renews_it(config):
    make_mailbox(config)
    now = [1_700_000_000]
    tokens = DeviceTokens(config, clock=lambda: now[0])
    tokens.add(ADDR, "tok")
    now[0] += 80 * DAY
    tokens.add(ADDR, "tok")
    now[0] += 80 * DAY
    assert tokens.get(ADDR) == ["tok"]
    now[0] += 11 * DAY
    assert tokens.get(ADDR) == []


def test_expired_and_future_tokens_are_dropped_from_the_file(config, tokens):
    now = int(time.time())
    path = config.mailboxes_dir / ADDR / "metadata.json"
    path.write_text(json.dumps({"devicetoken": {
        "old": now - 91 * DAY, "future": now + DAY, "fresh": now - DAY}, "other": 1}))
    assert tokens.get(ADDR) == ["fresh"]
    assert metadata_json(config) == {"devicetoken": {"fresh": now - DAY}, "other": 1}


def test_old_list_format_is_migrated(config, tokens):
    path = config.mailboxes_dir / ADDR / "metadata.json"
    path.write_text(json.dumps({"devicetoken": ["old1", "old2"]}))
    assert tokens.get(ADDR) == ["old1", "old2"]
    stored = metadata_json(config)["devicetoken"]
    assert isinstance(stored, dict) and set(stored) == {"old1", "old2"}


def test_corrupt_metadata_json_counts_as_empty(config, tokens):
    (config.mailboxes_dir / ADDR / "metadata.json").write_text("{not json")
    assert tokens.get(ADDR) == []
    tokens.add(ADDR, "tok")
    assert tokens.get(ADDR) == ["tok"]


def test_addresses_without_mailbox_have_no_tokens(config, tokens):
    other = f"nobody123@{DOMAIN}"
    assert tokens.get(other) == []
    tokens.remove(other, "tok")
    with pytest.raises(FileNotFoundError):
        tokens.add(other, "tok")
    assert not (config.mailboxes_dir / other).exists()


# -- the dict protocol, in process -----------------------------------------------------


def test_set_and_lookup_devicetoken(server):
    assert transaction(server, ADDR, ("priv/guid00/devicetoken", "01234")) == "O\n"
    assert transaction(server, ADDR, ("priv/guid00/devicetoken", "56789")) == "O\n"
    assert server.handle_line(f"Lpriv/guid00/devicetoken\t{ADDR}", {}) == "O01234 56789\n"


def test_lookup_without_tokens_is_empty(server):
    assert server.handle_line(f"Lpriv/guid00/devicetoken\t{ADDR}", {}) == "O\n"


def test_messagenew_queues_one_persistent_item_per_token(server, config):
    transaction(server, ADDR, ("priv/g/devicetoken", "t1"), ("priv/g/devicetoken", "t2"))
    assert transaction(server, ADDR, ("priv/g/messagenew", "")) == "O\n"
    items = [p.read_text() for p in (config.mailboxes_dir / "pending_notifications").iterdir()]
    assert sorted(item.split("\n")[2] for item in items) == ["t1", "t2"]
    assert all(item.startswith(f"{ADDR}\n") for item in items)
    assert server.notifier.retry_queues[0].qsize() == 2


def test_messagenew_without_tokens_queues_nothing(server, config):
    assert transaction(server, ADDR, ("priv/g/messagenew", "")) == "O\n"
    assert list((config.mailboxes_dir / "pending_notifications").iterdir()) == []


def test_other_sets_fail(server):
    assert transaction(server, ADDR, ("priv/g/comment", "hi")) == "F\n"
    assert transaction(server, ADDR, ("shared/g/devicetoken", "x")) == "F\n"
    assert transaction(server, ADDR, ("priv/devicetoken", "x")) == "F\n"


def test_empty_token_is_not_stored(server, tokens):
    assert transaction(server, ADDR, ("priv/g/devicetoken", "")) == "O\n"
    assert tokens.get(ADDR) == []


@pytest.mark.parametrize("user", HOSTILE_USERS)
def test_hostile_users_never_touch_files(server, config, tmp_path, user):
    before = sorted(tmp_path.rglob("*"))
    escaped = user.replace("\0", "\x010").replace("\n", "\x01n")  # Dovecot's tab-escaping
    txns = {}
    server.handle_line(f"B1\t{escaped}", txns)
    server.handle_line("S1\tpriv/g/devicetoken\ttok", txns)
    assert server.handle_line("C1", txns) == "F\n"
    server.handle_line(f"B2\t{escaped}", txns)
    server.handle_line("S2\tpriv/g/messagenew\t", txns)
    assert server.handle_line("C2", txns) == "F\n"
    assert server.handle_line(f"Lpriv/g/devicetoken\t{escaped}", {}) == "N\n"
    assert sorted(tmp_path.rglob("*")) == before
    assert not Path("/tmp/evil").exists()


def test_no_irohrelay_announced_by_default(server):
    # We ship no iroh-relay, so unless one is configured clients keep their default.
    assert server.handle_line(f"L{VENDOR}irohrelay\t{ADDR}", {}) == "N\n"


@pytest.mark.parametrize("value, reply", [
    ("", "N\n"),
    ("https://iroh.example.net/", "Ohttps://iroh.example.net/\n"),
])
def test_irohrelay_setting(make_config, value, reply):
    config = make_config(iroh_relay=value)
    server = MetadataServer(config, DeviceTokens(config), notifier=None)
    assert server.handle_line(f"L{VENDOR}irohrelay\t{ADDR}", {}) == reply


def test_turn_credentials_from_the_secret(server, config):
    assert server.handle_line(f"L{VENDOR}turn\t{ADDR}", {}) == "N\n"  # no secret yet
    generate_secret(config.turn_secret_path)
    reply = server.handle_line(f"L{VENDOR}turn\t{ADDR}", {})
    host, port, username, password = reply[1:-1].split(":")
    assert (reply[0], host, port) == ("O", DOMAIN, "3478")
    assert abs(int(username) - time.time() - 5 * DAY) < 5
    secret = read_secret(config.turn_secret_path)
    assert password == make_credentials(secret, now=int(username) - 5 * DAY)[1]


def test_turn_host_of_an_ipv4_relay_is_bracketed_as_upstream(make_config, tmp_path):
    config = make_config("192.0.2.7")
    generate_secret(tmp_path / "turn-secret")
    server = MetadataServer(config, DeviceTokens(config), notifier=None)
    reply = server.handle_line("L" + VENDOR + "turn\tuser@[192.0.2.7]", {})
    assert reply.startswith("O[192.0.2.7]:3478:")


def test_maxsmtprecipients(server):
    assert server.handle_line(f"L{VENDOR}maxsmtprecipients\t{ADDR}", {}) == "O1000\n"


def test_appversions_is_the_packaged_json_on_one_line(server):
    reply = server.handle_line(f"L{VENDOR}appversions\t{ADDR}", {})
    assert reply.startswith("O") and reply.count("\n") == 1
    packaged = Path(REPO, "chatmaild", "defaults", "appversions.json").read_text()
    assert json.loads(reply[1:]) == json.loads(packaged)


def test_packaged_appversions_has_the_structure_clients_parse():
    data = json.loads(Path(REPO, "chatmaild", "defaults", "appversions.json").read_text())
    assert set(data) == {"clients"} and data["clients"]
    for client in data["clients"]:
        assert set(client) == {"clientId", "sources"} and client["sources"]
        for source in client["sources"]:
            assert set(source) == {"sourceId", "versionInteger", "versionString", "downloadUrl"}
            assert type(source["versionInteger"]) is int and 0 <= source["versionInteger"] < 2**32
            assert source["downloadUrl"].startswith(
                ("https://github.com/deltachat/", "https://download.delta.chat/"))


@pytest.mark.parametrize("key", [
    f"{VENDOR}unknown",
    "shared/0123/vendor/vendor.dovecot/pvt/server/vendor/other/turn",
    "shared/0123/comment",
    "priv/0123/chatmail",
    "priv/0123/vendor/deltachat/devicetoken",
    "devicetoken",
    "",
])
def test_everything_else_is_not_found(server, key):
    assert server.handle_line(f"L{key}\t{ADDR}", {}) == "N\n"


def test_iterate_lists_nothing(server):
    assert server.handle_line(f"I9\t0\tpriv/5cbe/\t{ADDR}", {}) == "\n"


# -- the daemon ------------------------------------------------------------------------


def connectable(socket_path):
    def ready():
        with socket.socket(socket.AF_UNIX) as sock:
            try:
                sock.connect(str(socket_path))
            except OSError:
                return False
            return True
    return ready


@pytest.fixture
def daemon_setup(make_config, push_server, tmp_path):
    config = make_config(notification_url=push_server.url)
    make_mailbox(config)
    return config, tmp_path / "metadata.socket"


@pytest.fixture
def start_metadata(start_daemon, daemon_setup):
    config, socket_path = daemon_setup

    def start():
        return start_daemon("metadata", socket_path, config.inipath,
                            ready=connectable(socket_path))

    return start


def pending_items(config):
    return sorted((config.mailboxes_dir / "pending_notifications").iterdir())


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def dovecot_session(client):
    client.send("H3\t2\t0\t\tmetadata")  # Dovecot's hello, no reply


def set_token(client, token, tx="1"):
    client.send(f"B{tx}\t{ADDR}")
    client.send(f"S{tx}\tpriv/guid00/devicetoken\t{token}")
    return client.request(f"C{tx}")


def new_message(client, tx="2"):
    # what push_notification.lua's metadata_set("/private/messagenew", "") becomes
    client.send(f"B{tx}\t{ADDR}")
    client.send(f"S{tx}\tpriv/guid00/messagenew\t")
    return client.request(f"C{tx}")


def test_daemon_stores_tokens_answers_lookups_and_pushes(
        start_metadata, daemon_setup, dict_client, push_server):
    config, socket_path = daemon_setup
    generate_secret(config.turn_secret_path)
    daemon = start_metadata()
    client = dict_client(socket_path)
    dovecot_session(client)
    assert set_token(client, "tok-a") == "O"
    assert set_token(client, "tok-b", tx="3") == "O"
    assert client.request(f"Lpriv/guid00/devicetoken\t{ADDR}") == "Otok-a tok-b"
    assert client.request(f"L{VENDOR}maxsmtprecipients\t{ADDR}") == "O1000"
    assert client.request(f"L{VENDOR}irohrelay\t{ADDR}") == "N"
    assert client.request(f"L{VENDOR}turn\t{ADDR}").startswith(f"O{DOMAIN}:3478:")
    assert json.loads(client.request(f"L{VENDOR}appversions\t{ADDR}")[1:])["clients"]
    assert client.request(f"Lshared/0123/comment\t{ADDR}") == "N"
    assert new_message(client) == "O"
    push_server.wait_for_requests(2)
    assert sorted(push_server.tokens(200)) == ["tok-a", "tok-b"]
    wait_until(lambda: pending_items(config) == [])
    assert "chatmail-metadata serving" in daemon.stderr


def test_queue_survives_a_daemon_crash(start_metadata, daemon_setup, dict_client, push_server):
    config, socket_path = daemon_setup
    push_server.answer(default=500)
    daemon = start_metadata()
    client = dict_client(socket_path)
    assert set_token(client, "tok") == "O"
    assert new_message(client) == "O"
    push_server.wait_for_requests(1)
    # refused; the next try would come 8 s later, but the daemon dies first
    wait_until(lambda: "Notification request failed: HTTP status 500" in daemon.stderr)
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    assert len(pending_items(config)) == 1

    push_server.answer(default=200)
    start_metadata()  # re-reads the queue and tries again at once
    requests = push_server.wait_for_requests(2)
    assert [(body, status) for _, body, status, _ in requests] == [("tok", 500), ("tok", 200)]
    wait_until(lambda: pending_items(config) == [])
    time.sleep(0.3)
    assert len(push_server.received) == 2  # delivered once


def test_gone_token_is_removed_from_metadata(
        start_metadata, daemon_setup, dict_client, push_server):
    config, socket_path = daemon_setup
    push_server.answer_token("dead", 410)
    start_metadata()
    client = dict_client(socket_path)
    assert set_token(client, "dead") == "O"
    assert set_token(client, "alive", tx="3") == "O"
    assert new_message(client) == "O"
    push_server.wait_for_requests(2)
    wait_until(lambda: pending_items(config) == [])
    assert client.request(f"Lpriv/guid00/devicetoken\t{ADDR}") == "Oalive"
    assert list(metadata_json(config)["devicetoken"]) == ["alive"]
    time.sleep(0.2)
    assert sorted(push_server.tokens()) == ["alive", "dead"]  # the 410 is not retried


def test_daemon_refuses_to_start_without_mailboxes_dir(make_ini, tmp_path):
    inipath = make_ini()
    socket_path = tmp_path / "metadata.socket"
    result = run_metadata(socket_path, inipath)
    assert result.returncode == 1
    assert "mailboxes_dir" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not socket_path.exists()


def test_daemon_usage_and_config_errors(tmp_path):
    result = run_metadata()
    assert result.returncode == 2 and "usage: chatmail-metadata SOCKET INI" in result.stderr
    result = run_metadata(tmp_path / "s", tmp_path / "missing.ini")
    assert result.returncode == 1 and "missing.ini" in result.stderr


def test_make_metadata_server_creates_the_queue_dir(config):
    make_metadata_server(config)
    queue_dir = config.mailboxes_dir / "pending_notifications"
    assert queue_dir.is_dir() and queue_dir.stat().st_mode & 0o777 == 0o700


def run_metadata(*args):
    return subprocess.run(
        [sys.executable, "-m", "chatmaild.metadata", *map(str, args)],
        capture_output=True, text=True, timeout=30,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
