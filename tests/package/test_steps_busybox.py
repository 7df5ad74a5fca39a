"""`chatmail configure` on Alpine: its steps run against Alpine's minirootfs, where every
command runs with chroot, so that busybox's tools and ash answer, not Debian's; the
shell steps run as Alpine runs them. rc-service is not in the minirootfs (tests/openrc
runs the real OpenRC); a stand-in records the calls and, as OpenRC does, refuses `status`
and `reload` for a service that was not started, and forgets a service on `zap`."""

import contextlib
import io
import shutil
import socket
import stat
import sys

import pytest

from chatmaild.admin.configure import ConfigureFailed, configure
from chatmaild.admin.host import Completed, Host
from chatmaild.admin.platform import load_platform
from chatmaild.admin.services import relay_services
from chatmaild.config import default_config_text, read_config
from tests.conftest import REPO, parse_syslog
from tests.package.alpine_root import PATH
from tests.package.conftest import enabled_services, write_relay_services

DOMAIN = "chat.example.org"
DATA_DIR = "/usr/share/chatmail-relay"
INI = "/etc/chatmail/chatmail.ini"
RELAY_SERVICES = relay_services()

RC_SERVICE = """#!/bin/sh
# No service has crashed here: --ifcrashed does nothing.
case $1 in --ifcrashed) exit 0 ;; esac
echo "$*" >>/tmp/rc-service.calls
case $1 in --quiet) shift ;; esac
case $2 in
status|reload) grep -qx "$1" /tmp/rc-service.started ;;
start|restart) echo "$1" >>/tmp/rc-service.started ;;
stop|zap) sed -i "/^$1\\$/d" /tmp/rc-service.started ;;
esac
"""


@pytest.fixture
def alpine(alpine_root):
    """The minirootfs with the users Alpine's packages make (postfix, opendkim; vmail by
    our pre-install), our shell steps installed and a chatmail.ini."""
    alpine_root.add_dependency_users()
    shutil.copy(REPO / "alpine" / "chatmail-relay" / "chatmail-relay.pre-install",
                alpine_root.host_path("/tmp/pre-install"))
    assert alpine_root.run("/bin/sh", "/tmp/pre-install").returncode == 0
    shutil.copytree(REPO / "steps", alpine_root.host_path(DATA_DIR + "/steps"))
    ini = alpine_root.host_path(INI)
    ini.parent.mkdir(parents=True)
    ini.write_text(default_config_text(DOMAIN))
    stand_in = alpine_root.host_path("/usr/local/bin/rc-service")
    stand_in.parent.mkdir(parents=True, exist_ok=True)
    stand_in.write_text(RC_SERVICE)
    stand_in.chmod(0o755)
    alpine_root.host_path("/tmp/rc-service.started").touch()
    # What OpenRC writes when it boots the system into a runlevel.
    softlevel = alpine_root.host_path("/run/openrc/softlevel")
    softlevel.parent.mkdir(parents=True, exist_ok=True)
    softlevel.write_text("default\n")
    return alpine_root


def alpine_host(alpine):
    """The minirootfs as the Host `chatmail configure` works on: its files, its users, its
    commands run with chroot."""
    def run(argv, timeout=30, show=False, env=None):
        result = alpine.run(*argv, env={**(env or {}), "PATH": PATH})
        if show:
            sys.stdout.write(result.stdout)
            sys.stderr.write(result.stderr)
        return Completed(result.returncode, result.stdout, result.stderr)

    return Host(alpine.path, run, DATA_DIR)


def run_step(alpine, name, reload=(), platform="alpine"):
    """(output, rc-service calls, the ConfigureFailed or None) of `chatmail configure`'s
    step NAME in the minirootfs; reload: what `chatmail configure --reload` asks for."""
    config = read_config(alpine.host_path(INI))
    alpine.host_path("/tmp/rc-service.calls").write_text("")
    out = io.StringIO()
    failed = None
    with contextlib.redirect_stdout(out):
        try:
            configure(config, load_platform(platform), alpine_host(alpine), reload=reload,
                      steps=[name])
        except ConfigureFailed as exc:
            failed = exc
    output = out.getvalue().removeprefix(f"chatmail configure: {name}\n")
    calls = alpine.host_path("/tmp/rc-service.calls").read_text().splitlines()
    return output, calls, failed


