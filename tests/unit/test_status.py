"""`chatmail status`: each probe on real files and programs of this host where they exist
(a listening socket in /proc/net/tcp, certificates made by openssl, a process whose binary
was replaced, dovecot --version); only systemd and rc-service, which do not run here,
answer through a stand-in."""

import shutil
import socket
import subprocess
import time
from types import SimpleNamespace

import pytest

from chatmaild.admin import status
from chatmaild.admin.components import dovecot
from chatmaild.admin.render import render_component
from chatmaild.admin.platform import load_platform
from chatmaild.admin.host import Completed, run_command
from chatmaild.admin.servicemanager import OpenRC, Systemd, UnitState

DAY = 86400


# -- listening ports ---------------------------------------------------------------------


def test_a_listening_socket_shows_in_proc_net_tcp():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert ("127.0.0.1", port) in status.listening_sockets(status.Probes().proc_net_tcp)
    assert ("127.0.0.1", port) not in status.listening_sockets(status.Probes().proc_net_tcp)


def test_a_listening_ipv6_socket_shows_in_proc_net_tcp6():
    try:
        sock = socket.socket(socket.AF_INET6)
        sock.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this host")
    with sock:
        sock.listen()
        port = sock.getsockname()[1]
        assert ("::1", port) in status.listening_sockets(status.Probes().proc_net_tcp)


def test_connected_sockets_are_not_listening():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        client_port = client.getsockname()[1]
        listening = status.listening_sockets(status.Probes().proc_net_tcp)
        client.close()
        accepted.close()
    assert ("127.0.0.1", client_port) not in listening


def proc_net_line(address, port):
    """A /proc/net/tcp line for a listening socket, as this host's kernel writes it."""
    import ipaddress
    import sys

    raw = ipaddress.ip_address(address).packed
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return (f"   0: {raw.hex().upper()}:{port:04X} {'0' * len(raw.hex())}:0000 0A "
            "00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n")


def write_proc_net(tmp_path, sockets):
    header = "  sl  local_address rem_address   st tx_queue rx_queue ...\n"
    tcp, tcp6 = tmp_path / "tcp", tmp_path / "tcp6"
    tcp.write_text(header + "".join(proc_net_line(a, p) for a, p in sockets if ":" not in a))
    tcp6.write_text(header + "".join(proc_net_line(a, p) for a, p in sockets if ":" in a))
    return (str(tcp), str(tcp6))


def test_written_lines_parse_like_the_kernels(tmp_path):
    paths = write_proc_net(tmp_path, [("0.0.0.0", 25), ("::", 993), ("127.0.0.1", 10080)])
    assert status.listening_sockets(paths) == {("0.0.0.0", 25), ("::", 993),
                                               ("127.0.0.1", 10080)}


ALL_PORTS = [("0.0.0.0", p) for p in (25, 465, 587, 143, 993, 443, 80)] + [
    ("::", p) for p in (25, 465, 587, 143, 993, 443, 80)] + [
    ("127.0.0.1", p) for p in (10080, 10081, 10025, 10026)]


def test_ports_all_listening(tmp_path, config):
    probes = status.Probes(proc_net_tcp=write_proc_net(tmp_path, ALL_PORTS))
    findings = status.check_ports(config, probes)
    assert [f.level for f in findings] == [status.OK] * 11
    assert "on 0.0.0.0, ::" in findings[0].detail


def test_ports_missing_or_only_on_loopback(tmp_path, config):
    sockets = [s for s in ALL_PORTS if s[1] not in (25, 10081)] + [("127.0.0.1", 25)]
    probes = status.Probes(proc_net_tcp=write_proc_net(tmp_path, sockets))
    failed = {f.name: f.detail for f in status.check_ports(config, probes)
              if f.level == status.FAIL}
    assert failed == {"25/tcp": "SMTP (Postfix): only on 127.0.0.1",
                      "10081/tcp": "incoming filter (filtermail-incoming): nobody listens"}


# -- certificate -------------------------------------------------------------------------


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=cwd, timeout=60)


