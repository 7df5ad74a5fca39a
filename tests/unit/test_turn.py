"""TURN credentials: the formula, the secret file, and acceptance by a real coturn."""

import base64
import grp
import hashlib
import hmac
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time

import pytest

from chatmaild.config import read_config
from chatmaild.metadata import DeviceTokens, MetadataServer
from chatmaild.turn import (
    CREDENTIAL_LIFETIME,
    TurnSecretError,
    credentials_for,
    generate_secret,
    make_credentials,
    read_secret,
)
from tests.conftest import REPO, stop_process

DOMAIN = "chat.example.org"
TURN_KEY = "shared/0123/vendor/vendor.dovecot/pvt/server/vendor/deltachat/turn"


# -- the formula -----------------------------------------------------------------------


def test_username_is_the_expiry_time_five_days_ahead():
    username, _ = make_credentials("north", now=1_700_000_000.9)
    assert username == str(1_700_000_000 + 5 * 24 * 3600)
    assert CREDENTIAL_LIFETIME == 432000


def test_password_matches_openssl_hmac_sha1():
    # an implementation that is not ours computes the same password
    username, password = make_credentials("s3cr3t-ÿ", now=1_700_000_000)
    digest = subprocess.run(
        ["openssl", "dgst", "-sha1", "-hmac", "s3cr3t-ÿ", "-binary"],
        input=username.encode(), capture_output=True, check=True,
    ).stdout
    assert password == base64.b64encode(digest).decode()


def test_credentials_for_reads_the_configured_secret(make_ini, tmp_path):
    config = read_config(make_ini())
    secret_file = tmp_path / "turn-secret"
    assert config.turn_secret_path == str(secret_file)
    with pytest.raises(TurnSecretError, match="cannot read"):
        credentials_for(config)
    secret_file.write_text("\n")
    with pytest.raises(TurnSecretError, match="empty"):
        credentials_for(config)
    secret_file.write_text("  north \n")
    username, password = credentials_for(config, now=1000).split(":")
    assert (username, password) == make_credentials("north", now=1000)


# -- the secret file -------------------------------------------------------------------


def test_generate_secret_creates_a_private_random_secret(tmp_path):
    path = tmp_path / "turn-secret"
    old_umask = os.umask(0o077)  # the mode must not depend on the installer's umask
    try:
        assert generate_secret(path) is True
    finally:
        os.umask(old_umask)
    secret = read_secret(path)
    assert len(secret) == 64 and int(secret, 16) >= 0
    assert path.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["turn-secret"]  # no temp file left
    assert generate_secret(tmp_path / "other") and read_secret(tmp_path / "other") != secret


def test_generate_secret_never_replaces_a_secret(tmp_path):
    path = tmp_path / "turn-secret"
    path.write_text("admin-chosen\n")
    path.chmod(0o600)
    assert generate_secret(path) is False
    assert path.read_text() == "admin-chosen\n"
    assert path.stat().st_mode & 0o777 == 0o600


def test_generate_secret_fills_an_empty_file(tmp_path):
    path = tmp_path / "turn-secret"
    path.write_text(" \n")
    assert generate_secret(path) is True
    assert len(read_secret(path)) == 64


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's group needs root")
def test_generate_secret_sets_the_group(tmp_path):
    nogroup = grp.getgrgid(65534).gr_name
    for n, group in enumerate([65534, "65534", nogroup]):
        path = tmp_path / f"turn-secret-{n}"
        assert generate_secret(path, group=group) is True
        assert path.stat().st_gid == 65534


