"""The systemd units of chatmail-relay: the relay's services' units, generated from
conf/services.toml (chatmaild/admin/units.py) as debian/rules does, and the daily jobs'
(debian/chatmail-relay.<unit>.service|timer). They start the services python3-chatmaild
installs with arguments those services accept, on the sockets Dovecot's configuration
names, as the user Dovecot's processes run as, as the table says; the package ships
them; systemd-analyze accepts them."""

import configparser
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chatmaild.admin.platform import load_platform
from chatmaild.admin.services import read_services, relay_services, relay_sockets
from chatmaild.config import SETTINGS
from tests.conftest import REPO
from tests.package.conftest import SYSTEMD_PREFIX as PREFIX
from tests.package.test_deb import deb_named

DEBIAN = REPO / "debian"
INI = "/etc/chatmail/chatmail.ini"
LIBEXEC = "/usr/libexec/chatmail"
TEXTFILE = "/var/lib/chatmail-relay/metrics/fsreport.prom"

# unit -> its ExecStart, as the service expects to be called (upstream's arguments)
EXEC_START = {
    "doveauth.service": f"{LIBEXEC}/doveauth /run/doveauth/doveauth.socket {INI}",
    "lastlogin.service": f"{LIBEXEC}/lastlogin /run/chatmail-lastlogin/lastlogin.socket {INI}",
    "chatmail-metadata.service":
        f"{LIBEXEC}/chatmail-metadata /run/chatmail-metadata/metadata.socket {INI}",
    "filtermail.service": f"{LIBEXEC}/filtermail {INI} outgoing",
    "filtermail-incoming.service": f"{LIBEXEC}/filtermail {INI} incoming",
    "chatmail-expire.service": f"{LIBEXEC}/chatmail-expire {INI} -v --remove",
    "chatmail-fsreport.service": f"{LIBEXEC}/chatmail-fsreport {INI} --textfile {TEXTFILE}",
}
DICT_SERVICES = ["doveauth.service", "lastlogin.service", "chatmail-metadata.service"]
# The Dovecot settings that name each dict socket, as rendered for each Dovecot version.
DOVECOT_DICT_USERS = {
    "2.3": {
        "doveauth.service": "uri = proxy:{}:auth",
        "lastlogin.service": "last_login_dict = proxy:{}:lastlogin",
        "chatmail-metadata.service": "mail_attribute_dict = proxy:{}:metadata",
    },
    "2.4": {
        "doveauth.service": 'local DOVEAUTH_SOCKET = "{}"',
        "lastlogin.service": "dict_proxy_socket_path = {}\n    dict_proxy_name = lastlogin",
        "chatmail-metadata.service":
            "dict_proxy_socket_path = {}\n    dict_proxy_name = metadata",
    },
}
# A platform with each Dovecot version.
DOVECOT_PLATFORMS = {"2.3": "debian12", "2.4": "debian13"}
TIMERS = {"chatmail-expire.timer": "*-*-* 00:02:00", "chatmail-fsreport.timer": "*-*-* 08:02:00",
          "chatmail-backup.timer": "*-*-* 03:12:00", "chatmail-dkim.timer": "*-*-* 04:22:00"}
# The daily jobs that run as root (they read every key), with the admin command.
BACKUP_UNIT, BACKUP_EXEC_START = "chatmail-backup.service", "/usr/bin/chatmail backup --daily"
DKIM_UNIT, DKIM_EXEC_START = "chatmail-dkim.service", "/usr/bin/chatmail dkim daily"
# Timers that catch up on a day the relay was down.
PERSISTENT_TIMERS = ("chatmail-fsreport.timer", "chatmail-backup.timer", "chatmail-dkim.timer")
# socket -> the chatmail.ini setting of its port (socket activation of the filters)
SOCKETS = {"filtermail.socket": "filtermail_smtp_port",
           "filtermail-incoming.socket": "filtermail_smtp_port_incoming"}


def unit_files(systemd_dir):
    """The daily jobs' units, written by hand, and the generated ones."""
    return [path for directory in (DEBIAN, systemd_dir)
            for kind in ("service", "timer", "socket")
            for path in sorted(directory.glob(f"{PREFIX}*.{kind}"))]


def unit_name(path):
    return path.name[len(PREFIX):]