@pytest.fixture
def certificates(tmp_path):
    """make(name, names=[...], days=N, ca=False) -> path of a certificate by openssl:
    self-signed, or issued by a test CA."""
    folder = tmp_path / "certs"
    folder.mkdir()
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-noenc",
            "-days", "3650", "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=Test CA",
            cwd=folder)

    def make(name, names, days=90, ca=False):
        san = "subjectAltName=" + ",".join(f"DNS:{n}" for n in names)
        if not ca:
            openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-noenc", "-days", str(days), "-keyout", f"{name}.key", "-out",
                    f"{name}.pem", "-subj", f"/CN={names[0]}", "-addext", san, cwd=folder)
        else:
            openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-noenc", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj",
                    f"/CN={names[0]}", "-addext", san, cwd=folder)
            openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                    "-days", str(days), "-copy_extensions", "copy", "-out", f"{name}.pem",
                    cwd=folder)
        return folder / f"{name}.pem"

    return make


def external_config(make_config, cert):
    return make_config("chat.example.org",
                       tls_external_cert_and_key=f"{cert} {cert.with_suffix('.key')}")


def cert_findings(config, now=None, platform="debian12"):
    probes = status.Probes(now=now or time.time)
    return {f.name: f
            for f in status.check_certificate(config, load_platform(platform), probes)}


def test_certificate_valid(make_config, certificates):
    cert = certificates("good", ["chat.example.org", "www.chat.example.org"], days=90, ca=True)
    [finding] = cert_findings(external_config(make_config, cert)).values()
    assert finding.level == status.OK
    assert "(89 days), issued by CN=Test CA" in finding.detail
    info = status.read_certificate(cert, "chat.example.org")
    assert abs(info.not_after - (time.time() + 90 * DAY)) < 120


def test_certificate_expiring_soon_and_expired(make_config, certificates):
    cert = certificates("good", ["chat.example.org"], days=20, ca=True)
    config = external_config(make_config, cert)
    assert cert_findings(config)["certificate"].level == status.OK
    soon = cert_findings(config, now=lambda: time.time() + 10 * DAY)["certificate"]
    assert soon.level == status.FAIL and "renew" in soon.hint
    expired = cert_findings(config, now=lambda: time.time() + 30 * DAY)["certificate"]
    assert expired.level == status.FAIL and expired.detail.startswith("expired on ")


def test_certificate_for_another_name(make_config, certificates):
    cert = certificates("other", ["other.example.net"], ca=True)
    findings = cert_findings(external_config(make_config, cert))
    assert findings["certificate name"].level == status.FAIL
    assert "not valid for chat.example.org" in findings["certificate name"].detail


def test_self_signed_placeholder_in_acme_mode_fails(make_config, certificates, monkeypatch):
    cert = certificates("bootstrap", ["chat.example.org"])
    config = make_config("chat.example.org")
    monkeypatch.setattr(config, "tls_cert_path", str(cert))
    findings = cert_findings(config)
    assert findings["certificate issuer"].level == status.FAIL
    assert "certbot has not obtained" in findings["certificate issuer"].detail
    assert findings["certificate issuer"].hint.endswith("and 'journalctl -u certbot'")
    # Alpine: the daily renewal job logs to syslog, and there is no journal.
    findings = cert_findings(config, platform="alpine")
    assert findings["certificate issuer"].hint.endswith(
        "and certbot's lines in /var/log/messages")


def test_self_signed_is_fine_for_an_underscore_domain(make_config, certificates, monkeypatch):
    cert = certificates("self", ["_chat.example.org"], days=36500)
    config = make_config("_chat.example.org")
    monkeypatch.setattr(config, "tls_cert_path", str(cert))
    assert [f.level for f in cert_findings(config).values()] == [status.OK]


def test_missing_and_unreadable_certificate(make_config, tmp_path):
    config = external_config(make_config, tmp_path / "none.pem")
    finding = cert_findings(config)["certificate"]
    assert finding.level == status.FAIL and "does not exist" in finding.detail
    assert "tls_external_cert_and_key" in finding.hint
    (tmp_path / "none.pem").write_text("not a certificate\n")
    finding = cert_findings(config)["certificate"]
    assert finding.level == status.FAIL and "cannot read" in finding.detail


# -- services ----------------------------------------------------------------------------


def systemctl_show(units):
    """What `systemctl show --property=...` prints for units given as
    {unit: (LoadState, ActiveState, SubState, UnitFileState)}."""
    blocks = []
    for unit, (load, active, sub, file_state) in units.items():
        blocks.append(f"Id={unit}\nLoadState={load}\nActiveState={active}\n"
                      f"SubState={sub}\nUnitFileState={file_state}\n")
    return "\n".join(blocks)


# What systemctl shows for an active unit of each kind but services ("running").
SUB_STATES = {"timer": "waiting", "socket": "listening"}


