"""The /new CGI, run as a CGI program is run: a process with CGI variables, output on stdout."""

import json
import os
import re
import shutil
import socket
import string
import struct
import subprocess
import sys
import time
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from chatmaild.newemail import create_dclogin_url, respond

try:
    from chatmaild.doveauth import is_allowed_to_create
except ImportError:  # built separately; the inline rules below still apply
    is_allowed_to_create = None

from ..conftest import REPO

PASSWORD_ALPHABET = set(string.ascii_letters + string.digits + string.punctuation)
# doveauth's rule for creating an account on first login (upstream VALID_LOCALPART_RE).
DOVEAUTH_LOCALPART_RE = re.compile(r"^[a-z0-9._-]+$")


def run_cgi(ini_path, method="GET", **extra):
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO),
        "GATEWAY_INTERFACE": "CGI/1.1",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "SCRIPT_NAME": "/new",
        "QUERY_STRING": "",
        "CHATMAIL_INI": str(ini_path),
    }
    if method is not None:
        env["REQUEST_METHOD"] = method
    env.update(extra)
    result = subprocess.run(
        [sys.executable, "-m", "chatmaild.newemail"], env=env, capture_output=True, timeout=60,
    )
    return result


def parse_cgi_output(stdout):
    """(headers dict, JSON body) of a CGI response; header lines end in LF or CRLF."""
    text = stdout.decode("utf-8").replace("\r\n", "\n")
    head, separator, body = text.partition("\n\n")
    assert separator, f"no blank line after the headers: {text!r}"
    headers = dict(line.split(": ", 1) for line in head.split("\n"))
    return headers, json.loads(body)


def new_account(ini_path, **extra):
    result = run_cgi(ini_path, **extra)
    assert result.returncode == 0, result.stderr.decode()
    headers, body = parse_cgi_output(result.stdout)
    assert headers["Content-Type"] == "application/json"
    assert "Status" not in headers  # 200
    return body


def assert_doveauth_accepts(config, account):
    """The checks doveauth applies before it creates an account on first login."""
    localpart, domain = account["email"].split("@")
    assert domain == config.mail_domain
    assert DOVEAUTH_LOCALPART_RE.match(localpart)
    assert config.username_min_length <= len(localpart) <= config.username_max_length
    assert len(account["password"]) >= config.password_min_length
    if is_allowed_to_create is not None:
        nocreate = config.inipath.parent / "no-such-nocreate-file"
        assert is_allowed_to_create(config, account["email"], account["password"], nocreate)


def parse_dclogin(url):
    """(email, query dict) of a dclogin: URL, decoded as clients decode it."""
    assert url.startswith("dclogin:")
    parts = urlsplit(url)
    assert parts.scheme == "dclogin"
    query = {key: values[0] for key, values in parse_qs(parts.query, strict_parsing=True).items()}
    return unquote(parts.path), query


def test_acme_domain(make_config):
    config = make_config("chat.example.org")
    account = new_account(config.inipath)
    assert set(account) == {"email", "password"}
    localpart = account["email"].split("@")[0]
    assert re.fullmatch(r"[a-z0-9]{9}", localpart)
    assert len(account["password"]) == config.password_min_length + 3 == 12
    assert set(account["password"]) <= PASSWORD_ALPHABET
    assert_doveauth_accepts(config, account)


def test_lengths_follow_the_config(make_config):
    config = make_config(username_min_length="12", username_max_length="12",
                         password_min_length="20")
    account = new_account(config.inipath)
    assert len(account["email"].split("@")[0]) == 12
    assert len(account["password"]) == 23
    assert_doveauth_accepts(config, account)


def test_self_signed_domain_gets_dclogin_url(make_config):
    config = make_config("_test.example.org")
    account = new_account(config.inipath)
    assert account["email"].endswith("@_test.example.org")
    assert_doveauth_accepts(config, account)
    email, query = parse_dclogin(account["dclogin_url"])
    assert email == account["email"]
    assert query == {"p": account["password"], "v": "1", "ic": "3"}
    assert account["dclogin_url"].endswith("&v=1&ic=3")


