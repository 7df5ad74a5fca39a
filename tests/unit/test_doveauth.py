"""doveauth: rules for new accounts, lookups, hostile names, concurrency, and the daemon
spoken to over its unix socket exactly as Dovecot does."""

import json
import os
import shutil
import sqlite3
import tempfile
import threading
from pathlib import Path

import pytest

from chatmaild.config import read_config
from chatmaild.dictproxy import tab_escape
from chatmaild.doveauth import (
    AuthDictServer,
    encrypt_password,
    is_allowed_to_create,
    split_and_unescape,
)
from chatmaild.mailbox import Mailbox
from chatmaild.sha512crypt import verify

DOMAIN = "chat.example.org"
ADDR = f"abcdefghi@{DOMAIN}"
PASSWORD = "Zequ0Aimuchoodaechik"
# Generous limits: a busy test machine must not block account creation by accident.
PERMISSIVE = {"max_load_1m": "99999", "min_available_memory": "0", "min_free_disk_space": "0"}

HOSTILE_NAMES = [
    "", "@" + DOMAIN, "abcdefghi", DOMAIN, f"abc@def@{DOMAIN}",
    f"../../etc/x@{DOMAIN}", f"abc/defgh@{DOMAIN}", f"/abs/path@{DOMAIN}", f"..@{DOMAIN}",
    f".@{DOMAIN}", f"abcdefgh\\@{DOMAIN}", f"abcdefgh\x00@{DOMAIN}", f"abcdefgh\n@{DOMAIN}",
    f"abcdefgh\t@{DOMAIN}", f"abcdefgh\x01@{DOMAIN}", f"abcdefgh\x7f@{DOMAIN}",
    "a" * 300 + "@" + DOMAIN, "b" * 5000 + "@" + DOMAIN, f"ABCDEFGHI@{DOMAIN}",
    f"Abcdefghi@{DOMAIN}", "abcdefghi@other.org", f"abcdefghi@{DOMAIN}.evil.com",
    f"abcdefghi@{DOMAIN.upper()}", f"abcdefghi@{DOMAIN}/../x", f"abcdefg%n@{DOMAIN}",
    f"abcdefgh*@{DOMAIN}", f"abcdefgh+@{DOMAIN}", f"abcdefgh @{DOMAIN}", f" abcdefgh@{DOMAIN}",
    f"abcdefghé@{DOMAIN}", f'abcdefgh"@{DOMAIN}', f"abcdefgh'@{DOMAIN}", f"short@{DOMAIN}",
    f"abcdefghij@{DOMAIN}",
]


@pytest.fixture
def auth_config(make_config):
    return make_config(**PERMISSIVE)


@pytest.fixture
def nocreate_file(tmp_path):
    return tmp_path / "chatmail-nocreate"


@pytest.fixture
def server(auth_config, nocreate_file):
    return AuthDictServer(auth_config, nocreate_file=str(nocreate_file))


def escape_e(text):
    """Dovecot's %E: backslash before backslash and both quotes."""
    return "".join("\\" + char if char in "\\\"'" else char for char in text)


def passdb_request(addr, password):
    """The lookup line Dovecot sends for `password_key = passdb/%Ew"%Eu`."""
    key = f'shared/passdb/{escape_e(password)}"{escape_e(addr)}'
    return f"L{tab_escape(key)}\t{tab_escape(addr)}"


def userdb_request(addr):
    return f"L{tab_escape('shared/userdb/' + escape_e(addr))}\t{tab_escape(addr)}"


def snapshot(root):
    """Every path below `root` with its mtime and size, to prove nothing changed."""
    return {
        str(path): (path.lstat().st_mtime_ns, path.lstat().st_size)
        for path in Path(root).rglob("*")
    }


# -- %E splitting ---------------------------------------------------------------------


@pytest.mark.parametrize("text, parts", [
    ("", [""]),
    ("plain", ["plain"]),
    ('pw"user@x', ["pw", "user@x"]),
    ('p\\"w"user', ['p"w', "user"]),
    ("p\\\\w\\'", ["p\\w'"]),
    ('a"b"c', ["a", "b", "c"]),
    ('"', ["", ""]),
    ("\\x", ["x"]),
])
def test_split_and_unescape(text, parts):
    assert split_and_unescape(text) == parts