def run_ok(alpine, name, reload=()):
    output, calls, failed = run_step(alpine, name, reload)
    assert failed is None, f"{failed}\n{output}"
    return output, calls


def owner_and_mode(alpine, path):
    info = alpine.host_path(path).stat()
    users = {int(fields[2]): fields[0] for fields in
             (line.split(":") for line in
              alpine.host_path("/etc/passwd").read_text().splitlines())}
    return users.get(info.st_uid, str(info.st_uid)), stat.S_IMODE(info.st_mode)


def test_directories_step_makes_the_relay_directories(alpine):
    run_ok(alpine, "directories")
    platform = load_platform("alpine")
    config = read_config(alpine.host_path(INI))
    assert owner_and_mode(alpine, config.mailboxes_dir) == ("vmail", 0o700)
    assert owner_and_mode(alpine, platform.vmail_home) == ("vmail", 0o755)
    assert owner_and_mode(alpine, f"{platform.state_dir}/reports") == ("vmail", 0o750)
    assert owner_and_mode(alpine, platform.dkim_key_dir) == ("opendkim", 0o750)
    assert owner_and_mode(alpine, f"{platform.postfix_queue_dir}/private") == \
        ("postfix", 0o700)
    run_ok(alpine, "directories")  # idempotent


def test_directories_step_leaves_an_existing_parent_alone(alpine):
    ini = alpine.host_path(INI)
    ini.write_text(default_config_text(DOMAIN, mailboxes_dir="/srv/mail"))
    alpine.host_path("/srv").mkdir(mode=0o755, exist_ok=True)
    before = owner_and_mode(alpine, "/srv")
    run_ok(alpine, "directories")
    assert owner_and_mode(alpine, "/srv") == before
    assert owner_and_mode(alpine, "/srv/mail") == ("vmail", 0o700)


def test_kernel_limits_step_raises_what_is_lower_and_nothing_else(alpine):
    """In the minirootfs's (unmounted) /proc/sys: the inotify instances the kernel allows
    vmail (128 by default) are raised to what sysctl.d/60-chatmail-relay.conf says; more
    is kept, and an admin's file of the same name in /etc/sysctl.d counts instead of
    ours."""
    platform = load_platform("alpine")
    ours = alpine.host_path(f"{platform.sysctl_dir}/60-chatmail-relay.conf")
    ours.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "sysctl.d" / "60-chatmail-relay.conf", ours)
    limit = alpine.host_path("/proc/sys/fs/inotify/max_user_instances")
    limit.parent.mkdir(parents=True)

    limit.write_text("128\n")
    out, _ = run_ok(alpine, "kernel-limits")
    assert limit.read_text().strip() == "65535"
    assert out == "chatmail: raised fs.inotify.max_user_instances from 128 to 65535\n"
    assert run_ok(alpine, "kernel-limits")[0] == ""  # idempotent

    limit.write_text("100000\n")
    run_ok(alpine, "kernel-limits")
    assert limit.read_text().strip() == "100000"

    admins = alpine.host_path(f"{platform.sysctl_admin_dir}/60-chatmail-relay.conf")
    admins.parent.mkdir(parents=True, exist_ok=True)
    admins.write_text("fs.inotify.max_user_instances = 200000\n")
    run_ok(alpine, "kernel-limits")
    assert limit.read_text().strip() == "200000"


def test_acme_step_without_certbot_says_what_to_install(alpine):
    out, _ = run_ok(alpine, "acme-certificate")
    assert "certbot is not installed" in out and "Install certbot" in out


def services_calls(calls):
    """The calls that act (not the --quiet questions)."""
    return [call for call in calls if not call.startswith("--quiet ")]


