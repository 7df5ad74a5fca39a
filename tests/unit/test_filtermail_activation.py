"""filtermail as systemd runs it with socket activation and Type=notify: on a listening
socket passed as descriptor 3 (LISTEN_FDS, LISTEN_PID), telling systemd READY=1 once it
serves and STOPPING=1 on SIGTERM, after which the messages in progress finish while new
connections wait in the socket's queue for the next filtermail. Also the protocol
helpers of chatmaild.sddaemon on their own."""

import os
import signal
import smtplib
import socket
import subprocess
import sys

import pytest

from chatmaild import sddaemon
from tests.conftest import REPO, free_port

from .mailfactory import encrypted_mail, openpgp  # noqa: F401  (fixture)
from .smtpsink import smtp_sink  # noqa: F401  (fixture)

DOMAIN = "chat.example.org"
ALICE = f"alice@{DOMAIN}"
CAROL = "carol@example.net"
# What systemd does between fork and exec: the socket on descriptor 3, LISTEN_PID naming
# the process that execs filtermail. The test hands the socket over as standard input.
ACTIVATION_WRAPPER = 'export LISTEN_PID=$$ LISTEN_FDS=1; exec "$@" 3<&0 </dev/null'


class NotifySocket:
    """A datagram socket in the abstract namespace standing in for systemd's
    NOTIFY_SOCKET; `address` is how NOTIFY_SOCKET names it."""

    def __init__(self):
        name = f"chatmail-test-notify-{os.getpid()}-{id(self)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + name)
        self.address = "@" + name

    def receive(self, timeout=15):
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode()

    def close(self):
        self.sock.close()


@pytest.fixture
def notify_socket():
    sock = NotifySocket()
    yield sock
    sock.close()


@pytest.fixture
def listener():
    """A listening socket on a free port, as a socket unit's ListenStream= makes it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock
    sock.close()


@pytest.fixture
def activate(make_ini, smtp_sink, notify_socket, listener, tmp_path):
    """activate() -> an outgoing filtermail process started as systemd's socket
    activation starts it. chatmail.ini names another port, on which nothing may listen."""
    ini_port = free_port()
    ini = make_ini(DOMAIN, filtermail_smtp_port=ini_port, postfix_reinject_port=smtp_sink.port)
    started = []

    def start():
        stderr = open(tmp_path / f"filtermail-{len(started)}.err", "w+")
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1",
                   NOTIFY_SOCKET=notify_socket.address)
        proc = subprocess.Popen(
            ["sh", "-c", ACTIVATION_WRAPPER, "sh",
             sys.executable, "-m", "chatmaild.filtermail", str(ini), "outgoing"],
            stdin=listener, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        proc.stderr_file = stderr
        started.append(proc)
        return proc

    start.ini_port = ini_port
    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr_file.close()


def stderr_of(proc):
    proc.stderr_file.seek(0)
    return proc.stderr_file.read()


def port_of(sock):
    return sock.getsockname()[1]


def refuses(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_serves_the_passed_socket_ready_after_it_accepts_smtp(activate, notify_socket,
                                                               listener):
    proc = activate()
    assert notify_socket.receive() == "READY=1"
    with smtplib.SMTP("127.0.0.1", port_of(listener), timeout=10) as client:
        assert client.ehlo()[0] == 250
    assert refuses(activate.ini_port)
    assert "listening on the port systemd passed" in stderr_of(proc)
    proc.send_signal(signal.SIGTERM)
    assert notify_socket.receive() == "STOPPING=1"
    assert proc.wait(10) == 0, stderr_of(proc)


def adopt(sock):
    """An smtplib client on an already connected socket, once the server greets it."""
    client = smtplib.SMTP(timeout=10)
    client.sock = sock
    code, _ = client.getreply()
    assert code == 220
    return client


def test_a_stop_finishes_the_message_in_progress_and_leaves_new_ones_queued(
        activate, notify_socket, listener, smtp_sink, openpgp):
    first = activate()
    assert notify_socket.receive() == "READY=1"
    in_progress = smtplib.SMTP("127.0.0.1", port_of(listener), timeout=10)
    in_progress.ehlo()
    assert in_progress.mail(ALICE)[0] == 250
    assert in_progress.rcpt(CAROL)[0] == 250

    first.send_signal(signal.SIGTERM)
    assert notify_socket.receive() == "STOPPING=1"
    # Accepted by the kernel into the socket's queue, but no longer by this filtermail.
    waiting = socket.create_connection(("127.0.0.1", port_of(listener)), timeout=10)
    waiting.settimeout(0.5)
    with pytest.raises(TimeoutError):
        waiting.recv(1)
    waiting.settimeout(10)
    assert first.poll() is None, "stopped before the message in progress was done"

    mail = encrypted_mail(ALICE, CAROL, openpgp.encrypt())
    assert in_progress.data(mail)[0] == 250
    in_progress.quit()
    assert first.wait(10) == 0, stderr_of(first)

    second = activate()
    with adopt(waiting) as client:
        assert client.sendmail(ALICE, [CAROL], mail) == {}
    assert notify_socket.receive() == "READY=1"
    assert len(smtp_sink.messages) == 2
    second.send_signal(signal.SIGTERM)
    assert second.wait(10) == 0, stderr_of(second)


# --- chatmaild.sddaemon on its own ---------------------------------------------------


def test_sockets_passed_to_another_process_are_not_taken(monkeypatch):
    monkeypatch.setenv("LISTEN_PID", str(os.getppid()))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert sddaemon.listen_fds() == []
    # Nor by a child of this process.
    assert "LISTEN_PID" not in os.environ and "LISTEN_FDS" not in os.environ


def test_no_notification_without_notify_socket(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sddaemon.notify("READY=1") is False


def test_notification_to_a_socket_path(monkeypatch, tmp_path):
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sddaemon.notify("READY=1", "STATUS=serving") is True
        assert receiver.recv(4096) == b"READY=1\nSTATUS=serving"


def test_notification_to_an_abstract_socket(monkeypatch, notify_socket):
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.address)
    assert sddaemon.notify("STOPPING=1") is True
    assert notify_socket.receive() == "STOPPING=1"


def test_a_notification_nobody_receives_is_logged(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody"))
    assert sddaemon.notify("READY=1") is False
    assert "cannot notify the service manager" in caplog.text