def test_split_and_unescape_roundtrip_of_generated_passwords():
    for password in ['laksjd\\sjdlk"12j\'3l1/k2j3', '\\\\""\'\'', "x" * 100]:
        assert split_and_unescape(escape_e(password) + '"' + escape_e(ADDR)) == [password, ADDR]


def test_split_and_unescape_refuses_dangling_backslash():
    with pytest.raises(ValueError):
        split_and_unescape('pw"user\\')


# -- creation rules ---------------------------------------------------------------------


def test_allowed_to_create_with_defaults(auth_config, nocreate_file):
    assert is_allowed_to_create(auth_config, ADDR, PASSWORD, str(nocreate_file))


def test_nocreate_file_blocks_creation(auth_config, nocreate_file, caplog):
    nocreate_file.write_text("")
    assert not is_allowed_to_create(auth_config, ADDR, PASSWORD, str(nocreate_file))
    assert "blocked account creation because" in caplog.text


def test_password_min_length(make_config, nocreate_file):
    config = make_config(password_min_length="12")
    assert is_allowed_to_create(config, ADDR, "x" * 12, str(nocreate_file))
    assert not is_allowed_to_create(config, ADDR, "x" * 11, str(nocreate_file))
    assert not is_allowed_to_create(config, ADDR, "", str(nocreate_file))


def test_exactly_one_at(auth_config, nocreate_file):
    for addr in ("abcdefghi", f"abcdefghi@{DOMAIN}@{DOMAIN}", f"abcd@efgh@{DOMAIN}"):
        assert not is_allowed_to_create(auth_config, addr, PASSWORD, str(nocreate_file))


def test_localpart_length_bounds(make_config, nocreate_file):
    config = make_config(username_min_length="6", username_max_length="10")
    allowed = [n for n in range(1, 13)
               if is_allowed_to_create(config, "a" * n + "@" + DOMAIN, PASSWORD,
                                       str(nocreate_file))]
    assert allowed == [6, 7, 8, 9, 10]


def test_default_localpart_length_is_exactly_nine(auth_config, nocreate_file):
    assert is_allowed_to_create(auth_config, f"{'a' * 9}@{DOMAIN}", PASSWORD, str(nocreate_file))
    assert not is_allowed_to_create(auth_config, f"{'a' * 8}@{DOMAIN}", PASSWORD,
                                    str(nocreate_file))
    assert not is_allowed_to_create(auth_config, f"{'a' * 10}@{DOMAIN}", PASSWORD,
                                    str(nocreate_file))


def test_localpart_characters(make_config, nocreate_file, caplog):
    config = make_config(username_min_length="3", username_max_length="20")

    def allowed(localpart):
        return is_allowed_to_create(config, f"{localpart}@{DOMAIN}", PASSWORD,
                                    str(nocreate_file))

    for good in ("abc123", "a.b-c_d", "..--__", "0123456789"):
        assert allowed(good), good
    for bad in ("Abc123", "ABCDEFG", "a b cde", "abc+def", "abc!def", "abc/def", "abc\\def",
                "abcdef\n", "abc%def", "abc*def", "abcdeé", "abc\x00def", "abc\"def"):
        caplog.clear()
        assert not allowed(bad), bad
        assert "contains invalid characters" in caplog.text


def test_encrypt_password():
    hashed = encrypt_password(PASSWORD)
    assert hashed.startswith("{SHA512-CRYPT}$6$")
    assert verify(PASSWORD, hashed[len("{SHA512-CRYPT}"):])
    assert encrypt_password(PASSWORD) != hashed  # fresh salt each time


# -- lookups ------------------------------------------------------------------------------


def test_first_login_creates_account(server, auth_config, capsys):
    fields = server.lookup_passdb(ADDR, PASSWORD)
    home = auth_config.mailboxes_dir / ADDR
    assert fields == {
        "addr": ADDR, "home": str(home), "uid": "vmail", "gid": "vmail",
        "password": (home / "password").read_text(),
    }
    assert verify(PASSWORD, fields["password"].removeprefix("{SHA512-CRYPT}"))
    assert (home / "enforceE2EEincoming").exists()
    assert home.stat().st_mode & 0o777 == 0o700
    assert (home / "password").stat().st_mode & 0o777 == 0o600
    assert server.lookup_userdb(ADDR) == fields
    assert server.lookup_passdb(ADDR, PASSWORD) == fields
    assert capsys.readouterr().err.count(f"Created address: {ADDR}\n") == 1