def test_services_step_starts_everything_then_only_what_changed(alpine):
    run_ok(alpine, "directories")
    _, calls = run_ok(alpine, "services")
    platform = load_platform("alpine")
    # First run: the relay's services are new to this chatmail.ini, so reloaded, which
    # fails while they are stopped: restarted; the daemons are started, and crond, which
    # runs the daily jobs.
    assert platform.relay_timers == "crond"
    assert services_calls(calls) == \
        [f"{service} {action}" for service in RELAY_SERVICES
         for action in ("reload", "restart")] + \
        [f"{daemon} start" for daemon in [platform.dovecot_service, platform.opendkim_service,
                                          "postfix",
                                          "nginx", platform.fcgiwrap_service, "crond"]]
    # Nothing changed: all running, nothing to do.
    _, calls = run_ok(alpine, "services")
    assert services_calls(calls) == []
    # A changed chatmail.ini reloads the relay's own services; one asked for reloads too
    # (`--reload dovecot`: the service that runs Dovecot here).
    ini = alpine.host_path(INI)
    ini.write_text(ini.read_text() + "max_user_send_per_minute = 61\n")
    _, calls = run_ok(alpine, "services", reload=["postfix", "dovecot"])
    assert services_calls(calls) == \
        [f"{service} reload" for service in RELAY_SERVICES] + \
        [f"{platform.dovecot_service} reload", "postfix reload"]


def test_a_restart_that_failed_is_done_by_the_next_run(alpine):
    """A unit drop-in changed: the restart it needs is remembered until it is done."""
    run_ok(alpine, "directories")
    run_ok(alpine, "services")
    state = alpine.host_path("/var/lib/chatmail-relay/configure-state.json")
    text = state.read_text()
    state.write_text(text.replace('"pending_restarts": []', '"pending_restarts": ["nginx"]'))
    stand_in = alpine.host_path("/usr/local/bin/rc-service")
    stand_in.write_text(RC_SERVICE.replace("# No service", '[ "$1 $2" = "nginx restart" ] '
                                           "&& exit 1\n# No service"))
    out, calls, failed = run_step(alpine, "services")
    assert "nginx restart" in str(failed) and "nothing after this step was done" in str(failed)
    stand_in.write_text(RC_SERVICE)
    out, calls = run_ok(alpine, "services")
    assert services_calls(calls) == ["nginx restart"]
    _, calls = run_ok(alpine, "services")
    assert services_calls(calls) == []


def test_services_step_starts_a_postfix_that_died_behind_openrcs_back(alpine):
    """Alpine's postfix init script keeps no pid file: OpenRC still calls Postfix started
    once its master died. Postfix's own pid file names a process that is gone."""
    run_ok(alpine, "directories")
    run_ok(alpine, "services")
    pid_file = alpine.host_path("/var/spool/postfix/pid/master.pid")
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(f"{4194304:>33}\n")  # above any pid Linux hands out
    out, calls = run_ok(alpine, "services")
    assert "postfix is not running, although OpenRC counts it as started" in out
    assert [call for call in calls if "postfix" in call] == \
        ["--quiet postfix status", "--quiet postfix zap", "--quiet postfix status",
         "postfix start"]
    assert services_calls(calls) == ["postfix start"]
    # Without a pid file nothing tells that Postfix died: OpenRC is believed.
    pid_file.unlink()
    out, calls = run_ok(alpine, "services")
    assert "postfix" not in out and "--quiet postfix zap" not in calls


def test_services_step_without_openrc_says_what_is_missing(alpine):
    """As in a container: the packages installed, no OpenRC."""
    run_ok(alpine, "directories")
    alpine.host_path("/usr/local/bin/rc-service").unlink()
    _, _, failed = run_step(alpine, "services")
    assert str(failed).startswith(
        "services: rc-service not found: the relay's services need OpenRC (apk add openrc, "
        "then boot with it)\n")
    # The same check for systemd (Debian in a container without it).
    _, _, failed = run_step(alpine, "services", platform="debian13")
    assert str(failed).startswith(
        "services: systemctl not found: the relay's services need systemd running\n")


