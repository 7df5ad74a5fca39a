"""Fixtures shared by all test folders."""

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# conf/ and steps/ come from this checkout, not from an installed package.
os.environ.setdefault("CHATMAIL_DATA_DIR", str(REPO))

from chatmaild.config import default_config_text, read_config  # noqa: E402


def host_suite():
    """The codename of the Debian release this machine runs (bookworm, trixie)."""
    with open("/etc/os-release", encoding="utf-8") as f:
        fields = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
    return fields["VERSION_CODENAME"].strip('"')


@pytest.fixture
def make_ini(tmp_path):
    """make_ini(domain="chat.example.org", **settings) -> path of a chatmail.ini whose
    mailboxes, TURN secret and other state live under tmp_path."""

    def make(mail_domain="chat.example.org", **settings):
        values = {
            "mailboxes_dir": tmp_path / "mail" / mail_domain,
            "passdb_path": tmp_path / "passdb.sqlite",
            "turn_secret_path": tmp_path / "turn-secret",
        }
        values.update(settings)
        path = tmp_path / "chatmail.ini"
        path.write_text(default_config_text(mail_domain, **values))
        return path

    return make


@pytest.fixture
def config(make_ini):
    config = read_config(make_ini())
    config.mailboxes_dir.mkdir(parents=True)
    return config


@pytest.fixture
def make_config(make_ini):
    def make(mail_domain="chat.example.org", **settings):
        config = read_config(make_ini(mail_domain, **settings))
        config.mailboxes_dir.mkdir(parents=True, exist_ok=True)
        return config

    return make


def stop_process(proc, timeout=5):
    """Terminate a test's server process, killing it if it does not exit in time."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def make_certificate(cert, key):
    """A self-signed P-256 certificate for 127.0.0.1, as clients of a test relay see it."""
    for path in (cert, key):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-noenc", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True)


def parse_syslog(datagram):
    """(priority, tag, text) of a message as logger sends it to a local syslog socket:
    "<PRIORITY>Mmm dd hh:mm:ss TAG[PID]: TEXT", the pid only from some loggers."""
    match = re.match(r"<(\d+)>\w{3} [ \d]\d \d\d:\d\d:\d\d (\S+?)(?:\[\d+\])?: (.*)",
                     datagram, re.S)
    assert match, f"not a syslog message: {datagram!r}"
    return int(match[1]), match[2], match[3].strip()


def block(text, opening):
    """The body of the block that starts with `opening {` (nested blocks included)."""
    start = text.index(opening + " {") + len(opening) + 2
    depth, position = 1, start
    while depth:
        position += 1
        depth += {"{": 1, "}": -1}.get(text[position], 0)
    return text[start:position]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """A chatmaild service started as its own process, as systemd would start it."""

    def __init__(self, module, args, env=None, prefix=()):
        self.stderr_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"daemon-{os.getpid()}-{id(self)}.err"
        self._stderr = open(self.stderr_path, "w+b")
        full_env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", f"chatmaild.{module}", *map(str, args)],
            stdout=subprocess.DEVNULL, stderr=self._stderr, env=full_env,
        )

    @property
    def stderr(self):
        return self.stderr_path.read_text(errors="replace")

    def wait_for(self, ready, timeout=15.0):
        """Wait until ready() is true; fail with the daemon's stderr if it died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.stderr}")
            if ready():
                return
            time.sleep(0.02)
        raise AssertionError(f"daemon not ready after {timeout}s:\n{self.stderr}")

    def stop(self):
        stop_process(self.proc)
        self._stderr.close()
        self.stderr_path.unlink(missing_ok=True)


@pytest.fixture
def start_daemon():
    """start_daemon(module, *args, ready=callable, env=None, prefix=()) -> Daemon (stopped
    at the end); `prefix` is a command that runs the daemon's command line."""
    started = []

    def start(module, *args, ready, env=None, timeout=15.0, prefix=()):
        daemon = Daemon(module, args, env, prefix)
        started.append(daemon)
        daemon.wait_for(ready, timeout)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


class DictClient:
    """Speaks Dovecot's dict protocol over a unix socket, as Dovecot's proxy client does."""

    def __init__(self, socket_path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(str(socket_path))
        self.rfile = self.sock.makefile("rb")

    def send(self, line):
        self.sock.sendall(line.encode() + b"\n")

    def readline(self):
        return self.rfile.readline().decode().rstrip("\n")

    def request(self, line):
        self.send(line)
        return self.readline()

    def close(self):
        self.rfile.close()
        self.sock.close()


@pytest.fixture
def dict_client():
    clients = []

    def connect(socket_path):
        client = DictClient(socket_path)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()