def test_wrong_password_never_changes_the_stored_hash(server, auth_config, capsys):
    fields = server.lookup_passdb(ADDR, PASSWORD)
    password_path = auth_config.mailboxes_dir / ADDR / "password"
    os.utime(password_path, (86400, 86400))
    before = snapshot(auth_config.mailboxes_dir)
    for wrong in ("kajdslqwe", "", "x" * 600, "nul\x00", PASSWORD.upper()):
        # The stored hash is returned; Dovecot's comparison rejects the wrong password.
        assert server.lookup_passdb(ADDR, wrong) == fields
    assert snapshot(auth_config.mailboxes_dir) == before
    assert capsys.readouterr().err.count("Created address") == 1


def test_userdb_of_unknown_or_broken_accounts(server, auth_config):
    assert server.lookup_userdb(ADDR) is None
    home = auth_config.mailboxes_dir / ADDR
    home.mkdir()
    assert server.lookup_userdb(ADDR) is None
    (home / "password").write_text("")
    assert server.lookup_userdb(ADDR) is None


def test_login_recreates_account_whose_password_file_is_missing_or_empty(server, auth_config):
    home = auth_config.mailboxes_dir / ADDR
    (home / "cur").mkdir(parents=True)
    (home / "password").write_text("")
    fields = server.lookup_passdb(ADDR, PASSWORD)
    assert fields["password"].startswith("{SHA512-CRYPT}$6$")
    assert (home / "cur").is_dir()


def test_existing_uppercase_account_still_logs_in(server, auth_config):
    """Accounts created before the lower-case rule (or migrated) keep working."""
    addr = f"OldUser12@{DOMAIN}"
    Mailbox(auth_config, addr).create(encrypt_password(PASSWORD))
    assert server.lookup_passdb(addr, PASSWORD)["addr"] == addr
    assert server.lookup_userdb(addr)["addr"] == addr


def test_nocreate_file_blocks_creation_but_not_logins(server, nocreate_file, capsys):
    server.lookup_passdb(ADDR, PASSWORD)
    nocreate_file.write_text("")
    other = f"zyxwvutsr@{DOMAIN}"
    assert server.lookup_passdb(other, PASSWORD) is None
    assert server.lookup_userdb(other) is None
    assert server.lookup_passdb(ADDR, PASSWORD)
    assert capsys.readouterr().err.count("Created address") == 1


def test_insufficient_resources_block_creation_not_logins(make_config, nocreate_file, caplog):
    config = make_config(**PERMISSIVE)
    AuthDictServer(config, str(nocreate_file)).lookup_passdb(ADDR, PASSWORD)
    overloaded = make_config(**(PERMISSIVE | {"max_load_1m": "-1"}))
    server = AuthDictServer(overloaded, str(nocreate_file))
    other = f"zyxwvutsr@{DOMAIN}"
    assert server.lookup_passdb(other, PASSWORD) is None
    assert "registration rejected: load avg" in caplog.text
    assert not (overloaded.mailboxes_dir / other).exists()
    assert server.lookup_passdb(ADDR, PASSWORD)


@pytest.mark.parametrize("password", ["short", "nul\x00in the password", "p" * 512])
def test_unusable_passwords_create_nothing(server, auth_config, password):
    before = snapshot(auth_config.mailboxes_dir.parent)
    assert server.lookup_passdb(ADDR, password) is None
    assert snapshot(auth_config.mailboxes_dir.parent) == before


def test_hostile_names_are_refused_and_touch_nothing(server, auth_config, tmp_path, capsys):
    # An existing account next to the hostile names must stay as it is, too.
    server.lookup_passdb(f"zyxwvutsr@{DOMAIN}", PASSWORD)
    capsys.readouterr()
    before = snapshot(tmp_path)
    for name in HOSTILE_NAMES:
        assert server.lookup_passdb(name, PASSWORD) is None, repr(name)
        assert server.lookup_userdb(name) is None, repr(name)
        assert server.lookup(f"shared/passdb/{escape_e(PASSWORD)}\"{escape_e(name)}", "") is None
    assert snapshot(tmp_path) == before
    assert not Path("/abs").exists()
    assert "Created address" not in capsys.readouterr().err


