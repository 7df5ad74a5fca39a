"""doveauth behind the real Dovecot: its dict passdb/userdb with upstream's auth.conf,
driven with `doveadm auth test` (needs dovecot-core and root, as the daemon does)."""

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from chatmaild.config import read_config

pytestmark = pytest.mark.skipif(
    not shutil.which("dovecot") or not shutil.which("doveadm") or os.geteuid() != 0,
    reason="needs dovecot-core and root",
)

DOMAIN = "chat.example.org"
PERMISSIVE = {"max_load_1m": "99999", "min_available_memory": "0", "min_free_disk_space": "0"}

# The auth.conf of spec/relay.md §4.3, with the socket moved.
AUTH_CONF = """\
uri = proxy:{socket}:auth
iterate_disable = no
iterate_prefix = userdb/
default_pass_scheme = plain
password_key = passdb/%Ew"%Eu
user_key = userdb/%Eu
"""

# Only what authentication needs: no protocols, hence no listening ports.
DOVECOT_CONF = """\
base_dir = {dir}/run
state_dir = {dir}/state
instance_name = chatmail-test-{name}
log_path = {dir}/dovecot.log
protocols = none
ssl = no
auth_mechanisms = plain
disable_plaintext_auth = no
auth_failure_delay = 0
auth_username_chars = abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ01234567890.-_@[]
passdb {{
  driver = dict
  args = {dir}/auth.conf
}}
userdb {{
  driver = dict
  args = {dir}/auth.conf
}}
mail_location = maildir:{dir}/mail/%u
# As on a relay (spec/relay.md §4.2): no login penalty, which would slow wrong passwords.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"""


@pytest.fixture
def dovecot_dir():
    # Short: Dovecot's and our unix socket paths must stay below 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="dvt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def relay(dovecot_dir, make_ini, start_daemon):
    """doveauth and a Dovecot that asks it; yields (config, doveauth daemon, conf path)."""
    ini = make_ini(**PERMISSIVE)
    config = read_config(ini)
    config.mailboxes_dir.mkdir(parents=True)
    socket_path = dovecot_dir / "doveauth.socket"
    doveauth = start_daemon("doveauth", socket_path, ini, ready=socket_path.exists)
    (dovecot_dir / "auth.conf").write_text(AUTH_CONF.format(socket=socket_path))
    conf = dovecot_dir / "dovecot.conf"
    conf.write_text(DOVECOT_CONF.format(dir=dovecot_dir, name=dovecot_dir.name))
    dovecot = subprocess.Popen(
        ["dovecot", "-F", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_for_path(dovecot_dir / "run" / "auth-client", dovecot)
        yield config, doveauth, conf
    finally:
        dovecot.terminate()
        dovecot.wait(10)


def wait_for_path(path, proc, timeout=10):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"dovecot did not start: {proc.stderr.read()!r}")
        time.sleep(0.05)


def doveadm(conf, *args):
    return subprocess.run(
        ["doveadm", "-c", str(conf), *args], capture_output=True, text=True, timeout=20
    )


def auth_test(conf, user, password):
    """True if Dovecot authenticates `user` with `password` ('doveadm auth test')."""
    result = doveadm(conf, "auth", "test", user, password)
    assert result.returncode in (0, 77), result
    return result.returncode == 0


def test_real_dovecot_creates_then_authenticates(relay):
    config, doveauth, conf = relay
    addr = f"abcdefghi@{DOMAIN}"
    password = "generated\"pass\\word'x12"
    assert auth_test(conf, addr, password)  # first login creates the account
    password_path = config.mailboxes_dir / addr / "password"
    stored = password_path.read_text()
    assert stored.startswith("{SHA512-CRYPT}$6$")

    assert not auth_test(conf, addr, "wrong-password-1")
    assert not auth_test(conf, addr, password + "x")
    assert auth_test(conf, addr, password)
    assert password_path.read_text() == stored
    assert doveauth.stderr.count(f"Created address: {addr}\n") == 1


def test_real_dovecot_refuses_invalid_new_accounts(relay):
    config, doveauth, conf = relay
    for user, password in [
        (f"short@{DOMAIN}", "long-enough-password"),
        (f"abcdefghij@{DOMAIN}", "long-enough-password"),
        (f"abcdefghi@{DOMAIN}", "short"),
        ("abcdefghi@other.org", "long-enough-password"),
    ]:
        assert not auth_test(conf, user, password), user
    assert list(config.mailboxes_dir.iterdir()) == []
    assert "Created address" not in doveauth.stderr


def test_real_dovecot_iterates_users(relay):
    _, _, conf = relay
    addrs = [f"iterate{i:02d}@{DOMAIN}" for i in range(3)]
    for addr in addrs:
        assert auth_test(conf, addr, "long-enough-password")
    result = doveadm(conf, "user", "-u", "*")
    assert sorted(result.stdout.split()) == addrs


def test_real_dovecot_lowercases_login_names(relay):
    """Dovecot's default auth_username_format %Lu: doveauth never sees upper case from it,
    so 'ABCDEFGHI@...' logs in to (and first creates) 'abcdefghi@...'."""
    config, doveauth, conf = relay
    assert auth_test(conf, f"ABCDEFGHI@{DOMAIN}", "long-enough-password")
    assert auth_test(conf, f"abcdefghi@{DOMAIN}", "long-enough-password")
    assert [path.name for path in config.mailboxes_dir.iterdir()] == [f"abcdefghi@{DOMAIN}"]