class FakeSystemctl:
    """Answers `systemctl show` like systemd 252 does; every unit not listed is running,
    except optional ones, which are not installed."""

    def __init__(self, **overrides):
        self.overrides = overrides
        self.calls = []

    def __call__(self, argv):
        self.calls.append(argv)
        assert argv[:2] == ["systemctl", "show"] and argv[3] == "--"
        units = {}
        for unit in argv[4:]:
            default = (("not-found", "inactive", "dead", "")
                       if unit in ("coturn.service", "unbound.service")
                       else ("loaded", "active", SUB_STATES.get(unit.rpartition(".")[2],
                                                                 "running"), "enabled"))
            units[unit] = self.overrides.get(unit, default)
        return Completed(0, systemctl_show(units))


def services(config, run, platform="debian12"):
    probes = status.Probes(run=run, postfix_pid_file="/nonexistent/master.pid")
    return {f.name: f
            for f in status.check_services(config, load_platform(platform), probes)}


def test_systemd_all_services_running(config):
    fake = FakeSystemctl()
    found = services(config, fake)
    assert len(fake.calls) == 1  # one systemctl for all units
    assert set(found) == {
        "doveauth", "lastlogin", "chatmail-metadata", "filtermail", "filtermail-incoming",
        "filtermail.socket", "filtermail-incoming.socket",
        "dovecot", "postfix@-", "nginx", "fcgiwrap.socket", "opendkim",
        "chatmail-expire.timer", "chatmail-fsreport.timer", "chatmail-backup.timer",
        "chatmail-dkim.timer", "certbot.timer"}
    assert all(f.level == status.OK for f in found.values())
    assert found["doveauth"].detail == "active (running)"
    assert found["filtermail.socket"].detail == "active (listening)"


def test_systemd_filter_down_while_its_socket_listens(config):
    """Its port accepts connections (systemd holds it), but no mail passes: status says
    which unit failed."""
    fake = FakeSystemctl(**{"filtermail.service": ("loaded", "failed", "failed", "enabled")})
    found = services(config, fake)
    assert found["filtermail.socket"].level == status.OK
    assert (found["filtermail"].level, found["filtermail"].detail) == (status.FAIL, "failed")


def test_systemd_failed_and_missing_services(config):
    fake = FakeSystemctl(**{
        "filtermail.service": ("loaded", "failed", "failed", "enabled"),
        "opendkim.service": ("not-found", "inactive", "dead", ""),
        # the admin runs coturn: then it must run
        "coturn.service": ("loaded", "inactive", "dead", "enabled"),
        # installed but switched off by the admin: not part of this relay
        "unbound.service": ("loaded", "inactive", "dead", "disabled"),
    })
    found = services(config, fake)
    assert (found["filtermail"].level, found["filtermail"].detail) == (status.FAIL, "failed")
    assert found["filtermail"].hint == "see 'journalctl -u filtermail'"
    assert (found["opendkim"].level, found["opendkim"].detail) == (status.FAIL, "not installed")
    assert found["coturn"].level == status.FAIL
    assert "unbound" not in found


def test_ipv4_relay_has_no_opendkim_and_no_certbot(make_config):
    found = services(make_config("192.0.2.7", iroh_relay=""), FakeSystemctl())
    assert "opendkim" not in found and "certbot.timer" not in found


def test_alpine_expects_its_own_service_names(config):
    """/new is our chatmail-newemail, OpenDKIM the opendkim.chatmail instance, and crond
    runs the daily jobs (and certbot's renewal)."""
    expected = dict(status.expected_services(config, load_platform("alpine")))
    for name in ("chatmail-newemail", "opendkim.chatmail", "crond", "postfix", "doveauth"):
        assert expected[name] is True
    assert not [name for name in expected if name.endswith((".timer", ".socket"))
                or name == "fcgiwrap"]


def test_systemd_not_running(config):
    def run(argv):
        return Completed(1, "", "System has not been booted with systemd as init system "
                         "(PID 1). Can't operate.")

    [finding] = services(config, run).values()
    assert finding.level == status.FAIL and "has not been booted with systemd" in finding.detail


def test_systemctl_show_parsing_of_a_not_found_unit():
    def run(argv):
        return Completed(0, systemctl_show({
            "nope.service": ("not-found", "inactive", "dead", ""),
            "postfix@-.service": ("loaded", "active", "running", "enabled-runtime")}))

    states = Systemd(run).states(["nope", "postfix@-"])
    assert states["nope"] == UnitState("nope", False, False, False, "not-found")
    assert states["postfix@-"] == UnitState("postfix@-", True, True, True, "active (running)")