def test_iterate_lists_addresses(server, auth_config):
    addrs = [f"asdf1234{i}@{DOMAIN}" for i in range(5)]
    for addr in addrs:
        server.lookup_passdb(addr, PASSWORD)
    (auth_config.mailboxes_dir / "pending_notifications").mkdir()
    assert sorted(server.iter_userdb()) == addrs
    assert sorted(server.iterate("shared/userdb/", "")) == [
        (f"shared/userdb/{addr}", "") for addr in addrs]
    assert list(server.iterate("shared/other/", "")) == []


def test_iterate_without_mailboxes_dir(make_config, nocreate_file):
    config = make_config(**PERMISSIVE)
    config.mailboxes_dir.rmdir()
    assert AuthDictServer(config, str(nocreate_file)).iter_userdb() == []


# -- protocol lines -----------------------------------------------------------------------


def test_passdb_request_with_quotes_and_backslashes(server, auth_config):
    password = "laksjdlaksjdlak\\sjdlk\"12j'3l1/k2j3123"
    reply = server.handle_line(passdb_request(ADDR, password), {})
    assert reply.startswith("O") and reply.endswith("\n")
    fields = json.loads(reply[1:])
    assert fields["home"] == str(auth_config.mailboxes_dir / ADDR)
    assert fields["uid"] == fields["gid"] == "vmail"
    assert verify(password, fields["password"].removeprefix("{SHA512-CRYPT}"))


def test_password_with_tab_and_newline_arrives_tab_escaped(server):
    password = "tab\tnew\nline\x01x"
    fields = json.loads(server.handle_line(passdb_request(ADDR, password), {})[1:])
    assert verify(password, fields["password"].removeprefix("{SHA512-CRYPT}"))


def test_protocol_replies(server):
    txns = {}
    assert server.handle_line("H3\t2\t0\t\tauth", txns) == ""
    assert server.handle_line(userdb_request(ADDR), txns) == "N\n"
    created = server.handle_line(passdb_request(ADDR, PASSWORD), txns)
    assert server.handle_line(userdb_request(ADDR), txns) == created
    assert server.handle_line(f"Lshared/userdb/{ADDR}", txns) == created  # no user field
    assert server.handle_line("I0\t0\tshared/userdb/", txns) == f"Oshared/userdb/{ADDR}\t\n\n"


@pytest.mark.parametrize("key", [
    "shared/passdb/pw\\", "shared/passdb/only-password", f'shared/passdb/a"b"{ADDR}',
    f'shared/userdb/x"{ADDR}', "shared/userdb/\\", "shared/other/x", "priv/userdb/x",
    "shared", "", "shared/passdb/", "shared/userdb/",
])
def test_malformed_or_unknown_keys_get_not_found(server, auth_config, key):
    assert server.handle_line(f"L{key}\t{ADDR}", {}) == "N\n"
    assert list(auth_config.mailboxes_dir.iterdir()) == []


# -- concurrency (threads) ----------------------------------------------------------------


def run_concurrently(count, target):
    barrier = threading.Barrier(count)
    results, errors = [None] * count, []

    def run(index):
        try:
            barrier.wait(5)
            results[index] = target(index)
        except Exception as exc:  # collected, re-raised by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    return results


def test_concurrent_first_logins_create_once(server, capsys):
    results = run_concurrently(12, lambda i: server.lookup_passdb(ADDR, PASSWORD))
    assert len({json.dumps(result) for result in results}) == 1
    assert results[0]["password"].startswith("{SHA512-CRYPT}")
    assert capsys.readouterr().err.count("Created address") == 1


def test_concurrent_first_logins_with_different_passwords_keep_one(server):
    results = run_concurrently(8, lambda i: server.lookup_passdb(ADDR, f"{PASSWORD}{i}"))
    hashes = {result["password"] for result in results}
    assert len(hashes) == 1
    stored = hashes.pop().removeprefix("{SHA512-CRYPT}")
    assert sum(verify(f"{PASSWORD}{i}", stored) for i in range(8)) == 1


def test_concurrent_creation_of_many_accounts(server, auth_config, capsys):
    addrs = [f"conc{i:05d}@{DOMAIN}" for i in range(40)]
    results = run_concurrently(len(addrs), lambda i: server.lookup_passdb(addrs[i], PASSWORD))
    assert [result["addr"] for result in results] == addrs
    assert sorted(server.iter_userdb()) == addrs
    assert capsys.readouterr().err.count("Created address") == len(addrs)