def test_in_a_chroot_configure_leaves_services_and_kernel_limits_to_the_boot(alpine):
    """An image build or piuparts: the service manager is installed but did not boot
    the system, and /proc/sys is the build host's. configure writes the files and
    succeeds; the services and the limits come with the first boot."""
    run_ok(alpine, "directories")
    alpine.host_path("/run/openrc/softlevel").unlink()
    limit = alpine.host_path("/proc/sys/fs/inotify/max_user_instances")
    limit.parent.mkdir(parents=True, exist_ok=True)
    limit.write_text("128\n")
    out, calls = run_ok(alpine, "kernel-limits")
    assert out == ("chatmail: not raising kernel limits here: they apply when the system "
                   "boots\n")
    assert limit.read_text() == "128\n"
    out, calls = run_ok(alpine, "services")
    assert out == ("chatmail: OpenRC did not boot this system (a chroot, an image build or "
                   "a container without it): the relay's services start when it boots\n")
    assert calls == []
    # systemd installed, not running (no /run/systemd/system), as in Debian's chroots
    systemctl = alpine.host_path("/usr/local/bin/systemctl")
    systemctl.write_text("#!/bin/sh\nexit 1\n")
    systemctl.chmod(0o755)
    output, _, failed = run_step(alpine, "services", platform="debian13")
    assert failed is None and output == (
        "chatmail: systemd is not running here (a chroot or an image build): the relay's "
        "services start when it boots\n")


# -- daily jobs: busybox crond runs them as root, busybox su and nice drop to vmail ------

JOB_STAND_IN = """#!/bin/sh
{ id -un; umask; nice; echo "$*"; } >/tmp/job.out
echo "a line on stdout"
echo "a line on stderr" >&2
"""


@contextlib.contextmanager
def syslog(alpine):
    """What busybox's logger sends to /dev/log in the minirootfs: a list of the messages
    (priority and tag included), filled when the block ends."""
    path = alpine.host_path("/dev/log")
    messages = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        try:
            yield messages
            sock.settimeout(0.5)
            while True:
                messages.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
        finally:
            path.unlink()


@pytest.mark.parametrize("job, args", [
    ("chatmail-expire", f"{INI} -v --remove"),
    ("chatmail-fsreport",
     f"{INI} --textfile /var/lib/chatmail-relay/metrics/fsreport.prom"),
])
def test_daily_job_runs_as_vmail_with_busybox_su(alpine, job, args):
    """vmail's shell is /sbin/nologin (pre-install): busybox su must still run the job,
    keeping the private umask, at low priority."""
    periodic = alpine.host_path(f"/etc/periodic/daily/{job}")
    periodic.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "alpine" / f"{job}.periodic", periodic)
    program = alpine.host_path(f"/usr/libexec/chatmail/{job}")
    program.parent.mkdir(parents=True, exist_ok=True)
    program.write_text(JOB_STAND_IN)
    program.chmod(0o755)
    with syslog(alpine) as messages:
        result = alpine.run("/bin/sh", f"/etc/periodic/daily/{job}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert alpine.host_path("/tmp/job.out").read_text().splitlines() == \
        ["vmail", "0077", "10", args]
    # busybox crond would drop the job's output: it goes to syslog, as daemon.info (30).
    # (busybox su logs the change of user itself, to auth.)
    assert [line for line in map(parse_syslog, messages) if line[1] != "su"] == \
        [(30, job, "a line on stdout"), (30, job, "a line on stderr")]
    if job == "chatmail-fsreport":
        assert owner_and_mode(alpine, "/var/lib/chatmail-relay/metrics") == ("vmail", 0o755)


def test_daily_certbot_renewal_reports_to_syslog(alpine):
    periodic = alpine.host_path("/etc/periodic/daily/chatmail-certbot-renew")
    periodic.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "alpine" / "chatmail-certbot-renew.periodic", periodic)
    certbot = alpine.host_path("/usr/local/bin/certbot")
    certbot.write_text('#!/bin/sh\necho "$*" >/tmp/certbot.args\n'
                       'echo "Failed to renew certificate chat.example.org" >&2\n')
    certbot.chmod(0o755)
    # Before certbot has any certificate: nothing to renew.
    result = alpine.run("/bin/sh", "/etc/periodic/daily/chatmail-certbot-renew")
    assert result.returncode == 0 and not alpine.host_path("/tmp/certbot.args").exists()
    alpine.host_path("/etc/letsencrypt/renewal").mkdir(parents=True)
    with syslog(alpine) as messages:
        result = alpine.run("/bin/sh", "/etc/periodic/daily/chatmail-certbot-renew")
    assert result.returncode == 0, result.stdout + result.stderr
    assert alpine.host_path("/tmp/certbot.args").read_text() == "renew --quiet\n"
    assert list(map(parse_syslog, messages)) == \
        [(30, "certbot", "Failed to renew certificate chat.example.org")]