def test_ipv4_relay_names_its_hosts(make_config):
    config = make_config("192.0.2.7")
    account = new_account(config.inipath)
    assert re.fullmatch(r"[a-z0-9]{9}@\[192\.0\.2\.7\]", account["email"])
    assert_doveauth_accepts(config, account)
    url = account["dclogin_url"]
    assert url.startswith(f"dclogin:{account['email']}?p=")  # brackets stay literal
    assert url.endswith("&v=1&ih=192.0.2.7&sh=192.0.2.7&ic=3")
    email, query = parse_dclogin(url)
    assert email == account["email"]
    assert query == {"p": account["password"], "v": "1", "ih": "192.0.2.7",
                     "sh": "192.0.2.7", "ic": "3"}


def test_every_password_character_round_trips(make_config):
    config = make_config("_test.example.org")
    password = string.punctuation + " " + string.ascii_letters + string.digits
    url = create_dclogin_url(config, "abc@_test.example.org", password)
    assert parse_dclogin(url)[1]["p"] == password
    assert re.fullmatch(r"dclogin:abc@_test\.example\.org\?p=[A-Za-z0-9%_.~-]+&v=1&ic=3", url)


def test_accounts_are_random(make_config):
    config = make_config("_test.example.org")
    environ = {"REQUEST_METHOD": "POST", "CHATMAIL_INI": str(config.inipath)}
    accounts = [parse_cgi_output(respond(environ)[1])[1] for _ in range(300)]
    assert len({a["email"] for a in accounts}) == 300
    assert len({a["password"] for a in accounts}) == 300
    localpart_chars = set("".join(a["email"].split("@")[0] for a in accounts))
    assert localpart_chars == set(string.ascii_lowercase + string.digits)
    password_chars = set("".join(a["password"] for a in accounts))
    assert password_chars <= PASSWORD_ALPHABET
    # The characters auth.conf must escape do occur (why it uses %Ew/%Eu).
    assert {'"', "\\", "'"} <= password_chars
    for account in accounts:
        assert_doveauth_accepts(config, account)
        assert parse_dclogin(account["dclogin_url"])[1]["p"] == account["password"]


def test_post_and_no_method(make_config):
    config = make_config()
    assert "@chat.example.org" in new_account(config.inipath, method="POST")["email"]
    # An admin running the program by hand gets an account, too.
    assert "@chat.example.org" in new_account(config.inipath, method=None)["email"]


@pytest.mark.parametrize("method", ["PUT", "DELETE", "HEAD", "OPTIONS", "get"])
def test_other_methods_are_refused(make_config, method):
    config = make_config()
    result = run_cgi(config.inipath, method=method)
    headers, body = parse_cgi_output(result.stdout)
    assert headers["Status"] == "405 Method Not Allowed"
    assert headers["Allow"] == "GET, POST"
    assert body == {"error": "method not allowed"}


@pytest.mark.parametrize("content", [
    None,  # missing file
    "[params]\nmail_domain = chat.example.org\nusername_max_length = nine\n",
    "no section at all\n",
])
def test_broken_ini_gives_status_500(tmp_path, content):
    ini = tmp_path / "chatmail.ini"
    if content is not None:
        ini.write_text(content)
    result = run_cgi(ini)
    assert result.returncode == 1
    headers, body = parse_cgi_output(result.stdout)
    assert headers["Status"] == "500 Internal Server Error"
    assert headers["Content-Type"] == "application/json"
    assert set(body) == {"error"}
    assert str(tmp_path) not in result.stdout.decode()  # no details for the client
    assert "Traceback" not in result.stdout.decode()
    assert str(ini) in result.stderr.decode()  # but the admin's log has them


def test_does_not_create_the_account(make_config):
    config = make_config()
    new_account(config.inipath)
    assert list(config.mailboxes_dir.iterdir()) == []


# -- through Debian's fcgiwrap, as nginx reaches it -----------------------------------------


FCGI_BEGIN_REQUEST, FCGI_END_REQUEST, FCGI_PARAMS, FCGI_STDIN = 1, 3, 4, 5
FCGI_STDOUT, FCGI_STDERR, FCGI_RESPONDER = 6, 7, 1


