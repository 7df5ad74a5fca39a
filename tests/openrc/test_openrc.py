"""Our Alpine init scripts (the relay's services' generated from conf/services.toml, the
others in alpine/) and daily jobs (alpine/) run for real: OpenRC's openrc-run and
supervise-daemon (Debian 13's openrc 0.56; Alpine runs the same programs) start our
services from the python3-chatmaild package built for Debian 13 (dist/trixie), as vmail,
Dovecot 2.4 (Debian 13's) with our Dovecot build's init script and the relay's
configuration laid out as on Alpine, our fcgiwrap service for /new behind nginx, and
Postfix and the relay's OpenDKIM instance configured for Alpine, through which a user's
mail reaches another's mailbox, signed, and another relay's mail arrives if signed.

Runs inside tests/chroot.sh, in a network namespace of its own: `make test-openrc`."""

import base64
import functools
import imaplib
import json
import os
import re
import resource
import shutil
import signal
import smtplib
import socket
import subprocess
import ssl
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import dkim
import pytest

from chatmaild.admin.apply import apply_files
from chatmaild.admin.configure import apply_special_kinds, configure
from chatmaild.admin.host import Host
from chatmaild.admin.platform import load_platform
from chatmaild.admin.render import render_component
from chatmaild.admin.reloads import forget_dead_postfix
from chatmaild.admin.servicemanager import OpenRC
from chatmaild.admin.services import relay_services
from chatmaild.admin.units import relay_units, write_units
from chatmaild.admin.status import Probes, dead_postfix_finding
from chatmaild.config import default_config_text, read_config
from tests.conftest import REPO, block, make_certificate, parse_syslog
from tests.unit.nsd import Nsd

ALPINE = REPO / "alpine"
INI = Path("/etc/chatmail/chatmail.ini")
DOMAIN = "chat.example.org"
RESPAWN_DELAY = 1
# Account creation must not depend on how busy the test machine is.
PERMISSIVE = {"max_load_1m": "99999", "min_available_memory": "0", "min_free_disk_space": "0"}
# The relay's own services (conf/services.toml) as Alpine runs them: those Dovecot asks
# on a unix socket, and the filters with the chatmail.ini setting of their port.
UNITS = relay_units(load_platform("alpine"))
SOCKETS = {unit.name: unit.socket for unit in UNITS if unit.socket}
PORT_SETTINGS = {unit.name: unit.port for unit in UNITS if unit.port}
SERVICES = [*SOCKETS, *PORT_SETTINGS]

pytestmark = pytest.mark.skipif(shutil.which("openrc-run") is None,
                                reason="needs OpenRC: run `make test-openrc`")


def run(*argv):
    return subprocess.run(argv, capture_output=True, text=True)


def rc_service(service, action):
    return run("rc-service", service, action)


def install_chatmaild():
    debs = sorted((REPO / "dist" / "trixie").glob("python3-chatmaild_*.deb"))
    assert debs, "no dist/trixie/python3-chatmaild_*.deb: run `make debs-trixie` first"
    result = run("dpkg", "-i", str(debs[-1]))
    assert result.returncode == 0, result.stdout + result.stderr


def add_vmail():
    if run("getent", "passwd", "vmail").returncode != 0:
        result = run("adduser", "--system", "--group", "--home", "/home/vmail",
                     "--no-create-home", "vmail")
        assert result.returncode == 0, result.stderr
    Path("/home/vmail").mkdir(exist_ok=True)
    shutil.chown("/home/vmail", "vmail", "vmail")


@functools.cache
def generated_openrc_dir():
    """The relay's own services' init scripts and conf.d files, generated from
    conf/services.toml as the APKBUILD's build() does."""
    directory = Path(tempfile.mkdtemp(prefix="openrc-scripts-"))
    write_units(load_platform("alpine"), directory)
    return directory


def init_script_dir(service):
    """Where SERVICE's .initd and .confd are: generated for the relay's own services,
    written by hand (alpine/) for the others."""
    return generated_openrc_dir() if service in relay_services() else ALPINE


def install_service(service, open_files):
    """/etc/init.d/SERVICE and /etc/conf.d/SERVICE as chatmail-relay-openrc installs them,
    the conf.d with what an admin may set there: quicker respawns, an open files limit
    this machine allows (raising the hard limit needs CAP_SYS_RESOURCE)."""
    init = Path("/etc/init.d") / service
    shutil.copy(init_script_dir(service) / f"{service}.initd", init)
    init.chmod(0o755)
    confd = (init_script_dir(service) / f"{service}.confd").read_text()
    confd += f'respawn_delay={RESPAWN_DELAY}\nrc_ulimit="-n {open_files}"\n'
    Path("/etc/conf.d").mkdir(exist_ok=True)
    (Path("/etc/conf.d") / service).write_text(confd)