# -- migration from the old sqlite passdb --------------------------------------------------


def make_passdb(path, rows, with_last_login=True):
    connection = sqlite3.connect(path)
    columns = "addr TEXT PRIMARY KEY, password TEXT" + (", last_login INTEGER"
                                                        if with_last_login else "")
    connection.execute(f"CREATE TABLE users ({columns})")
    marks = "?, ?, ?" if with_last_login else "?, ?"
    connection.executemany(f"INSERT INTO users VALUES ({marks})", rows)
    connection.commit()
    connection.close()


def test_migration_copies_accounts_and_renames_the_database(auth_config, caplog):
    from chatmaild.migrate_db import migrate_from_db_to_maildir

    caplog.set_level("INFO")
    hashed = encrypt_password("old-password")
    existing = f"existing1@{DOMAIN}"
    Mailbox(auth_config, existing).create(encrypt_password("newer-password"))
    rows = [(f"user{i:05d}@{DOMAIN}", hashed, i * 86400 + 123) for i in range(1, 30)]
    rows += [
        (f"nologin12@{DOMAIN}", hashed, None),
        (existing, hashed, 5 * 86400),
        (f"ci-abcdef@{DOMAIN}", hashed, 0),
        (f"ac_abcdef@{DOMAIN}", hashed, 0),
        (f"../../evil@{DOMAIN}", hashed, 0),
        ("someone12@other.org", hashed, 0),
        (f"emptypass@{DOMAIN}", "", 0),
    ]
    make_passdb(auth_config.passdb_path, rows)
    migrate_from_db_to_maildir(auth_config, progress_every=10)

    for addr, _, last_login in rows[:29]:
        mailbox = Mailbox(auth_config, addr)
        assert mailbox.read_password_hash() == hashed
        assert mailbox.last_login() == last_login // 86400 * 86400
        assert not mailbox.accepts_incoming_cleartext()
    assert Mailbox(auth_config, f"nologin12@{DOMAIN}").read_password_hash() == hashed
    # An account that exists in the new layout is newer than the database: kept.
    assert verify("newer-password", Mailbox(auth_config, existing).read_password_hash()[14:])
    names = {path.name for path in auth_config.mailboxes_dir.iterdir()}
    assert names == {row[0] for row in rows[:31]}
    assert not auth_config.passdb_path.exists()
    assert auth_config.passdb_path.with_name("passdb.sqlite.old").exists()
    assert "migration-progress" in caplog.text
    assert not list(auth_config.mailboxes_dir.parent.parent.glob("evil*"))

    # Runs once: a second start finds no database and changes nothing.
    before = snapshot(auth_config.mailboxes_dir)
    migrate_from_db_to_maildir(auth_config)
    assert snapshot(auth_config.mailboxes_dir) == before


def test_migration_of_database_without_last_login_and_with_wal(auth_config):
    from chatmaild.migrate_db import migrate_from_db_to_maildir

    hashed = encrypt_password("old-password")
    make_passdb(auth_config.passdb_path, [(ADDR, hashed)], with_last_login=False)
    wal = auth_config.passdb_path.with_name("passdb.sqlite-wal")
    wal.write_bytes(b"")
    migrate_from_db_to_maildir(auth_config)
    assert Mailbox(auth_config, ADDR).read_password_hash() == hashed
    assert not wal.exists()
    assert auth_config.passdb_path.with_name("passdb.sqlite.old-wal").exists()
    old = sqlite3.connect(auth_config.passdb_path.with_name("passdb.sqlite.old"))
    assert old.execute("SELECT addr FROM users").fetchall() == [(ADDR,)]
    old.close()


# -- the daemon over its unix socket -------------------------------------------------------