def fcgi_record(record_type, content, request_id=1):
    return struct.pack(">BBHHBx", 1, record_type, request_id, len(content), 0) + content


def fcgi_length(n):
    return bytes([n]) if n < 128 else struct.pack(">I", n | 0x80000000)


def fcgi_params(params):
    data = b""
    for name, value in params.items():
        name, value = name.encode(), value.encode()
        data += fcgi_length(len(name)) + fcgi_length(len(value)) + name + value
    return data


def fastcgi_request(socket_path, params, body=b""):
    """One FastCGI responder request, as nginx's fastcgi_pass sends it: (stdout, stderr)."""
    request = fcgi_record(FCGI_BEGIN_REQUEST, struct.pack(">HB5x", FCGI_RESPONDER, 0))
    request += fcgi_record(FCGI_PARAMS, fcgi_params(params)) + fcgi_record(FCGI_PARAMS, b"")
    if body:
        request += fcgi_record(FCGI_STDIN, body)
    request += fcgi_record(FCGI_STDIN, b"")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(socket_path))
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    streams = {FCGI_STDOUT: b"", FCGI_STDERR: b""}
    while received:
        _, record_type, _, length, padding = struct.unpack(">BBHHBx", received[:8])
        content, received = received[8:8 + length], received[8 + length + padding:]
        if record_type == FCGI_END_REQUEST:
            break
        if record_type in streams:
            streams[record_type] += content
    return streams[FCGI_STDOUT], streams[FCGI_STDERR]


@pytest.fixture
def fcgiwrap(tmp_path):
    """Debian's fcgiwrap in the foreground on a socket of our own; yields the socket path."""
    binary = shutil.which("fcgiwrap", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if binary is None:
        pytest.skip("fcgiwrap is not installed (Debian package fcgiwrap)")
    socket_path = tmp_path / "fcgiwrap.socket"
    proc = subprocess.Popen([binary, "-f", "-s", f"unix:{socket_path}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not socket_path.exists():
            assert proc.poll() is None, "fcgiwrap exited"
            assert time.monotonic() < deadline, "fcgiwrap did not create its socket"
            time.sleep(0.01)
        yield socket_path
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def cgi_script(tmp_path):
    """An executable CGI file like the one nginx names in SCRIPT_FILENAME."""
    script = tmp_path / "newemail.py"
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from chatmaild.newemail import main\n"
        "sys.exit(main())\n"
    )
    script.chmod(0o755)
    return script


def test_through_fcgiwrap(fcgiwrap, cgi_script, make_config):
    config = make_config("192.0.2.7")
    params = {
        # What nginx's fastcgi_params and our location /new pass.
        "GATEWAY_INTERFACE": "CGI/1.1",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REQUEST_METHOD": "POST",
        "REQUEST_URI": "/new",
        "SCRIPT_NAME": "/new",
        "QUERY_STRING": "",
        "CONTENT_TYPE": "",
        "CONTENT_LENGTH": "0",
        "SCRIPT_FILENAME": str(cgi_script),
        "CHATMAIL_INI": str(config.inipath),
    }
    stdout, stderr = fastcgi_request(fcgiwrap, params)
    headers, account = parse_cgi_output(stdout)
    assert headers["Content-Type"] == "application/json", stderr
    assert_doveauth_accepts(config, account)
    assert parse_dclogin(account["dclogin_url"])[1]["p"] == account["password"]

    stdout, _ = fastcgi_request(fcgiwrap, dict(params, REQUEST_METHOD="PUT"))
    assert parse_cgi_output(stdout)[0]["Status"] == "405 Method Not Allowed"

    broken = dict(params, CHATMAIL_INI=str(config.inipath.parent / "missing.ini"))
    stdout, stderr = fastcgi_request(fcgiwrap, broken)
    assert parse_cgi_output(stdout)[0]["Status"] == "500 Internal Server Error"
    assert b"missing.ini" in stderr  # -f: the details go to nginx's error log