def test_openrc_from_init_scripts_and_runlevels(tmp_path):
    init, levels = tmp_path / "init.d", tmp_path / "runlevels"
    (levels / "default").mkdir(parents=True)
    init.mkdir()
    for name in ("doveauth", "dovecot", "coturn"):
        (init / name).write_text("#!/sbin/openrc-run\n")
    for name in ("doveauth", "dovecot"):
        (levels / "default" / name).symlink_to(init / name)

    def rc_service(argv):
        name = argv[1]
        if name == "doveauth":
            return Completed(0, " * status: started\n")
        if name == "coturn":  # OpenRC 0.56 writes this one to stderr
            return Completed(32, "", " * status: crashed\n")
        return Completed(3, " * status: stopped\n")

    states = OpenRC(rc_service, init, levels).states(["doveauth", "dovecot", "coturn", "none"])
    assert states["doveauth"] == UnitState("doveauth", True, True, True, "started")
    assert states["dovecot"] == UnitState("dovecot", True, True, False, "stopped")
    assert states["coturn"].text == "crashed" and not states["coturn"].active
    assert states["coturn"].enabled is False and states["coturn"].exists
    assert states["none"].exists is False


def alpine_services(config, tmp_path, postfix_pid):
    """check_services on Alpine, where OpenRC calls every service started, and Postfix's
    pid file names POSTFIX_PID."""
    init, levels = tmp_path / "init.d", tmp_path / "runlevels"
    (levels / "default").mkdir(parents=True)
    init.mkdir()
    for name, _ in status.expected_services(config, load_platform("alpine")):
        (init / name).write_text("#!/sbin/openrc-run\n")
    pid_file = tmp_path / "master.pid"
    pid_file.write_text(f"{postfix_pid:>33}\n")  # as Postfix writes it
    probes = status.Probes(
        manager=OpenRC(lambda argv: Completed(0, " * status: started\n"), init, levels),
        postfix_pid_file=str(pid_file))
    found = status.check_services(config, load_platform("alpine"), probes)
    return {f.name: f for f in found}


def test_postfix_counted_started_after_its_master_died_fails(config, tmp_path):
    """Alpine's postfix init script keeps no pid file: OpenRC's "started" outlives a
    killed master."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    found = alpine_services(config, tmp_path, dead.pid)
    assert found["postfix"].level == status.FAIL
    assert found["postfix"].detail == \
        f"counted as running, but its master process (pid {dead.pid}) is gone"
    assert found["postfix"].hint == "run 'chatmail configure' to start it"
    assert found["chatmail-dovecot"].level == status.OK


def test_postfix_with_its_master_running_is_ok(config, tmp_path):
    # A process named master, as Postfix's is; another process with the pid (the pid was
    # reused) is not Postfix.
    master = tmp_path / "master"
    shutil.copy("/bin/sleep", master)
    for program, level in [(str(master), status.OK), ("sleep", status.FAIL)]:
        proc = subprocess.Popen([program, "30"])
        try:
            found = alpine_services(config, tmp_path / program.replace("/", "_"), proc.pid)
        finally:
            proc.kill()
            proc.wait()
        assert found["postfix"].level == level, program


# -- Postfix queue and Dovecot -------------------------------------------------------------


def test_postfix_queue_counts_messages():
    lines = '{"queue_name": "deferred", "queue_id": "4F1"}\n' * 3

    def run(argv):
        assert argv == ["postqueue", "-j"]
        return Completed(0, lines)

    finding = status.check_postfix_queue(status.Probes(run=run))
    assert (finding.level, finding.detail) == (status.INFO, "3 messages")


def test_postfix_queue_unknown_when_postfix_is_down():
    error = "postqueue: fatal: Queue report unavailable - mail system is down"

    def run(argv):
        return Completed(69, "", error + "\n")

    finding = status.check_postfix_queue(status.Probes(run=run))
    assert finding.detail == f"unknown ({error})"


def test_dovecot_build_of_this_host():
    """The real dovecot and dpkg-query: Debian's build, not ours."""
    if not shutil.which("dovecot") or not shutil.which("dpkg-query"):
        pytest.skip("needs dovecot-core")
    version = subprocess.run(["dovecot", "--version"], capture_output=True, text=True).stdout
    platform = load_platform("debian12")
    [finding] = status.check_dovecot_build(platform, status.Probes(
        dovecot_pid_file="/nonexistent", dovecot_instant_idle_plugin=NO_PLUGIN))
    assert finding.detail.startswith(version.strip() + ", package 1:2.3")
    expected = status.WARN if "+chatmail" not in finding.detail else status.INFO
    assert finding.level == expected