@pytest.fixture
def socket_dir():
    # Unix socket paths are limited to 108 bytes, too short for pytest's tmp_path.
    path = Path(tempfile.mkdtemp(prefix="doveauth-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def auth_ini(make_ini):
    return make_ini(**PERMISSIVE)


@pytest.fixture
def start_doveauth(start_daemon, socket_dir, auth_ini):
    def start(name="doveauth.socket"):
        socket_path = socket_dir / name
        return start_daemon("doveauth", socket_path, auth_ini, ready=socket_path.exists), \
            socket_path

    return start


def dovecot_connection(dict_client, socket_path):
    client = dict_client(socket_path)
    client.send("H3\t2\t0\t\tauth")
    return client


def test_daemon_creates_and_serves_accounts(start_doveauth, dict_client, auth_ini):
    daemon, socket_path = start_doveauth()
    client = dovecot_connection(dict_client, socket_path)
    assert client.request(userdb_request(ADDR)) == "N"
    password = 'gen"erated\\pass\'word'
    created = client.request(passdb_request(ADDR, password))
    fields = json.loads(created[1:])
    assert verify(password, fields["password"].removeprefix("{SHA512-CRYPT}"))
    assert fields["home"] == str(read_config(auth_ini).mailboxes_dir / ADDR)
    assert client.request(userdb_request(ADDR)) == created
    assert client.request(passdb_request(ADDR, "wrong-password-123")) == created
    client.send("I0\t0\tshared/userdb/")
    assert [client.readline(), client.readline()] == [f"Oshared/userdb/{ADDR}\t", ""]
    assert daemon.stderr.count(f"Created address: {ADDR}\n") == 1


def test_daemon_refuses_hostile_names(start_doveauth, dict_client, auth_ini, tmp_path):
    daemon, socket_path = start_doveauth()
    client = dovecot_connection(dict_client, socket_path)
    before = snapshot(tmp_path)
    for name in HOSTILE_NAMES:
        assert client.request(passdb_request(name, PASSWORD)) == "N", repr(name)
        assert client.request(userdb_request(name)) == "N", repr(name)
    assert client.request("Lshared/passdb/pw\\") == "N"
    assert snapshot(tmp_path) == before
    assert "Created address" not in daemon.stderr


def connect_many(dict_client, socket_paths, count):
    return [dovecot_connection(dict_client, socket_paths[i % len(socket_paths)])
            for i in range(count)]


def test_daemon_concurrent_connections_create_once(start_doveauth, dict_client):
    daemon, socket_path = start_doveauth()
    clients = connect_many(dict_client, [socket_path], 10)
    replies = run_concurrently(
        len(clients), lambda i: clients[i].request(passdb_request(ADDR, PASSWORD)))
    assert len(set(replies)) == 1 and replies[0].startswith("O{")
    assert daemon.stderr.count("Created address") == 1


def test_two_daemon_processes_create_once(start_doveauth, dict_client):
    first, first_socket = start_doveauth("a.socket")
    second, second_socket = start_doveauth("b.socket")
    clients = connect_many(dict_client, [first_socket, second_socket], 12)
    for round_ in range(3):
        addr = f"twoproc{round_:02d}@{DOMAIN}"
        replies = run_concurrently(
            len(clients), lambda i: clients[i].request(passdb_request(addr, PASSWORD)))
        assert len(set(replies)) == 1 and replies[0].startswith("O{")
    assert first.stderr.count("Created address") + second.stderr.count("Created address") == 3


def test_daemon_migrates_old_passdb_at_startup(start_doveauth, dict_client, auth_ini):
    config = read_config(auth_ini)
    hashed = encrypt_password("old-password")
    make_passdb(config.passdb_path, [(ADDR, hashed, 3 * 86400)])
    daemon, socket_path = start_doveauth()
    client = dovecot_connection(dict_client, socket_path)
    assert json.loads(client.request(userdb_request(ADDR))[1:])["password"] == hashed
    assert not config.passdb_path.exists()
    assert "Created address" not in daemon.stderr


def test_daemon_survives_a_broken_old_passdb(start_doveauth, dict_client, auth_ini):
    config = read_config(auth_ini)
    config.passdb_path.write_bytes(b"this is not sqlite" * 100)
    daemon, socket_path = start_doveauth()
    client = dovecot_connection(dict_client, socket_path)
    assert client.request(passdb_request(ADDR, PASSWORD)).startswith("O{")
    assert "migration of" in daemon.stderr
    assert config.passdb_path.exists()  # kept for the admin to look at


def test_main_usage_errors(capsys):
    from chatmaild.doveauth import main

    assert main([]) == 2
    assert main(["only-socket"]) == 2
    assert "usage: doveauth SOCKET INI" in capsys.readouterr().err
    assert main(["/tmp/x.socket", "/nonexistent/chatmail.ini"]) == 1