class Syslog:
    """A syslog socket the services' loggers write to: the `logger` command (util-linux's
    here, busybox's on Alpine) is wrapped to send there, as this chroot has no syslog
    daemon. The messages, as received, in .messages."""

    SOCKET = "/run/test-syslog.socket"

    def __init__(self):
        self.messages = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.SOCKET)
        os.chmod(self.SOCKET, 0o666)  # as /dev/log: the services log as vmail
        threading.Thread(target=self._receive, daemon=True).start()
        logger = Path(shutil.which("logger"))
        logger.rename(logger.with_name("logger.real"))
        logger.write_text(f'#!/bin/sh\nexec {logger}.real -u {self.SOCKET} "$@"\n')
        logger.chmod(0o755)

    def _receive(self):
        while True:
            self.messages.append(self.sock.recv(65536).decode())

    def wait_for(self, tag, text, timeout=15):
        """(priority, message) of the message tagged TAG that contains TEXT."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for priority, found_tag, found in map(parse_syslog, list(self.messages)):
                if found_tag == tag and text in found:
                    return priority, found
            time.sleep(0.1)
        raise AssertionError(f"no {tag} message with {text!r} in {self.messages}")


@pytest.fixture(scope="module")
def syslog():
    return Syslog()


@pytest.fixture(scope="module")
def relay(syslog):
    """OpenRC's state as on a booted system, our services installed, chatmail.ini written
    -> the relay's configuration; the services are stopped at the end."""
    install_chatmaild()
    add_vmail()
    open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    for service in SERVICES:
        install_service(service, open_files)
    # OpenRC installs this PAM service with supervise-daemon; Debian's package leaves it
    # out, so PAM's "other" would add Debian's pam_umask, which turns umask 077 into 007
    # for a user in a group of its own, such as vmail.
    Path("/etc/pam.d/supervise-daemon").write_text(
        "auth required pam_permit.so\naccount required pam_permit.so\n"
        "password required pam_deny.so\nsession optional pam_limits.so\n")
    # Not booted by OpenRC: this file says the system is in a runlevel anyway.
    Path("/run/openrc").mkdir(parents=True, exist_ok=True)
    Path("/run/openrc/softlevel").touch()
    INI.parent.mkdir(parents=True, exist_ok=True)
    INI.write_text(default_config_text(DOMAIN, **PERMISSIVE))
    config = read_config(INI)
    # What `chatmail configure` (its directories step) makes before services start.
    Path(config.mailboxes_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    shutil.chown(config.mailboxes_dir, "vmail", "vmail")
    config.open_files = open_files
    yield config
    for service in SERVICES:
        rc_service(service, "stop")


@pytest.fixture
def started(relay, request):
    """Start the service named by the test's `service` parameter; stop it afterwards."""
    service = request.node.callspec.params["service"]
    result = rc_service(service, "start")
    assert result.returncode == 0, result.stdout + result.stderr
    yield service
    rc_service(service, "stop")


def supervisor_pid(service):
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[0].endswith(b"supervise-daemon") and argv[1:2] == [service.encode()]:
                return int(proc.name)
    return None


def daemon_pid(service, timeout=10):
    """The process supervise-daemon runs for SERVICE (waiting for a respawn)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        supervisor = supervisor_pid(service)
        if supervisor:
            children = Path(f"/proc/{supervisor}/task/{supervisor}/children")
            pids = children.read_text().split()
            if pids:
                return int(pids[0])
        time.sleep(0.1)
    raise AssertionError(f"{service}: no supervised process")


OPENAT = "257"  # x86_64


def wait_until_supervising(service, timeout=10):
    """Until SERVICE's supervise-daemon waits on its control fifo (in openat). It looks
    for a dead child only when a signal ends that wait: a child that dies earlier, while
    it is still setting up, is never started again (OpenRC 0.56)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        supervisor = supervisor_pid(service)
        if supervisor:
            syscall = Path(f"/proc/{supervisor}/syscall").read_text().split()
            if syscall[:1] == [OPENAT]:
                return
        time.sleep(0.05)
    raise AssertionError(f"{service}: supervise-daemon is not waiting on its fifo")


def kill_and_wait_for_respawn(service, timeout=15):
    """SIGKILL SERVICE's process; the one supervise-daemon starts instead."""
    first = daemon_pid(service)
    wait_until_supervising(service)
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while (second := daemon_pid(service)) == first and time.monotonic() < deadline:
        time.sleep(0.1)
    assert second != first, "not respawned"
    return second


def proc_status(pid):
    text = Path(f"/proc/{pid}/status").read_text()
    return dict(re.findall(r"^(\w+):\s*(.*)$", text, re.M))


def open_files_limit(pid):
    limits = Path(f"/proc/{pid}/limits").read_text()
    return re.search(r"^Max open files\s+(\d+)\s+(\d+)", limits, re.M).groups()


def answers(config, service, timeout=15):
    """True once SERVICE accepts a connection on its socket or port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if service in SOCKETS:
                with socket.socket(socket.AF_UNIX) as client:
                    client.connect(SOCKETS[service])
            else:
                port = getattr(config, PORT_SETTINGS[service])
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


@pytest.mark.parametrize("service", SERVICES)
def test_service_runs_supervised_as_vmail_and_answers(relay, started, service):
    assert "started" in rc_service(service, "status").stdout
    pid = daemon_pid(service)
    status = proc_status(pid)
    vmail = run("id", "-u", "vmail").stdout.strip()
    assert status["Uid"].split()[:2] == [vmail, vmail]
    assert status["NoNewPrivs"] == "1"
    assert status["Umask"] == "0077"
    assert open_files_limit(pid) == (str(relay.open_files), str(relay.open_files))
    assert answers(relay, service)
    if service in SOCKETS:
        runtime_dir = Path(SOCKETS[service]).parent
        assert runtime_dir.owner() == runtime_dir.group() == "vmail"


@pytest.mark.parametrize("service", SERVICES)
def test_service_is_started_again_after_a_crash(relay, started, service):
    kill_and_wait_for_respawn(service, timeout=RESPAWN_DELAY + 10)
    assert answers(relay, service)
    assert "started" in rc_service(service, "status").stdout


DAEMON_INFO = 3 * 8 + 6


@pytest.mark.parametrize("service", SERVICES)
def test_service_output_goes_to_syslog(relay, syslog, started, service):
    """supervise-daemon sends a service's output to /dev/null unless told otherwise; the
    journal keeps it on Debian."""
    assert answers(relay, service)
    if service in SOCKETS:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(SOCKETS[service])
            client.sendall(b"Zbogus\n")
        expected = "unknown dictproxy request: 'Zbogus'"
    else:
        expected = "entering serving loop"
    assert syslog.wait_for(service, expected) == (DAEMON_INFO, expected)


@pytest.mark.parametrize("service", ["doveauth", "filtermail"])
def test_stop_ends_the_service(relay, started, service):
    pid = daemon_pid(service)
    result = rc_service(service, "stop")
    assert result.returncode == 0, result.stderr
    assert supervisor_pid(service) is None
    assert not Path(f"/proc/{pid}").exists()
    assert "stopped" in rc_service(service, "status").stdout


def greets(port):
    """The filter's answer right now, without waiting for it."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=5) as client:
            return client.noop()[0] == 250
    except (OSError, smtplib.SMTPException):
        return False


@pytest.mark.parametrize("service", list(PORT_SETTINGS))
def test_start_and_restart_return_once_the_filter_serves(relay, service):
    """supervise-daemon returns when filtermail runs, before it listens; the script's
    start_post waits until it serves, so Postfix's next message finds it."""
    port = getattr(relay, PORT_SETTINGS[service])
    try:
        for action in ("start", "restart"):
            result = rc_service(service, action)
            assert result.returncode == 0, result.stdout + result.stderr
            assert greets(port), action
    finally:
        rc_service(service, "stop")


def test_start_fails_when_the_filter_cannot_listen(relay):
    """Another program on its port: start says so within its wait, and leaves nothing
    running."""
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", relay.filtermail_smtp_port))
        squatter.listen()
        result = rc_service("filtermail", "start")
    assert result.returncode != 0
    assert f"does not answer on 127.0.0.1:{relay.filtermail_smtp_port}" in result.stderr
    assert supervisor_pid("filtermail") is None
    assert "stopped" in rc_service("filtermail", "status").stdout


@pytest.mark.parametrize("service", SERVICES)
def test_start_without_ini_says_run_setup(relay, service):
    saved = INI.with_name("chatmail.ini.away")
    INI.rename(saved)
    try:
        result = rc_service(service, "start")
    finally:
        saved.rename(INI)
    assert result.returncode != 0
    assert "chatmail setup" in result.stdout + result.stderr
    assert supervisor_pid(service) is None
    rc_service(service, "zap")


# --- daily jobs (busybox crond runs /etc/periodic/daily on Alpine) ------------------

def run_periodic(job):
    return run("sh", str(ALPINE / f"{job}.periodic"))


def test_daily_expiry_runs_as_vmail(relay):
    # An address that logged in today, with a message from long ago and one of today.
    mailbox = Path(relay.mailboxes_dir) / f"user@{DOMAIN}"
    (mailbox / "cur").mkdir(parents=True, exist_ok=True)
    (mailbox / "password").write_text("hash\n")
    old, new = mailbox / "cur" / "1.M1P1.host:2,S", mailbox / "cur" / "2.M2P2.host:2,S"
    for message in [old, new]:
        message.write_text("Subject: hello\n\nhello\n")
    long_ago = time.time() - (int(relay.delete_mails_after) + 1) * 86400
    os.utime(old, (long_ago, long_ago))
    subprocess.run(["chown", "-R", "vmail:vmail", str(relay.mailboxes_dir)], check=True)
    result = run_periodic("chatmail-expire")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not old.exists() and new.exists()


def test_daily_report_is_written_by_vmail(relay):
    result = run_periodic("chatmail-fsreport")
    assert result.returncode == 0, result.stdout + result.stderr
    report = Path("/var/lib/chatmail-relay/metrics/fsreport.prom")
    assert report.owner() == "vmail"
    # readable by node_exporter's textfile collector
    assert report.stat().st_mode & 0o777 == 0o644
    assert "# TYPE" in report.read_text()


# --- Dovecot: our Alpine build's init script, the relay's configuration as on Alpine ----

DOVECOT = load_platform("alpine").dovecot_service
DOVECOT_CONF = Path("/etc/dovecot/dovecot.conf")
IMAPS = ("127.0.0.1", 993)
PASSWORD = "Ohwu4aeshahx7shei"


def openrc_platform():
    """Debian 13's paths (its Dovecot runs here) with Alpine's layout: OpenRC, and the
    relay's whole configuration in Dovecot's default file."""
    return SimpleNamespace(**{**vars(load_platform("debian13")), "service_manager": "openrc",
                              "dovecot_main_config": str(DOVECOT_CONF)})


def dovecot_errors():
    """Dovecot's recent errors (no syslog here to read them from)."""
    return run("doveadm", "log", "errors").stdout


def self_signed_ok():
    """A TLS client context for the test relay's self-signed certificate."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


def imaps_login(address, timeout=15):
    """Log in over IMAPS (creating the account on its first login): the answer to LOGIN.
    Dovecot restarts its processes on a reload or respawn, so a connection broken
    meanwhile is tried again; if none works, Dovecot's recent errors."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with imaplib.IMAP4_SSL(*IMAPS, ssl_context=self_signed_ok(), timeout=10) as client:
                return client.login(address, PASSWORD)[0]
        except (OSError, imaplib.IMAP4.abort) as error:
            if time.monotonic() > deadline:
                return f"{error}\n{dovecot_errors()}"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def dovecot(relay):
    """The relay's Dovecot files written by `chatmail configure` on Alpine, with the
    services Dovecot asks (doveauth, lastlogin, chatmail-metadata) running."""
    install_service(DOVECOT, relay.open_files)
    # Dovecot needs localmount, which Alpine's boot runlevel starts (it mounts the local
    # file systems); Debian's openrc has no such service: a stand-in with nothing to do.
    localmount = Path("/etc/init.d/localmount")
    localmount.write_text("#!/sbin/openrc-run\nstart() {\n\treturn 0\n}\n")
    localmount.chmod(0o755)
    assert rc_service("localmount", "start").returncode == 0
    make_certificate(relay.tls_cert_path, relay.tls_key_path)
    # As `chatmail configure` makes it: Postfix refuses to start while it is not its own.
    Path("/var/spool/postfix/private").mkdir(mode=0o700, parents=True, exist_ok=True)
    shutil.chown("/var/spool/postfix/private", "postfix", "postfix")
    for item in render_component("dovecot", relay, openrc_platform()):
        path = Path(item.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(item.content)
    for service in SOCKETS:
        assert rc_service(service, "start").returncode == 0
    yield relay
    rc_service(DOVECOT, "stop")
    for service in SOCKETS:
        rc_service(service, "stop")


def test_dovecot_runs_the_default_file_and_creates_accounts(dovecot):
    result = rc_service(DOVECOT, "start")
    assert result.returncode == 0, result.stdout + result.stderr
    # Nothing but the default file tells Dovecot about the relay.
    assert "-c" not in Path(f"/proc/{daemon_pid(DOVECOT)}/cmdline").read_bytes().split(b"\0")
    address = f"openrc001@{DOMAIN}"
    assert imaps_login(address) == "OK"
    assert (Path(dovecot.mailboxes_dir) / address / "password").exists()
    result = rc_service(DOVECOT, "reload")
    assert result.returncode == 0, result.stdout + result.stderr
    assert imaps_login(address) == "OK"


def test_dovecot_is_started_again_after_a_crash(dovecot):
    assert rc_service(DOVECOT, "start").returncode == 0
    kill_and_wait_for_respawn(DOVECOT)
    assert imaps_login(f"openrc002@{DOMAIN}") == "OK"
    result = rc_service(DOVECOT, "stop")
    assert result.returncode == 0, result.stdout + result.stderr
    assert supervisor_pid(DOVECOT) is None


def test_dovecot_refuses_to_start_with_a_broken_configuration(dovecot):
    good = DOVECOT_CONF.read_text()
    DOVECOT_CONF.write_text(good + "no_such_setting = 1\n")
    try:
        result = rc_service(DOVECOT, "start")
    finally:
        DOVECOT_CONF.write_text(good)
    assert result.returncode != 0
    assert "no_such_setting" in result.stdout + result.stderr
    assert supervisor_pid(DOVECOT) is None
    rc_service(DOVECOT, "zap")


# --- /new: our fcgiwrap service, nginx connecting as on Alpine -----------------------

WEB = "http://127.0.0.1:8080"


def add_alpine_web_users():
    """The users Alpine's fcgiwrap and nginx packages create: fcgiwrap in group www-data;
    nginx in a group of its own and, as a second group, in www-data."""
    for argv in (["adduser", "--system", "--ingroup", "www-data", "--no-create-home",
                  "fcgiwrap"],
                 ["adduser", "--system", "--group", "--no-create-home", "nginx"],
                 ["adduser", "nginx", "www-data"]):
        result = run(*argv)
        assert result.returncode == 0, result.stderr


def write_nginx_config(relay, path):
    """nginx as Alpine's nginx.conf runs it (`user nginx;`), serving the relay's rendered
    /new location."""
    platform = SimpleNamespace(**{**vars(openrc_platform()),
                                  **{k: getattr(load_platform("alpine"), k)
                                     for k in ("fcgiwrap_socket", "fcgiwrap_service")}})
    [site] = [item.content for item in render_component("nginx", relay, platform)
              if "location = /new" in item.content]
    location = block(site, "location = /new")
    # Another program asked for through the same socket (as a second site could).
    other = location.replace(f"{platform.libexec_dir}/chatmail-newemail",
                             f"{platform.libexec_dir}/doveauth")
    path.write_text(
        f"user nginx;\npid /run/nginx-newemail.pid;\nerror_log {path.with_name('error.log')};\n"
        "events {}\n"
        "http {\n    access_log off;\n    server {\n        listen 127.0.0.1:8080;\n"
        f"        location = /new {{{location}}}\n"
        f"        location = /other {{{other}}}\n    }}\n}}\n")


def post(path, timeout=15):
    """POST PATH through nginx: (status, body)."""
    deadline = time.monotonic() + timeout
    while True:
        request = urllib.request.Request(WEB + path, data=b"", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="module")
def web(relay, tmp_path_factory):
    """Our chatmail-newemail service with Alpine's fcgiwrap path and users, and nginx
    passing /new to its socket."""
    add_alpine_web_users()
    # Alpine's fcgiwrap is /usr/bin/fcgiwrap, Debian's /usr/sbin/fcgiwrap.
    Path("/usr/bin/fcgiwrap").symlink_to("/usr/sbin/fcgiwrap")
    install_service("chatmail-newemail", relay.open_files)
    config = tmp_path_factory.mktemp("nginx") / "nginx.conf"
    write_nginx_config(relay, config)
    # nginx's master keeps what it inherits open: no pipes to wait for.
    result = subprocess.run(["nginx", "-c", str(config)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    error_log = config.with_name("error.log")
    assert result.returncode == 0, error_log.read_text()
    yield error_log
    run("nginx", "-c", str(config), "-s", "stop")
    rc_service("chatmail-newemail", "stop")


def test_new_account_through_nginx(web):
    result = rc_service("chatmail-newemail", "start")
    assert result.returncode == 0, result.stdout + result.stderr
    socket_path = Path(load_platform("alpine").fcgiwrap_socket)
    assert (socket_path.owner(), socket_path.group()) == ("fcgiwrap", "www-data")
    mode = socket_path.stat().st_mode
    # nginx connects through the group (write permission); others may not
    assert (mode & 0o060, mode & 0o007) == (0o060, 0)
    assert proc_status(daemon_pid("chatmail-newemail"))["NoNewPrivs"] == "1"
    status, body = post("/new")
    assert status == 200, body
    account = json.loads(body)
    assert account["email"].endswith(f"@{DOMAIN}")


def test_new_works_again_after_fcgiwrap_was_killed(web):
    assert rc_service("chatmail-newemail", "start").returncode == 0
    kill_and_wait_for_respawn("chatmail-newemail")
    status, body = post("/new")
    assert status == 200, body
    result = rc_service("chatmail-newemail", "stop")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not Path(load_platform("alpine").fcgiwrap_socket).exists()


def test_only_the_relays_cgi_runs(web):
    """fcgiwrap -p: a request for another program is refused."""
    assert rc_service("chatmail-newemail", "start").returncode == 0
    status, body = post("/other")
    assert status == 403, body
    # fcgiwrap -f: the CGI side's errors reach nginx's error log
    assert "The given script is not allowed to execute" in web.read_text()


# --- Postfix: Alpine's init script keeps no pid file ----------------------------------

# Stands in for Alpine's /etc/init.d/postfix, which also only runs the postfix command:
# no pid file, no supervisor, so OpenRC cannot see Postfix die.
POSTFIX_INITD = """#!/sbin/openrc-run
extra_started_commands="reload"
start() { ebegin "Starting postfix"; postfix start >/dev/null 2>&1; eend $?; }
stop() { ebegin "Stopping postfix"; postfix stop >/dev/null 2>&1; eend $?; }
reload() { ebegin "Reloading postfix"; postfix reload >/dev/null 2>&1; eend $?; }
"""
POSTFIX_PID_FILE = Path("/var/spool/postfix/pid/master.pid")


def alpine_platform():
    """Alpine's facts for Postfix and OpenDKIM, but the DNSSEC trust anchor where Debian's
    dns-root-data (pulled in by opendkim) puts it."""
    return SimpleNamespace(**{**vars(load_platform("alpine")),
                              "dns_root_key": load_platform("debian13").dns_root_key})


def configure_postfix_and_opendkim(relay, state_dir):
    """What `chatmail configure` does for Postfix and OpenDKIM on Alpine: the rendered
    files, and the settings applied on Postfix's own main.cf and master.cf (Alpine's
    package installs them as Debian's copies them here); then the steps of `chatmail
    configure` that make their directories, the DKIM key and the alias database (LMDB,
    as Alpine's Postfix has)."""
    platform = alpine_platform()
    # What chatmail-relay's pre-install does (with busybox's addgroup on Alpine): Postfix
    # reaches the milter socket in OpenDKIM's directory as a member of its group.
    assert run("adduser", "--quiet", "postfix", "opendkim").returncode == 0
    shutil.copy("/usr/share/postfix/main.cf.debian", "/etc/postfix/main.cf")
    shutil.copy("/usr/share/postfix/master.cf.dist", "/etc/postfix/master.cf")
    items = [*render_component("postfix", relay, platform),
             *render_component("opendkim", relay, platform)]
    apply_files(items, state_dir)
    apply_special_kinds(items, platform)
    configure(relay, platform, Host(), no_reload=True,
              steps=["directories", "dkim-key", "aliases"])


@pytest.fixture
def postfix(relay, tmp_path):
    """Postfix with the relay's configuration for Alpine, started by the stand-in init
    script."""
    configure_postfix_and_opendkim(relay, tmp_path)
    init = Path("/etc/init.d/postfix")
    init.write_text(POSTFIX_INITD)
    init.chmod(0o755)
    result = rc_service("postfix", "start")
    assert result.returncode == 0, result.stdout + result.stderr
    yield
    rc_service("postfix", "stop")


def postfix_master_pid():
    pid = int(POSTFIX_PID_FILE.read_text())
    return pid if Path(f"/proc/{pid}/comm").read_text().strip() == "master" else None


def bring_up_postfix(action):
    """What `chatmail configure`'s services step does with Postfix on OpenRC: forget a
    dead one, then, unless it runs, ACTION it. What it said."""
    said = []
    manager = OpenRC()
    forget_dead_postfix(load_platform("alpine"), manager, Host(), said.append)
    if not manager.is_active("postfix"):
        manager.do(action, "postfix")
    return said


@pytest.mark.parametrize("then", ["bring_up_start", "bring_up_reload"])
def test_a_dead_postfix_is_found_and_started_again(postfix, then):
    platform = load_platform("alpine")
    first = postfix_master_pid()
    assert first
    assert dead_postfix_finding(platform, Probes()) is None
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{first}").exists():  # until reaped
        assert time.monotonic() < deadline, "the killed master was not reaped"
        time.sleep(0.05)
    # What OpenRC cannot see: it still counts Postfix as started.
    assert rc_service("postfix", "status").returncode == 0
    assert "master process (pid" in dead_postfix_finding(platform, Probes()).detail
    # What the services step does: forget the dead Postfix, then start it, or, with a
    # changed configuration, reload it (refused while stopped), restarting instead.
    action = "start" if then == "bring_up_start" else "reload-or-restart"
    said = bring_up_postfix(action)
    assert said == ["postfix is not running, although OpenRC counts it as started: "
                    "starting it"]
    second = postfix_master_pid()
    assert second and second != first
    assert dead_postfix_finding(platform, Probes()) is None
    # With its master running, nothing to forget.
    assert bring_up_postfix("start") == []
    assert postfix_master_pid() == second


# --- mail through Postfix and OpenDKIM as configured for Alpine ------------------------

# Stands in for Alpine's /etc/init.d/opendkim, whose instance opendkim.chatmail the relay
# runs: /etc/conf.d/opendkim.chatmail gives command_args, to which the script adds the
# user and pid file; it requires the package's own configuration file. (Its dependency
# on net is left out: nothing provides net here.)
OPENDKIM_INITD = """#!/sbin/openrc-run
pidfile=/run/opendkim/opendkim.pid
command=/usr/sbin/opendkim
command_args="$command_args -u opendkim -P $pidfile"
required_files=/etc/opendkim/opendkim.conf
start_pre() { checkpath -d -o opendkim ${pidfile%/*}; }
"""
OPENDKIM = load_platform("alpine").opendkim_service


@pytest.fixture
def opendkim(postfix):
    """The relay's OpenDKIM instance, its script a link to the stand-in, as
    chatmail-relay-openrc installs it."""
    init = Path("/etc/init.d/opendkim")
    init.write_text(OPENDKIM_INITD)
    init.chmod(0o755)
    link = Path("/etc/init.d") / OPENDKIM
    if not link.is_symlink():
        link.symlink_to("opendkim")
    Path("/etc/opendkim").mkdir(exist_ok=True)
    shutil.copy("/etc/opendkim.conf", "/etc/opendkim/opendkim.conf")
    result = rc_service(OPENDKIM, "start")
    assert result.returncode == 0, result.stdout + result.stderr
    yield
    rc_service(OPENDKIM, "stop")


def encrypted_message(sender, recipient):
    """A message filtermail takes for encrypted: an OpenPGP packet sequence in PGP/MIME."""
    packets = bytes([0xC1, 12]) + bytes(12) + bytes([0xD2, 40, 1]) + bytes(39)
    return (f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: [...]\r\n"
            "MIME-Version: 1.0\r\nDate: Mon, 02 Jun 2025 10:00:00 +0000\r\n"
            f"Message-ID: <{time.monotonic_ns()}@test>\r\n"
            'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; '
            'boundary="b"\r\n\r\n--b\r\nContent-Type: application/pgp-encrypted\r\n\r\n'
            "Version: 1\r\n\r\n--b\r\nContent-Type: application/octet-stream\r\n\r\n"
            "-----BEGIN PGP MESSAGE-----\r\n\r\n" + base64.b64encode(packets).decode()
            + "\r\n-----END PGP MESSAGE-----\r\n\r\n--b--\r\n")


def wait_for_port(port, timeout=15):
    """Until something listens on PORT: filtermail counts as started once it runs, before
    it listens, and until then Postfix answers mail with 451."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on port {port}"
            time.sleep(0.1)


def send(port, sender, recipient, message, login=False, timeout=30):
    """Send with STARTTLS to PORT (after logging in as SENDER, which creates the account,
    with `login`), retrying while Postfix is not yet listening: None, or the refusal of
    the message as (code, text)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                smtp.starttls(context=self_signed_ok())
                if login:
                    smtp.login(sender, PASSWORD)
                smtp.sendmail(sender, [recipient], message)
                return None
        except (ConnectionRefusedError, smtplib.SMTPServerDisconnected):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
        except smtplib.SMTPDataError as refusal:
            return refusal.smtp_code, refusal.smtp_error.decode()


def wait_for_first_message(address, timeout=30):
    """The first message in ADDRESS's INBOX, once there."""
    with imaplib.IMAP4_SSL(*IMAPS, ssl_context=self_signed_ok(), timeout=10) as client:
        client.login(address, PASSWORD)
        deadline = time.monotonic() + timeout
        while int(client.select("INBOX")[1][0]) == 0:
            assert time.monotonic() < deadline, f"nothing arrived for {address}"
            time.sleep(0.2)
        return client.fetch("1", "(BODY.PEEK[])")[1][0][1].decode()


def test_mail_between_two_users_is_signed_and_delivered(dovecot, opendkim):
    """Submission with a Dovecot login, filtermail, reinjection through OpenDKIM and LMTP
    delivery, with Postfix's public services unchrooted and LMDB maps, as on Alpine."""
    for service in [DOVECOT, "filtermail"]:
        result = rc_service(service, "start")
        assert result.returncode == 0, result.stdout + result.stderr
    alice, bob = f"openrc101@{DOMAIN}", f"openrc102@{DOMAIN}"
    assert imaps_login(bob) == "OK"
    wait_for_port(dovecot.filtermail_smtp_port)
    # The relay strips DKIM-Signature before mail reaches a mailbox (lmtp_header_checks,
    # tests/config): kept here, to see the signature OpenDKIM added.
    assert run("postconf", "-e", "lmtp_header_checks=").returncode == 0
    assert run("postfix", "reload").returncode == 0
    try:
        assert send(587, alice, bob, encrypted_message(alice, bob), login=True) is None
        delivered = wait_for_first_message(bob)
    finally:
        for service in [DOVECOT, "filtermail"]:
            rc_service(service, "stop")
    assert dkim.verify(delivered.encode(), dnsfunc=dkim_record_of(DOMAIN)), delivered


def dkim_record_of(domain):
    """A DNS lookup answering only the DKIM TXT record of the key steps/dkim-key made."""
    der = subprocess.run(["openssl", "pkey", "-in", f"/etc/dkimkeys/{domain}.private",
                          "-pubout", "-outform", "DER"], capture_output=True, check=True).stdout
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)
    return lambda name, timeout=5: record \
        if name == f"opendkim._domainkey.{domain}.".encode() else None


OTHER_RELAY = "other.example"


@pytest.fixture
def other_relays_key(tmp_path):
    """A DKIM key of another relay's domain, its TXT record served by NSD on port 53 of
    this network namespace, which /etc/resolv.conf names (filtermail-incoming asks it)."""
    key = tmp_path / "dkim.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(key), "1024"], check=True,
                   capture_output=True)
    der = subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout", "-outform", "DER"],
                         capture_output=True, check=True).stdout
    record = f'sel._domainkey IN TXT "v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"\n'
    server = Nsd(tmp_path / "nsd", OTHER_RELAY, record, 53)
    Path("/etc/resolv.conf").write_text("nameserver 127.0.0.1\n")
    try:
        server.wait_ready()
        yield key.read_bytes()
    finally:
        server.stop()


def test_mail_from_another_relay_arrives_only_with_its_dkim_signature(dovecot, postfix,
                                                                       other_relays_key):
    """Port 25 (unchrooted on Alpine), filtermail-incoming checking the sender domain's
    DKIM signature with a real DNS lookup, reinjection and LMTP delivery."""
    for service in [DOVECOT, "filtermail-incoming"]:
        result = rc_service(service, "start")
        assert result.returncode == 0, result.stdout + result.stderr
    sender, recipient = f"someone@{OTHER_RELAY}", f"openrc103@{DOMAIN}"
    try:
        assert imaps_login(recipient) == "OK"
        wait_for_port(dovecot.filtermail_smtp_port_incoming)
        unsigned = encrypted_message(sender, recipient).encode()
        assert send(25, sender, recipient, unsigned) == (554, "5.7.1 No DKIM signature found")
        signed = dkim.sign(unsigned, b"sel", OTHER_RELAY.encode(), other_relays_key,
                           include_headers=[b"from", b"to", b"subject", b"date",
                                            b"message-id", b"content-type"]) + unsigned
        assert send(25, sender, recipient, signed) is None
        delivered = wait_for_first_message(recipient)
    finally:
        for service in [DOVECOT, "filtermail-incoming"]:
            rc_service(service, "stop")
    assert f"From: <{sender}>" in delivered


# --- a crashed service: OpenRC counts it as started -------------------------------------

CRASHY_INITD = """#!/sbin/openrc-run
command=/bin/sleep
command_args=1000
command_background=yes
pidfile=/run/crashy.pid
"""


def test_configure_starts_a_crashed_service_and_status_says_crashed(relay):
    """A daemon that start-stop-daemon started (nginx, OpenDKIM, crond on Alpine) and
    that died: OpenRC reports it crashed, and `rc-service X start` would only warn that
    it has already been started."""
    init = Path("/etc/init.d/crashy")
    init.write_text(CRASHY_INITD)
    init.chmod(0o755)
    try:
        assert rc_service("crashy", "start").returncode == 0
        first = int(Path("/run/crashy.pid").read_text())
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{first}").exists():  # until reaped
            assert time.monotonic() < deadline, "the killed process was not reaped"
            time.sleep(0.05)
        state = OpenRC().states(["crashy"])["crashy"]
        assert (state.active, state.text) == (False, "crashed")
        manager = OpenRC()
        assert not manager.is_active("crashy")
        manager.do("start", "crashy")
        second = int(Path("/run/crashy.pid").read_text())
        assert second != first and Path(f"/proc/{second}/comm").read_text() == "sleep\n"
        assert OpenRC().states(["crashy"])["crashy"].text == "started"
    finally:
        rc_service("crashy", "stop")
        init.unlink()
