"""conf/coturn: our own turnserver configuration, started by a real coturn."""

import subprocess
import time
from contextlib import contextmanager

import pytest

from chatmaild.admin import render as render_module
from chatmaild.admin.components import coturn
from chatmaild.admin.platform import load_platform
from chatmaild.turn import TURN_PORT, make_credentials
from tests.conftest import stop_process
from tests.unit.test_turn import (
    ALLOCATE_ERROR,
    ALLOCATE_SUCCESS,
    ATTR_REALM,
    ATTR_XOR_RELAYED_ADDRESS,
    BINDING_REQUEST,
    BINDING_SUCCESS,
    TurnClient,
    error_code,
    free_udp_and_tcp_port,
    needs_coturn,
    stun_message,
)

SECRET = "5f3c0ffee" * 7


@pytest.fixture
def installed(monkeypatch):
    """What read_text() finds on a relay with coturn installed and the TURN secret made:
    {path: content}; a test makes a file missing by setting it to "" (what read_text()
    returns for a missing file)."""
    real_read_text = render_module.read_text
    files = {}

    def read_text(path):
        return files[str(path)] if str(path) in files else real_read_text(path)

    monkeypatch.setattr(render_module, "read_text", read_text)

    def install(config, platform):
        files[platform.coturn_package_file] = "# a file of the coturn package"
        files[config.turn_secret_path] = SECRET
        return files

    return install


def options(text, name):
    return coturn.option_values(text, name)


def test_our_file_and_a_dropin_not_the_conffile(relay_config, debian12, render, installed):
    installed(relay_config, debian12)
    files = render("coturn", relay_config, debian12)
    dropin = "/etc/systemd/system/coturn.service.d/chatmail.conf"
    assert set(files) == {"/etc/chatmail/turnserver.conf", dropin}
    conf = files["/etc/chatmail/turnserver.conf"]
    assert (conf.mode, conf.owner, conf.group) == (0o640, "root", "turnserver")
    assert (conf.reload, conf.restart) == ([], ["coturn"])
    service = files[dropin].content.splitlines()
    assert service.index("ExecStart=") < service.index(
        "ExecStart=/usr/bin/turnserver -c /etc/chatmail/turnserver.conf --pidfile=")


def test_shared_secret_realm_and_listeners(relay_config, debian12, render, installed):
    installed(relay_config, debian12)
    text = render("coturn", relay_config, debian12)["/etc/chatmail/turnserver.conf"].content
    assert options(text, "use-auth-secret") == [""]
    assert options(text, "static-auth-secret") == [SECRET]
    assert options(text, "realm") == [relay_config.mail_domain_bare]
    assert options(text, "listening-port") == [str(TURN_PORT)]
    # every address of the host (coturn's default), and no TLS anywhere
    assert options(text, "listening-ip") == []
    for name in ("no-tls", "no-dtls", "no-cli", "no-tcp-relay", "no-multicast-peers"):
        assert options(text, name) == [""], name
    for name in ("tls-listening-port", "cert", "pkey", "allow-loopback-peers"):
        assert options(text, name) == [], name
    denied = options(text, "denied-peer-ip")
    assert "10.0.0.0-10.255.255.255" in denied and "127.0.0.0-127.255.255.255" in denied


def test_nothing_without_coturn(relay_config, debian12, render, installed):
    files = installed(relay_config, debian12)
    files[debian12.coturn_package_file] = ""
    assert render("coturn", relay_config, debian12) == {}


def test_alpine_has_no_systemd_dropin(relay_config, render, installed):
    alpine = load_platform("alpine")
    installed(relay_config, alpine)
    assert list(render("coturn", relay_config, alpine)) == ["/etc/coturn/turnserver.conf"]


def test_validate_wants_the_secret(relay_config, debian12, render, installed):
    files = installed(relay_config, debian12)
    assert coturn.validate(list(render("coturn", relay_config, debian12).values()), debian12) == []
    files[relay_config.turn_secret_path] = ""
    [problem] = coturn.validate(list(render("coturn", relay_config, debian12).values()), debian12)
    assert "no TURN secret" in problem and "generate-secret" in problem