def test_dovecot_patched_build():
    def run(argv):
        if argv[0] == "dovecot":
            return Completed(0, "2.3.19.1 (9b53102964)\n")
        assert argv == ["dpkg-query", "-W", "-f=${Version}", "dovecot-core"]
        return Completed(0, "1:2.3.19.1+dfsg1-2.1+deb12u7+chatmail1")

    [finding] = status.check_dovecot_build(load_platform("debian12"), status.Probes(
        run=run, dovecot_pid_file="/nonexistent", dovecot_instant_idle_plugin=NO_PLUGIN))
    assert finding.level == status.INFO
    assert finding.detail == ("2.3.19.1 (9b53102964), package "
                              "1:2.3.19.1+dfsg1-2.1+deb12u7+chatmail1 (chatmail build), "
                              "instant IDLE: patched build")


@pytest.mark.parametrize("installed", [True, False])
def test_instant_idle_on_alpine_is_the_plugin_in_its_module_directory(tmp_path, installed):
    """Alpine's own Dovecot, with or without our plugin package (alpine/
    dovecot-chatmail-instant-idle), which installs into Alpine's module directory."""
    platform = load_platform("alpine")
    assert platform.dovecot_instant_idle_plugin == \
        "/usr/lib/dovecot/lib20_chatmail_instant_idle_plugin.so"
    module = tmp_path / "lib20_chatmail_instant_idle_plugin.so"
    if installed:
        module.write_bytes(b"\x7fELF")

    def run(argv):
        if argv[0] == "dovecot":
            return Completed(0, "2.4.5 (5a2bc7b0f6)\n")
        if argv[0] == "doveconf":
            return Completed(0, "chatmail_instant_idle = yes\nimap_metadata = yes\n")
        assert argv == ["apk", "list", "--installed", "dovecot"]
        return Completed(0, "dovecot-2.4.5-r0 x86_64 {dovecot} (LGPL-2.1-or-later) "
                            "[installed]\n")

    [finding] = status.check_dovecot_build(platform, status.Probes(
        run=run, dovecot_pid_file="/nonexistent", dovecot_instant_idle_plugin=str(module)))
    assert finding.detail.startswith("2.4.5 (5a2bc7b0f6), package 2.4.5-r0")
    if installed:
        assert finding.level == status.INFO
        assert finding.detail.endswith("instant IDLE: plugin")
    else:
        assert finding.level == status.WARN and "instant-IDLE plugin" in finding.detail
        assert "apk add dovecot-chatmail-instant-idle" in finding.hint


NO_PLUGIN = "/nonexistent/lib20_chatmail_instant_idle_plugin.so"
DEBIANS_DOVECOT = "1:2.3.19.1+dfsg1-2.1+deb12u7"


def debians_dovecot(argv):
    """Debian's own Dovecot build; doveconf is the real one."""
    if argv[0] == "dovecot":
        return Completed(0, "2.3.19.1 (9b53102964)\n")
    if argv[0] == "dpkg-query":
        return Completed(0, DEBIANS_DOVECOT)
    return run_command(argv)


def rendered_dovecot_config(config, platform, folder):
    """The relay's Dovecot files rendered for `platform`, written below `folder`; the
    path of the main file."""
    items = dovecot.dovecot_config_files(render_component("dovecot", config, platform),
                                         platform)
    copies = dovecot.write_scratch_copies(items, folder)
    return copies[dovecot.main_config(items).path]


@pytest.mark.parametrize("state", ["configured", "installed-only", "absent"])
def test_instant_idle_plugin_in_dovecots_configuration(make_config, tmp_path, state):
    """The plugin counts once it is installed and Dovecot's configuration (asked with the
    real doveconf) loads it for IMAP; Debian's Dovecot without it gets the warning that
    names the package."""
    if not shutil.which("doveconf"):
        pytest.skip("needs dovecot-core")
    module = tmp_path / "lib20_chatmail_instant_idle_plugin.so"
    platform = SimpleNamespace(**{**vars(load_platform()),
                                  "dovecot_instant_idle_plugin": str(module)})
    if state == "configured":
        module.write_bytes(b"")  # rendered while installed
    main = rendered_dovecot_config(make_config(), platform, tmp_path / "etc")
    if state == "installed-only":
        module.write_bytes(b"")  # installed after the last `chatmail configure`
    [finding] = status.check_dovecot_build(platform, status.Probes(
        run=debians_dovecot, dovecot_pid_file="/nonexistent", dovecot_config=main))
    label = f"2.3.19.1 (9b53102964), package {DEBIANS_DOVECOT}"
    if state == "configured":
        assert (finding.level, finding.detail) == (status.INFO, label + ", instant IDLE: plugin")
    elif state == "installed-only":
        assert finding.level == status.WARN and "installed but not configured" in finding.detail
        assert finding.hint == "run 'chatmail configure'"
    else:
        assert finding.level == status.WARN
        assert finding.detail == label + ": without the chatmail patch or the instant-IDLE plugin"
        assert "apt install dovecot-chatmail-instant-idle" in finding.hint