def test_generate_secret_command_is_idempotent(tmp_path):
    path = tmp_path / "turn-secret"
    command = [sys.executable, "-m", "chatmaild.turn", "generate-secret", str(path)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    first = subprocess.run(command, capture_output=True, text=True, env=env)
    assert first.returncode == 0 and "created" in first.stdout
    secret = path.read_text()
    second = subprocess.run(command, capture_output=True, text=True, env=env)
    assert second.returncode == 0 and "kept existing" in second.stdout
    assert path.read_text() == secret
    usage = subprocess.run(command[:3], capture_output=True, text=True, env=env)
    assert usage.returncode == 2 and "usage" in usage.stderr


# -- a real coturn ---------------------------------------------------------------------

STUN_MAGIC = 0x2112A442
BINDING_REQUEST, BINDING_SUCCESS = 0x0001, 0x0101
ALLOCATE_REQUEST, ALLOCATE_SUCCESS, ALLOCATE_ERROR = 0x0003, 0x0103, 0x0113
ATTR_USERNAME, ATTR_MESSAGE_INTEGRITY, ATTR_ERROR_CODE = 0x0006, 0x0008, 0x0009
ATTR_REALM, ATTR_NONCE, ATTR_XOR_RELAYED_ADDRESS = 0x0014, 0x0015, 0x0016
ATTR_REQUESTED_TRANSPORT = 0x0019
UDP_TRANSPORT = struct.pack("!B3x", 17)


def stun_attribute(kind, value):
    padding = b"\0" * (-len(value) % 4)
    return struct.pack("!HH", kind, len(value)) + value + padding


def stun_message(kind, attributes, integrity_key=None):
    """A STUN message; with `integrity_key`, signed with MESSAGE-INTEGRITY (RFC 5389 15.4)."""
    body = b"".join(stun_attribute(k, v) for k, v in attributes)
    transaction = secrets.token_bytes(12)
    if integrity_key is None:
        return struct.pack("!HHI", kind, len(body), STUN_MAGIC) + transaction + body
    # the length field already counts the 24 bytes of the MESSAGE-INTEGRITY attribute
    header = struct.pack("!HHI", kind, len(body) + 24, STUN_MAGIC) + transaction
    mac = hmac.new(integrity_key, header + body, hashlib.sha1).digest()
    return header + body + stun_attribute(ATTR_MESSAGE_INTEGRITY, mac)


def parse_stun(data):
    kind, length, _magic = struct.unpack("!HHI", data[:8])
    attributes, offset = {}, 20
    while offset < 20 + length:
        attr, size = struct.unpack("!HH", data[offset:offset + 4])
        attributes[attr] = data[offset + 4:offset + 4 + size]
        offset += 4 + size + (-size % 4)
    return kind, attributes


def error_code(attributes):
    raw = attributes[ATTR_ERROR_CODE]
    return (raw[2] & 7) * 100 + raw[3]


class TurnClient:
    def __init__(self, port):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(2)
        self.server = ("127.0.0.1", port)

    def exchange(self, message):
        self.sock.sendto(message, self.server)
        return parse_stun(self.sock.recv(4096))

    def allocate(self, username, password):
        """TURN Allocate with long-term credentials; returns (message type, attributes)."""
        kind, attributes = self.exchange(
            stun_message(ALLOCATE_REQUEST, [(ATTR_REQUESTED_TRANSPORT, UDP_TRANSPORT)]))
        assert kind == ALLOCATE_ERROR and error_code(attributes) == 401  # the challenge
        realm, nonce = attributes[ATTR_REALM], attributes[ATTR_NONCE]
        key = hashlib.md5(f"{username}:{realm.decode()}:{password}".encode()).digest()
        return self.exchange(stun_message(ALLOCATE_REQUEST, [
            (ATTR_USERNAME, username.encode()),
            (ATTR_REALM, realm),
            (ATTR_NONCE, nonce),
            (ATTR_REQUESTED_TRANSPORT, UDP_TRANSPORT),
        ], integrity_key=key))

    def close(self):
        self.sock.close()


def free_udp_and_tcp_port():
    """coturn listens on both; the port must be free for both."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port
    raise AssertionError("no free port")


def turnserver_config(port, secret, log_path, db_path):
    """What our packaging configures (use-auth-secret), bound to loopback for the test."""
    return "\n".join([
        f"listening-port={port}",
        "listening-ip=127.0.0.1",
        "relay-ip=127.0.0.1",
        "min-port=49152",
        "max-port=65535",
        "use-auth-secret",
        f"static-auth-secret={secret}",
        f"realm={DOMAIN}",
        "allow-loopback-peers",
        "no-tls",
        "no-dtls",
        "no-cli",
        "no-rfc5780",
        "no-software-attribute",
        f"userdb={db_path}",
        f"log-file={log_path}",
        "simple-log",
        "",
    ])


class Coturn:
    def __init__(self, tmp_path, secret):
        self.port = free_udp_and_tcp_port()
        self.log_path = tmp_path / "turnserver.log"
        conf = tmp_path / "turnserver.conf"
        conf.write_text(turnserver_config(
            self.port, secret, self.log_path, tmp_path / "turndb.sqlite"))
        self.proc = subprocess.Popen(
            ["turnserver", "-c", str(conf)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_until_answering()

    def wait_until_answering(self, timeout=10.0):
        client = TurnClient(self.port)
        client.sock.settimeout(0.1)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, f"turnserver exited: {self.log()}"
                try:
                    kind, _ = client.exchange(stun_message(BINDING_REQUEST, []))
                except (socket.timeout, ConnectionRefusedError):
                    continue
                if kind == BINDING_SUCCESS:
                    return
            raise AssertionError(f"turnserver not answering: {self.log()}")
        finally:
            client.close()

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except FileNotFoundError:
            return "(no log)"

    def stop(self):
        stop_process(self.proc)


needs_coturn = pytest.mark.skipif(
    shutil.which("turnserver") is None, reason="needs Debian package coturn")


@pytest.fixture
def turn_secret_file(tmp_path):
    path = tmp_path / "turn-secret"
    generate_secret(path)
    return path


@pytest.fixture
def coturn(tmp_path, turn_secret_file):
    server = Coturn(tmp_path, read_secret(turn_secret_file))
    yield server
    server.stop()


@pytest.fixture
def turn_client(coturn):
    client = TurnClient(coturn.port)
    yield client
    client.close()


@needs_coturn
def test_coturn_accepts_generated_credentials(turn_client, turn_secret_file):
    username, password = make_credentials(read_secret(turn_secret_file))
    kind, attributes = turn_client.allocate(username, password)
    assert kind == ALLOCATE_SUCCESS, attributes
    assert ATTR_XOR_RELAYED_ADDRESS in attributes


@needs_coturn
def test_coturn_rejects_a_wrong_password(turn_client, turn_secret_file):
    username, password = make_credentials(read_secret(turn_secret_file))
    wrong = base64.b64encode(b"x" * 20).decode()
    kind, attributes = turn_client.allocate(username, wrong)
    assert kind == ALLOCATE_ERROR and error_code(attributes) == 401


@needs_coturn
def test_coturn_rejects_credentials_of_another_secret(turn_client):
    kind, attributes = turn_client.allocate(*make_credentials("north"))
    assert kind == ALLOCATE_ERROR and error_code(attributes) == 401


@needs_coturn
def test_coturn_rejects_expired_credentials(turn_client, turn_secret_file):
    six_days_ago = time.time() - 6 * 24 * 3600
    kind, attributes = turn_client.allocate(
        *make_credentials(read_secret(turn_secret_file), now=six_days_ago))
    assert kind == ALLOCATE_ERROR and error_code(attributes) == 401


@needs_coturn
def test_metadata_turn_value_works_at_coturn(make_ini, turn_client, turn_secret_file):
    """What a Delta Chat client gets through IMAP METADATA opens a relay at coturn."""
    config = read_config(make_ini(turn_secret_path=turn_secret_file))
    server = MetadataServer(config, DeviceTokens(config), notifier=None)
    reply = server.handle_line(f"L{TURN_KEY}\tuser@{DOMAIN}", {})
    host, port, username, password = reply[1:].rstrip("\n").split(":", 3)
    assert (reply[0], host, port) == ("O", DOMAIN, "3478")
    kind, attributes = turn_client.allocate(username, password)
    assert kind == ALLOCATE_SUCCESS, attributes


@needs_coturn
@pytest.mark.slow
def test_turnutils_uclient_relays_with_generated_credentials(coturn, turn_secret_file):
    """coturn's own test client allocates and relays packets (takes ~5 s)."""
    username, password = make_credentials(read_secret(turn_secret_file))

    def uclient(password):
        return subprocess.run(
            ["turnutils_uclient", "-p", str(coturn.port), "-u", username, "-w", password,
             "-n", "1", "-m", "1", "-c", "-z", "1", "-y", "-e", "127.0.0.1", "127.0.0.1"],
            capture_output=True, text=True, timeout=30)

    good = uclient(password)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "tot_recv_msgs=" in good.stdout
    received = int(good.stdout.rsplit("tot_recv_msgs=", 1)[1].split(",")[0].split()[0])
    assert received > 0
    bad = uclient("wrong")
    assert bad.returncode != 0
    assert "Cannot complete Allocation" in bad.stdout + bad.stderr