def read_unit(path):
    parser = configparser.RawConfigParser(strict=True, delimiters=("=",),
                                          comment_prefixes=("#", ";"),
                                          inline_comment_prefixes=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(path.read_text(), source=str(path))
    return parser


@pytest.fixture(scope="module")
def units(systemd_dir):
    return {unit_name(path): read_unit(path) for path in unit_files(systemd_dir)}


def console_scripts():
    """name -> 'module:function' from setup.cfg, what python3-chatmaild installs."""
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    scripts = {}
    for line in parser["options.entry_points"]["console_scripts"].strip().splitlines():
        name, _, target = line.partition("=")
        scripts[name.strip()] = target.strip()
    return scripts


def libexec_daemons():
    """The services debian/rules moves to /usr/libexec/chatmail: every console script but
    the admin command."""
    text = (DEBIAN / "rules").read_text()
    admin = re.search(r"^ADMIN_COMMAND\s*=\s*(\S+)$", text, re.M).group(1)
    return [name for name in console_scripts() if name != admin]


def test_every_unit_is_there(units):
    assert set(units) == set(EXEC_START) | set(TIMERS) | set(SOCKETS) | {BACKUP_UNIT, DKIM_UNIT}


@pytest.mark.parametrize("unit", sorted(EXEC_START))
def test_exec_start_runs_a_packaged_service(units, unit):
    exec_start = units[unit]["Service"]["ExecStart"]
    assert exec_start == EXEC_START[unit]
    binary = Path(shlex.split(exec_start)[0])
    assert binary.parent == Path(LIBEXEC)
    assert binary.name in libexec_daemons()
    assert binary.name in console_scripts()


@pytest.mark.parametrize("unit", sorted(EXEC_START))
def test_runs_as_vmail_with_private_files(units, unit):
    service = units[unit]["Service"]
    for platform in ("debian12", "debian13"):
        vmail = load_platform(platform).vmail_user
        assert (service["User"], service["Group"]) == (vmail, vmail)
    assert service["UMask"] == "0077"
    assert units[unit]["Unit"]["ConditionPathExists"] == INI


def rendered_dovecot(config, version):
    """Dovecot's configuration files, as `chatmail configure` writes them, in one text."""
    from chatmaild.admin.render import render_component

    platform = load_platform(DOVECOT_PLATFORMS[version])
    assert platform.dovecot_version == version
    return "\n".join(item.content for item in render_component("dovecot", config, platform))


@pytest.mark.parametrize("version", sorted(DOVECOT_DICT_USERS))
@pytest.mark.parametrize("unit", DICT_SERVICES)
def test_dict_socket_is_where_dovecot_looks(units, unit, config, version):
    service = units[unit]["Service"]
    socket = Path(shlex.split(service["ExecStart"])[1])
    # systemd creates /run/<RuntimeDirectory> for vmail and removes it on stop.
    assert socket.parent == Path("/run") / service["RuntimeDirectory"]
    # Ready only when the socket exists, so Dovecot (ordered after) finds it.
    assert f"[ -S {socket} ]" in service["ExecStartPost"]
    assert "dovecot.service" in units[unit]["Unit"]["Before"].split()
    setting = DOVECOT_DICT_USERS[version][unit].format(socket)
    assert setting in rendered_dovecot(config, version)


def test_dovecot_processes_that_use_the_sockets_run_as_vmail():
    """The sockets are 0700 vmail (UMask=0077): Dovecot's auth-worker (passdb/userdb),
    imap and lmtp (metadata, last login) must run as vmail."""
    conf = REPO / "conf" / "dovecot" / "2.3" / "dovecot.conf.j2"
    if not conf.exists():
        pytest.skip("conf/dovecot/2.3/dovecot.conf.j2 not there yet")
    text = conf.read_text()
    block = re.search(r"service auth-worker \{(.*?)\n\}", text, re.S).group(1)
    assert re.search(r"user = (vmail|\{\{ vmail \}\})", block)


@pytest.mark.parametrize("unit", ["filtermail.service", "filtermail-incoming.service"])
def test_filters_listen_before_postfix(units, unit):
    before = units[unit]["Unit"]["Before"].split()
    # Debian's postfix.service only starts postfix@-.service, which runs the daemons.
    assert "postfix.service" in before and "postfix@-.service" in before


@pytest.mark.parametrize("socket", sorted(SOCKETS))
def test_filters_are_started_on_their_sockets(units, config, socket):
    """systemd listens on the default port of chatmail.ini (conf/filtermail moves it) from
    early boot on, and the filter counts as started once it serves (Type=notify)."""
    listen = units[socket]["Socket"]["ListenStream"]
    assert listen == f"127.0.0.1:{getattr(config, SOCKETS[socket])}"
    assert units[socket]["Install"]["WantedBy"] == "sockets.target"
    assert units[socket]["Unit"]["ConditionPathExists"] == INI
    service = units[socket.replace(".socket", ".service")]
    # Requires=: starting the filter starts its socket, restarting the socket (a new port)
    # restarts the filter on it.
    assert socket in service["Unit"]["Requires"].split()
    assert socket in service["Unit"]["After"].split()
    assert service["Service"]["Type"] == "notify"


@pytest.mark.parametrize("unit", [u for u in EXEC_START if u.endswith(".service")
                                  and "expire" not in u and "fsreport" not in u])
def test_daemons_restart(units, unit):
    service = units[unit]["Service"]
    assert service["Restart"] == "always"
    assert service["RestartSec"] == ("5" if unit == "chatmail-metadata.service" else "30")
    assert units[unit]["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.parametrize("timer", sorted(TIMERS))
def test_timers(units, timer):
    assert units[timer]["Timer"]["OnCalendar"] == TIMERS[timer]
    assert units[timer]["Install"]["WantedBy"] == "timers.target"
    service = units[timer.replace(".timer", ".service")]
    assert service["Service"]["Type"] == "oneshot"
    assert not service.has_section("Install")  # started by the timer only
    persistent = units[timer]["Timer"].get("Persistent", "no")
    assert persistent == ("true" if timer in PERSISTENT_TIMERS else "no")


HARDENING = {
    "NoNewPrivileges": "yes", "CapabilityBoundingSet": "", "ProtectSystem": "strict",
    "PrivateTmp": "yes", "PrivateDevices": "yes", "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes", "ProtectControlGroups": "yes",
    "RestrictSUIDSGID": "yes", "SystemCallFilter": "@system-service",
}
# What each service needs: writable paths below the mailboxes, address families.
NEEDS = {
    "doveauth.service": ("-/home/vmail", "AF_UNIX"),
    "lastlogin.service": ("-/home/vmail", "AF_UNIX"),
    "chatmail-metadata.service": ("-/home/vmail", "AF_UNIX AF_INET AF_INET6"),
    "filtermail.service": (None, "AF_UNIX AF_INET"),
    "filtermail-incoming.service": (None, "AF_UNIX AF_INET AF_INET6"),
    "chatmail-expire.service": ("-/home/vmail", "AF_UNIX"),
    "chatmail-fsreport.service": (None, "AF_UNIX"),
}


def test_backup_runs_the_admin_command_as_root_writing_nowhere_but_backup_dir(units, make_config):
    from chatmaild.admin.render import render_component

    service = units[BACKUP_UNIT]["Service"]
    assert service["ExecStart"] == BACKUP_EXEC_START
    assert "User" not in service and service["UMask"] == "0077"
    assert units[BACKUP_UNIT]["Unit"]["ConditionPathExists"] == INI
    for key, value in HARDENING.items():
        if key != "CapabilityBoundingSet":
            assert service.get(key) == value, key
    assert service["CapabilityBoundingSet"] == "CAP_DAC_READ_SEARCH"
    assert "ReadWritePaths" not in service
    platform = load_platform("debian12")
    assert render_component("backup", make_config(), platform) == []
    [dropin] = render_component("backup", make_config(backup_dir="/srv/backups"), platform)
    assert dropin.path == f"/etc/systemd/system/{BACKUP_UNIT}.d/chatmail.conf"
    lines = dropin.content.splitlines()
    assert "ReadWritePaths=/srv/backups" in lines
    assert render_component("backup", make_config(backup_dir="/srv/backups"),
                            load_platform("alpine")) == []


def test_dkim_upkeep_runs_the_admin_command_as_root(units):
    """It deletes OpenDKIM's keys and, switching, rewrites its tables in /etc/dkimkeys
    and reloads it: root, /etc writable, the network for DNS."""
    service = units[DKIM_UNIT]["Service"]
    assert service["ExecStart"] == DKIM_EXEC_START
    assert "User" not in service
    assert units[DKIM_UNIT]["Unit"]["ConditionPathExists"] == INI
    assert service["ProtectSystem"] == "true" and service["NoNewPrivileges"] == "yes"
    assert "PrivateNetwork" not in service and "CapabilityBoundingSet" not in service


@pytest.mark.parametrize("unit", sorted(EXEC_START))
def test_hardening(units, unit):
    service = units[unit]["Service"]
    for key, value in HARDENING.items():
        assert service.get(key) == value, key
    writable, families = NEEDS[unit]
    assert service.get("ReadWritePaths") == writable
    assert service["RestrictAddressFamilies"] == families


def test_mailboxes_are_below_the_writable_path(config):
    """The default mailboxes_dir lies below what ReadWritePaths= opens."""
    home = load_platform("debian12").vmail_home
    assert NEEDS["doveauth.service"][0] == "-" + home
    default = f"/home/vmail/mail/{config.mail_domain}"
    assert default.startswith(home + "/")


# -- generated from conf/services.toml ----------------------------------------------------


@pytest.mark.parametrize("name", relay_services())
def test_service_unit_says_what_the_table_says(units, name):
    table = read_services()[name]
    platform = load_platform()
    unit = units[f"{name}.service"]
    program, *args = table["command"]
    socket = table["socket"].format(**vars(platform)) if "socket" in table else None
    args = [arg.format(socket=socket, ini=INI) for arg in args]
    assert unit["Service"]["ExecStart"] == " ".join([f"{LIBEXEC}/{program}", *args])
    user = table["user"].format(**vars(platform))
    assert (unit["Service"]["User"], unit["Service"]["Group"]) == (user, user)
    assert unit["Service"]["RestartSec"] == str(table["restart_seconds"])
    assert unit["Service"]["UMask"] == f"{table['umask']:04o}"
    assert unit["Service"]["LimitNOFILE"] == str(table["open_files"])
    before = {f"{service.format(**vars(platform))}.service" for service in table["before"]}
    assert set(unit["Unit"]["Before"].split()) == before
    if socket:
        assert unit["Service"]["RuntimeDirectory"] == Path(socket).parent.name
        assert f"[ -S {socket} ]" in unit["Service"]["ExecStartPost"]
    if "port" in table:
        default = SETTINGS[table["port"]].default
        assert units[f"{name}.socket"]["Socket"]["ListenStream"] == f"127.0.0.1:{default}"
        assert unit["Service"]["Type"] == "notify"
    else:
        assert unit["Service"]["Type"] == "exec"
    private = table["network"] == "none"
    assert unit["Service"].get("PrivateNetwork") == ("yes" if private else None)
    assert ("network.target" in unit["Unit"].get("After", "").split()) != private


def test_socket_units_are_the_services_with_a_port(units):
    assert sorted(u for u in units if u.endswith(".socket")) == \
        sorted(relay_sockets(load_platform()))


def test_dovecot_templates_take_the_sockets_from_the_platform_table():
    """No socket path is written into Dovecot's templates: they read the platform facts
    that conf/services.toml names."""
    for path in (REPO / "conf" / "dovecot").rglob("*"):
        if path.is_file():
            assert not re.findall(r"/run/[\w./-]+\.socket", path.read_text()), path


def deb_file(deb, path):
    tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True,
                         check=True).stdout
    return subprocess.run(["tar", "-xOf", "-", "." + path], input=tar,
                          capture_output=True, check=True).stdout.decode()


def test_package_ships_the_generated_units(systemd_dir):
    """What dh_installsystemd installed is what the generator writes for this release."""
    deb = deb_named("chatmail-relay")
    listing = subprocess.run(["dpkg-deb", "--contents", str(deb)], capture_output=True,
                             text=True, check=True).stdout
    unit_dir = re.search(r"\./((?:usr/)?lib/systemd/system)/doveauth\.service",
                         listing).group(1)
    for path in sorted(systemd_dir.iterdir()):
        assert deb_file(deb, f"/{unit_dir}/{unit_name(path)}") == path.read_text(), path


# A relay service's name as a word (filtermail is not in filtermail-incoming).
def mentions(name, line):
    return re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", line) is not None


def test_nothing_in_the_packaging_lists_the_services_by_hand():
    """debian/ and alpine/ get the relay's services from conf/services.toml: no file is
    named after one (units, init scripts) and no line names two of them."""
    names = relay_services()
    tracked = subprocess.run(["git", "ls-files", "debian", "alpine"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    for relative in tracked:
        path = REPO / relative
        stem = path.name.removeprefix(PREFIX).rsplit(".", 1)[0]
        assert stem not in names, f"{relative}: written from conf/services.toml"
        if not path.is_file() or path.suffix in (".gz", ".pgp"):
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            listed = [name for name in names if mentions(name, line)]
            assert len(listed) < 2, f"{relative}:{number} lists {listed}: {line}"


# -- the command lines work -------------------------------------------------------------------


def unit_args(units, unit, replace):
    args = shlex.split(units[unit]["Service"]["ExecStart"])[1:]
    return [replace.get(arg, arg) for arg in args]


def test_expire_accepts_its_unit_arguments(units, config, capsys):
    from chatmaild.expire import daily_expire_main

    args = unit_args(units, "chatmail-expire.service", {INI: str(config.inipath)})
    assert daily_expire_main(args) == 0
    assert capsys.readouterr().out.startswith("Removed ")  # --remove: not a dry run


def test_fsreport_writes_its_textfile(units, config, tmp_path):
    from chatmaild.fsreport import main

    textfile = tmp_path / "metrics" / "fsreport.prom"
    textfile.parent.mkdir()
    args = unit_args(units, "chatmail-fsreport.service", {
        INI: str(config.inipath), TEXTFILE: str(textfile)})
    assert main(args) == 0
    assert "chatmail_accounts" in textfile.read_text()
    service = units["chatmail-fsreport.service"]["Service"]
    assert "/var/lib/" + service["StateDirectory"] == "/var/lib/chatmail-relay/metrics"


@pytest.mark.parametrize("unit", ["filtermail.service", "filtermail-incoming.service"])
def test_filtermail_accepts_its_unit_arguments(units, unit):
    from chatmaild.filtermail import parse_args

    inipath, mode = parse_args(unit_args(units, unit, {}))
    assert inipath == INI and mode in ("outgoing", "incoming")


@pytest.mark.parametrize("unit", DICT_SERVICES)
def test_dict_service_serves_its_socket_and_start_post_sees_it(units, unit, config, tmp_path,
                                                               start_daemon):
    """Start the service as the unit does (socket and ini replaced by test paths); the
    unit's ExecStartPost then finds the socket."""
    service = units[unit]["Service"]
    socket = shlex.split(service["ExecStart"])[1]
    test_socket = tmp_path / "run" / Path(socket).name
    test_socket.parent.mkdir()
    module = console_scripts()[Path(shlex.split(service["ExecStart"])[0]).name].split(":")[0]
    args = unit_args(units, unit, {socket: str(test_socket), INI: str(config.inipath)})
    start_daemon(module.rpartition(".")[2], *args, ready=test_socket.exists)
    post = service["ExecStartPost"].replace(socket, str(test_socket))
    subprocess.run(shlex.split(post), check=True, timeout=30)


# -- systemd-analyze ----------------------------------------------------------------------


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
HOST_UNITS = Path("/lib/systemd/system")


@pytest.fixture(scope="module")
def unit_root(tmp_path_factory, systemd_dir):
    """A root directory with systemd's own units, our units, stand-ins for the packaged
    executables and the helpers the units call: what `systemd-analyze --root` checks."""
    if not SYSTEMD_ANALYZE or not (HOST_UNITS / "sysinit.target").exists():
        pytest.skip("needs systemd-analyze and systemd's units (apt install systemd)")
    root = tmp_path_factory.mktemp("root")
    shutil.copytree(HOST_UNITS, root / "lib/systemd/system", symlinks=True)
    system = root / "etc/systemd/system"
    system.mkdir(parents=True)
    for path in unit_files(systemd_dir):
        shutil.copy(path, system / unit_name(path))
    (root / LIBEXEC.lstrip("/")).mkdir(parents=True)
    for name in libexec_daemons():
        stub = root / LIBEXEC.lstrip("/") / name
        stub.write_text(f"#!{sys.executable}\n")
        stub.chmod(0o755)
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    shutil.copy("/usr/bin/timeout", root / "usr/bin/timeout")
    admin = root / BACKUP_EXEC_START.split()[0].lstrip("/")
    admin.write_text(f"#!{sys.executable}\n")
    admin.chmod(0o755)
    return root


def analyze(root, *args):
    return subprocess.run([SYSTEMD_ANALYZE, *args, f"--root={root}"], capture_output=True,
                          text=True, cwd=root / "etc/systemd/system", timeout=120)


def test_systemd_analyze_verify(unit_root, systemd_dir):
    names = [unit_name(path) for path in unit_files(systemd_dir)]
    result = analyze(unit_root, "verify", "--man=no", *names)
    # Unknown keys and other mistakes are only warnings: any output is a failure.
    assert result.returncode == 0 and not result.stdout and not result.stderr, (
        result.stdout + result.stderr)


@pytest.mark.parametrize("unit", sorted([*EXEC_START, BACKUP_UNIT]))
def test_systemd_analyze_security(unit_root, unit):
    result = analyze(unit_root, "security", "--offline=yes", "--no-pager", unit)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    # 0 is sealed, 10 is unprotected; upstream's units score about 9.
    assert float(match.group(1)) <= 2.0