def test_a_running_replaced_binary_is_found(tmp_path):
    """As after an upgrade that did not restart Dovecot: the running binary is deleted."""
    binary = tmp_path / "dovecot"
    shutil.copy("/bin/sleep", binary)
    proc = subprocess.Popen([str(binary), "30"])
    try:
        pid_file = tmp_path / "master.pid"
        pid_file.write_text(f"{proc.pid}\n")
        probes = status.Probes(dovecot_pid_file=str(pid_file))
        platform = load_platform("debian12")
        assert status.check_dovecot_binary(probes, platform) is None
        binary.unlink()
        finding = status.check_dovecot_binary(probes, platform)
        assert finding.level == status.FAIL and f"pid {proc.pid}" in finding.detail
        assert finding.hint == "restart the dovecot service"
    finally:
        proc.kill()
        proc.wait()


# -- the whole report ----------------------------------------------------------------------


@pytest.fixture
def healthy_relay(make_config, certificates, tmp_path):
    cert = certificates("good", ["chat.example.org"], days=60, ca=True)
    config = external_config(make_config, cert)
    fake = FakeSystemctl()

    def run(argv):
        if argv[0] == "systemctl":
            return fake(argv)
        if argv[0] == "postqueue":
            return Completed(0, "")
        if argv[0] == "dovecot":
            return Completed(0, "2.3.19.1 (9b53102964)\n")
        if argv[0] == "dpkg-query":
            return Completed(0, "1:2.3.19.1+dfsg1-2.1+deb12u7+chatmail1")
        return run_command(argv)  # openssl: the real one

    probes = status.Probes(run=run, proc_net_tcp=write_proc_net(tmp_path, ALL_PORTS),
                           dovecot_pid_file=str(tmp_path / "none.pid"),
                           postfix_pid_file=str(tmp_path / "none.pid"))
    return config, probes, fake


def test_healthy_relay_exits_0(healthy_relay):
    config, probes, _ = healthy_relay
    out = []
    assert status.main(config, load_platform("debian12"), probes, out=out.append) == 0
    report = out[0]
    assert report.startswith(f"chatmail relay chat.example.org ({config.inipath})")
    for section in ("Configuration", "Services", "Ports", "Mail"):
        assert f"\n{section}\n" in report
    assert "No problems found." in report and "FAIL" not in report


def test_unhealthy_relay_lists_problems_and_exits_1(healthy_relay):
    config, probes, fake = healthy_relay
    fake.overrides["doveauth.service"] = ("loaded", "failed", "failed", "enabled")
    out = []
    assert status.main(config, load_platform("debian12"), probes, out=out.append) == 1
    report = out[0]
    assert "  FAIL  doveauth                 failed" in report
    assert "Problems:\n  - doveauth: failed (see 'journalctl -u doveauth')" in report
    assert "No problems found." not in report


def test_status_command_on_this_host(make_ini):
    """Without systemd as PID 1 the command still reports, and fails."""
    from .test_cli import run_chatmail

    result = run_chatmail("--config", make_ini("chat.example.org"), "status")
    assert result.returncode == 1, result.stderr
    assert result.stdout.startswith("chatmail relay chat.example.org")
    assert "Problems:" in result.stdout and "Traceback" not in result.stderr


def test_config_summary_shows_where_the_certificate_link_leads(make_config, certificates,
                                                               monkeypatch, tmp_path):
    cert = certificates("live", ["chat.example.org"], ca=True)
    link = tmp_path / "fullchain.pem"
    link.symlink_to(cert)
    config = make_config("chat.example.org")
    monkeypatch.setattr(config, "tls_cert_path", str(link))
    found = {f.name: f for f in status.check_config(config)}
    assert found["TLS mode"].detail == f"acme ({link} -> {cert})"
    assert found["accounts"].detail == f"0 in {config.mailboxes_dir}"