# -- the rendered file in a real coturn ------------------------------------------------


def on_loopback(text, port, tmp_path):
    """The rendered configuration with the listener moved to a free loopback port and
    logs and state in tmp_path; every other option as rendered."""
    assert "listening-port=3478\n" in text and "syslog\nno-stdout-log\n" in text
    text = text.replace("listening-port=3478\n", (
        f"listening-port={port}\nlistening-ip=127.0.0.1\nrelay-ip=127.0.0.1\n"))
    text = text.replace("syslog\nno-stdout-log\n", (
        f"log-file={tmp_path}/turnserver.log\nsimple-log\n"))
    return text + f"pidfile={tmp_path}/turnserver.pid\nuserdb={tmp_path}/turndb.sqlite\n"


def wait_until_answering(proc, port, log_path, timeout=10.0):
    client = TurnClient(port)
    client.sock.settimeout(0.1)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text(errors="replace")
            try:
                kind, _ = client.exchange(stun_message(BINDING_REQUEST, []))
            except (TimeoutError, ConnectionRefusedError):
                continue
            if kind == BINDING_SUCCESS:
                return
        raise AssertionError(f"turnserver not answering: {log_path.read_text(errors='replace')}")
    finally:
        client.close()


@contextmanager
def turnserver(relay_config, platform, render, tmp_path, conf, argv):
    """turnserver started with `argv` (in tmp_path) once the rendered configuration is
    at `conf`, moved to loopback; yields (port, log path) while it answers."""
    text = render("coturn", relay_config, platform)[platform.turnserver_config].content
    port = free_udp_and_tcp_port()
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(on_loopback(text, port, tmp_path))
    log_path = tmp_path / "turnserver.log"
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_until_answering(proc, port, log_path)
        yield port, log_path
    finally:
        stop_process(proc)


@pytest.fixture
def rendered_coturn(relay_config, debian12, render, installed, tmp_path):
    """A turnserver running on the rendered configuration; yields (port, log path)."""
    installed(relay_config, debian12)
    conf = tmp_path / "turnserver.conf"
    with turnserver(relay_config, debian12, render, tmp_path, conf,
                    ["turnserver", "-c", str(conf)]) as running:
        yield running


def allocate(port, credentials):
    """One TURN allocation from a fresh client port (coturn allows one per client port)."""
    client = TurnClient(port)
    try:
        return client.allocate(*credentials)
    finally:
        client.close()


@needs_coturn
def test_coturn_runs_the_rendered_configuration(rendered_coturn, relay_config):
    port, log_path = rendered_coturn
    kind, attributes = allocate(port, make_credentials(SECRET))
    assert kind == ALLOCATE_SUCCESS, attributes
    assert ATTR_XOR_RELAYED_ADDRESS in attributes
    kind, attributes = allocate(port, make_credentials("another relay's secret"))
    assert kind == ALLOCATE_ERROR and error_code(attributes) == 401
    assert attributes[ATTR_REALM].decode() == relay_config.mail_domain_bare
    log = log_path.read_text(errors="replace")
    # coturn logs options it does not know and runs anyway
    assert "Bad configuration format" not in log
    assert log.count("Black listing:") == len(options(
        (log_path.parent / "turnserver.conf").read_text(), "denied-peer-ip"))


@needs_coturn
def test_alpine_turnserver_finds_our_file_without_c(relay_config, render, installed,
                                                     tmp_path):
    """Alpine's init script starts turnserver without -c (and the package ships no
    configuration): turnserver looks in ./etc/coturn/ before /etc/, so run from tmp_path
    it finds our file at tmp_path/etc/coturn/turnserver.conf as it finds
    /etc/coturn/turnserver.conf on Alpine."""
    alpine = load_platform("alpine")
    installed(relay_config, alpine)
    conf = tmp_path / alpine.turnserver_config.lstrip("/")
    with turnserver(relay_config, alpine, render, tmp_path, conf,
                    ["turnserver", "--no-stdout-log"]) as (port, _):
        kind, attributes = allocate(port, make_credentials(SECRET))
    assert kind == ALLOCATE_SUCCESS, attributes
