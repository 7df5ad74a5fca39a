"""auth.lua, Dovecot 2.4's passdb/userdb, under each Lua a Dovecot may be built with:
5.4 (Debian 13) and 5.3 (Alpine's Dovecot). The real LuaSocket
and lua-cjson of that Lua, the real doveauth daemon; what stands in for Dovecot is only
its calling convention (the request table and the result constants)."""

import subprocess
import sys
import time

import pytest

from chatmaild.admin.platform import load_platform
from chatmaild.admin.render import render_component
from tests.conftest import REPO, stop_process

SOCKET_IN_SCRIPT = "/run/doveauth/doveauth.socket"
PERMISSIVE = {"max_load_1m": "99999", "min_available_memory": "0", "min_free_disk_space": "0"}
# Characters the dict protocol and the passdb key escape: " \ ' tab.
PASSWORD = "Pa\"ss\\wo'rd\t-42x"

# Dovecot's side: the constants auth.lua returns, and one call per line of output.
HARNESS = """
dovecot = { auth = {
  PASSDB_RESULT_OK = "PASSDB_OK", PASSDB_RESULT_USER_UNKNOWN = "PASSDB_UNKNOWN",
  PASSDB_RESULT_INTERNAL_FAILURE = "PASSDB_FAILURE",
  USERDB_RESULT_OK = "USERDB_OK", USERDB_RESULT_USER_UNKNOWN = "USERDB_UNKNOWN",
  USERDB_RESULT_INTERNAL_FAILURE = "USERDB_FAILURE" } }
dofile(arg[1])
local what, user, password = arg[2], arg[3], arg[4]
local function field(value, name)
  if type(value) == "table" then return tostring(value[name]) end
  return tostring(value)
end
if what == "passdb" then
  local result, fields = auth_passdb_lookup({ user = user, password = password })
  print(result, field(fields, "password"))
elseif what == "userdb" then
  local result, fields = auth_userdb_lookup({ user = user })
  print(result, field(fields, "uid"), field(fields, "gid"), field(fields, "home"))
else
  for _, name in ipairs(auth_userdb_iterate()) do print(name) end
end
"""


@pytest.fixture(params=["lua5.3", "lua5.4"])
def lua(request):
    return request.param


@pytest.fixture
def doveauth(make_config, tmp_path):
    """doveauth serving on a socket of its own, as its unit starts it."""
    config = make_config(**PERMISSIVE)
    socket_path = tmp_path / "doveauth.socket"
    proc = subprocess.Popen([sys.executable, "-m", "chatmaild.doveauth", str(socket_path),
                             str(config.inipath)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while not socket_path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "doveauth did not start"
        time.sleep(0.02)
    yield config, socket_path
    stop_process(proc)


def auth_lua(tmp_path, socket_path, relay_config):
    """auth.lua as rendered for Dovecot 2.4, pointed at `socket_path`."""
    files = {item.path: item for item in
             render_component("dovecot", relay_config, load_platform("debian13"))}
    text = files["/etc/dovecot/chatmail/auth.lua"].content
    assert f'"{SOCKET_IN_SCRIPT}"' in text
    script = tmp_path / "auth.lua"
    script.write_text(text.replace(SOCKET_IN_SCRIPT, str(socket_path)))
    return script


def run(lua, script, *args):
    harness = script.parent / "harness.lua"
    harness.write_text(HARNESS)
    result = subprocess.run([lua, str(harness), str(script), *args], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return [line.split("\t") for line in result.stdout.splitlines()]


def test_first_login_creates_the_account_and_returns_its_hash(lua, doveauth, tmp_path):
    config, socket_path = doveauth
    script = auth_lua(tmp_path, socket_path, config)
    addr = f"abcdefghi@{config.mail_domain}"
    [[result, stored]] = run(lua, script, "passdb", addr, PASSWORD)
    assert result == "PASSDB_OK" and stored.startswith("{SHA512-CRYPT}$6$")
    assert (config.mailboxes_dir / addr / "password").read_text() == stored
    [[result, uid, gid, home]] = run(lua, script, "userdb", addr)
    assert (result, uid, gid) == ("USERDB_OK", "vmail", "vmail")
    assert home == str(config.mailboxes_dir / addr)
    assert [addr] in run(lua, script, "iterate")


def test_unknown_user_and_refused_name(lua, doveauth, tmp_path):
    config, socket_path = doveauth
    script = auth_lua(tmp_path, socket_path, config)
    assert run(lua, script, "userdb", f"nobodyhere@{config.mail_domain}")[0][0] == \
        "USERDB_UNKNOWN"
    # doveauth refuses to create this name: no account, no hash
    assert run(lua, script, "passdb", f"../x@{config.mail_domain}", PASSWORD)[0][0] == \
        "PASSDB_UNKNOWN"
    assert not (config.mailboxes_dir / f"../x@{config.mail_domain}").exists()


def test_doveauth_down_is_an_internal_failure(lua, make_config, tmp_path):
    config = make_config(**PERMISSIVE)
    script = auth_lua(tmp_path, tmp_path / "missing.socket", config)
    [[result, message]] = run(lua, script, "passdb", f"abcdefghi@{config.mail_domain}",
                              PASSWORD)
    assert result == "PASSDB_FAILURE" and "missing.socket" in message