# -- the runlevel: alpine/enable-services, run by post-install and post-upgrade ---------

RC_UPDATE = """#!/bin/sh
case $1 in
add) mkdir -p "/etc/runlevels/$3" && ln -s "/etc/init.d/$2" "/etc/runlevels/$3/$2" ;;
del) rm -f /etc/runlevels/*/"$2" ;;
esac
"""
ENABLE_SERVICES = "/usr/share/chatmail-relay/enable-services"


def enabled(alpine):
    runlevel = alpine.host_path("/etc/runlevels/default")
    return sorted(path.name for path in runlevel.iterdir()) if runlevel.exists() else []


@pytest.fixture
def with_runlevels(alpine):
    """ALPINE with enable-services and the list it reads installed, and an rc-update
    that makes the links."""
    stand_in = alpine.host_path("/usr/local/bin/rc-update")
    stand_in.write_text(RC_UPDATE)
    stand_in.chmod(0o755)
    shutil.copy(REPO / "alpine" / "enable-services", alpine.host_path(ENABLE_SERVICES))
    write_relay_services(alpine.host_path(ENABLE_SERVICES).parent)
    alpine.host_path("/etc/init.d").mkdir(parents=True, exist_ok=True)
    return alpine


def test_upgrade_enables_a_new_service_but_not_one_the_admin_took_out(with_runlevels):
    alpine = with_runlevels
    services = enabled_services()
    init_d = alpine.host_path("/etc/init.d")
    # The version installed first has no chatmail-newemail yet.
    for service in services:
        if service != "chatmail-newemail":
            (init_d / service).write_text("#!/sbin/openrc-run\n")
    assert alpine.run("/bin/sh", ENABLE_SERVICES, "--all").returncode == 0
    assert enabled(alpine) == sorted(set(services) - {"chatmail-newemail"})
    # The admin runs another cron daemon; an upgrade brings chatmail-newemail.
    assert alpine.run("rc-update", "del", "crond").returncode == 0
    (init_d / "chatmail-newemail").write_text("#!/sbin/openrc-run\n")
    assert alpine.run("/bin/sh", ENABLE_SERVICES).returncode == 0
    assert enabled(alpine) == sorted(set(services) - {"crond"})
    # Installed anew (after `apk del`): every service again.
    assert alpine.run("/bin/sh", ENABLE_SERVICES, "--all").returncode == 0
    assert enabled(alpine) == sorted(services)


def test_configure_enables_coturn_installed_later_unless_the_admin_took_it_out(
        with_runlevels):
    """Alpine's coturn package enables nothing: the first `chatmail configure` that finds
    it starts it and puts it into the runlevel, so that TURN survives a reboot."""
    alpine = with_runlevels
    assert alpine.run("/bin/sh", ENABLE_SERVICES, "--all").returncode == 0
    run_ok(alpine, "directories")
    run_ok(alpine, "services")
    assert "turnserver" not in enabled(alpine)
    service = load_platform("alpine").coturn_service
    alpine.host_path(f"/etc/init.d/{service}").write_text("#!/sbin/openrc-run\n")
    program = alpine.host_path("/usr/bin/turnserver")
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    _, calls = run_ok(alpine, "services")
    assert f"{service} start" in calls
    assert service in enabled(alpine)
    assert alpine.run("rc-update", "del", service).returncode == 0
    run_ok(alpine, "services")
    assert service not in enabled(alpine)


def test_configure_stops_the_dovecot_packages_own_service(with_runlevels):
    """chatmail-dovecot runs Dovecot on Alpine; the package's service would take its
    ports, whether started or only enabled."""
    alpine = with_runlevels
    alpine.host_path("/etc/init.d/dovecot").write_text("#!/sbin/openrc-run\n")
    assert alpine.run("rc-update", "add", "dovecot", "default").returncode == 0
    alpine.host_path("/tmp/rc-service.started").write_text("dovecot\n")
    run_ok(alpine, "directories")
    out, calls = run_ok(alpine, "services")
    assert "dovecot stop" in calls
    assert "stopping dovecot: the relay runs Dovecot as chatmail-dovecot" in out
    assert "dovecot" not in enabled(alpine)
    assert "chatmail-dovecot start" in calls
