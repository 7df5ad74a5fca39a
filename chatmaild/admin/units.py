"""The relay's services as the service manager runs them, generated from
conf/services.toml when the packages are built:

    python3 -m chatmaild.admin.units OUTDIR [--prefix PREFIX]

writes, for the platform CHATMAIL_PLATFORM names (default: the running system), either
systemd units, PREFIX<name>.service and PREFIX<name>.socket (debian/rules, with the
prefix "chatmail-relay." that dh_installsystemd looks for), or OpenRC scripts and their
conf.d files, <name>.initd and <name>.confd (the APKBUILD installs them as
/etc/init.d/<name> and /etc/conf.d/<name>).
"""

import argparse
import sys
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

from ..config import DEFAULT_INI_PATH, SETTINGS
from .platform import load_platform
from .services import read_services

GENERATED = "Generated from conf/services.toml by chatmaild/admin/units.py."
# where the filters listen (chatmaild.filtermail's LISTEN_HOST, conf/filtermail's drop-ins)
LISTEN_HOST = "127.0.0.1"
# how long the service manager waits for a unix socket before the start fails
SOCKET_WAIT_SECONDS = 30
# The table's `network` -> the address families a service may use.
ADDRESS_FAMILIES = {"none": "AF_UNIX", "ipv4": "AF_UNIX AF_INET",
                    "ip": "AF_UNIX AF_INET AF_INET6"}
# The table's `home` -> systemd's view of /home.
PROTECT_HOME = {"write": "read-only", "read": "read-only", "none": "yes"}


def expand(text, platform):
    """TEXT with its {key}s replaced by the platform's facts."""
    return text.format(**vars(platform))


def unique(names):
    return list(dict.fromkeys(names))


def relay_units(platform):
    """The table's services with what the platform makes of them, in the order they
    start."""
    return [resolve(name, settings, platform)
            for name, settings in read_services().items()]


def resolve(name, settings, platform):
    program, *args = settings["command"]
    socket = expand(settings["socket"], platform) if "socket" in settings else None
    if socket and PurePosixPath(socket).parent.parent != PurePosixPath("/run"):
        raise ValueError(f"{name}: its socket must be in a directory of its own in /run")
    return SimpleNamespace(
        name=name, description=settings["description"],
        program=f"{platform.libexec_dir}/{program}", args=args, socket=socket,
        port=settings.get("port"),
        before=unique(expand(service, platform) for service in settings["before"]),
        network=settings["network"], home=settings["home"],
        system_proc=settings.get("system_proc", False),
        restart_seconds=settings["restart_seconds"],
        stop_seconds=settings.get("stop_seconds"),
        user=expand(settings["user"], platform), umask=settings["umask"],
        open_files=settings["open_files"], vmail_home=platform.vmail_home)


def filled_args(service, socket, ini):
    """The service's arguments with its socket and chatmail.ini as given."""
    return [arg.format(socket=socket, ini=ini) for arg in service.args]


# --- systemd ---------------------------------------------------------------------------

def systemd_files(platform):
    """{file name: text} of the relay's .service and .socket units."""
    files = {}
    for service in relay_units(platform):
        files[f"{service.name}.service"] = systemd_service(service)
        if service.port and platform.socket_activation:
            files[f"{service.name}.socket"] = systemd_socket(service)
    return files


def systemd_service(service):
    return "\n".join([*systemd_unit_section(service), "", *systemd_service_section(service),
                      "", "# Hardening: what conf/services.toml says the service needs.",
                      *systemd_hardening(service), "",
                      "[Install]", "WantedBy=multi-user.target"]) + "\n"


def socket_unit(service):
    """The socket unit systemd listens on for a service with a port."""
    return f"{service.name}.socket" if service.port else None


def systemd_unit_section(service):
    after = (["network.target"] if service.network != "none" else []) + \
        ([socket_unit(service)] if service.port else [])
    lines = [
        "[Unit]",
        f"Description={service.description}",
        "Documentation=man:chatmail(8)",
        f"# {GENERATED}",
        "# The services that use it start after it (and find it listening).",
        f"Before={' '.join(f'{name}.service' for name in service.before)}",
    ]
    if service.port:
        lines += ["# systemd listens for it: across a restart Postfix's connections wait in",
                  "# the socket's queue instead of being refused (Postfix would answer 451).",
                  f"Requires={socket_unit(service)}"]
    if after:
        lines.append(f"After={' '.join(after)}")
    return lines + [
        "# Until the package's configuration step has written chatmail.ini there is nothing",
        "# to serve; without this the service would fail and restart until then.",
        f"ConditionPathExists={DEFAULT_INI_PATH}",
    ]


def systemd_service_section(service):
    # No TimeoutStopSec for stop_seconds: systemd's default (90 s) is long enough.
    command = [service.program, *filled_args(service, service.socket, DEFAULT_INI_PATH)]
    lines = ["[Service]"]
    if service.port:
        lines += ["# Started once it serves on the socket (READY=1); STOPPING=1 when it",
                  "# finishes the messages in progress after SIGTERM.",
                  "Type=notify"]
    else:
        lines.append("Type=exec")
    lines += [f"User={service.user}", f"Group={service.user}",
              f"ExecStart={' '.join(command)}"]
    if service.socket:
        lines += [
            "# Started means listening: the services ordered after it find the socket.",
            f"ExecStartPost=/usr/bin/timeout {SOCKET_WAIT_SECONDS} /bin/sh -c "
            f"'until [ -S {service.socket} ]; do sleep 0.1; done'",
        ]
    lines += ["Restart=always", f"RestartSec={service.restart_seconds}"]
    if service.socket:
        lines.append(f"RuntimeDirectory={PurePosixPath(service.socket).parent.name}")
    return lines + [f"UMask={service.umask:04o}", f"LimitNOFILE={service.open_files}"]


def systemd_hardening(service):
    lines = ["NoNewPrivileges=yes", "CapabilityBoundingSet=", "AmbientCapabilities=",
             "ProtectSystem=strict", f"ProtectHome={PROTECT_HOME[service.home]}"]
    if service.home == "write":
        lines.append(f"ReadWritePaths=-{service.vmail_home}")
    lines += ["PrivateTmp=yes", "PrivateDevices=yes"]
    if service.network == "none":
        lines.append("PrivateNetwork=yes")
    lines += [f"RestrictAddressFamilies={ADDRESS_FAMILIES[service.network]}",
              "ProtectKernelTunables=yes", "ProtectKernelModules=yes",
              "ProtectKernelLogs=yes", "ProtectControlGroups=yes", "ProtectClock=yes",
              "ProtectHostname=yes", "ProtectProc=invisible"]
    if not service.system_proc:
        lines.append("ProcSubset=pid")
    lines += ["RestrictNamespaces=yes", "RestrictRealtime=yes", "RestrictSUIDSGID=yes",
              "LockPersonality=yes", "MemoryDenyWriteExecute=yes", "RemoveIPC=yes",
              "SystemCallArchitectures=native", "SystemCallFilter=@system-service",
              "SystemCallErrorNumber=EPERM"]
    return lines


def systemd_socket(service):
    return "\n".join([
        "[Unit]",
        f"Description={service.description}: its socket",
        "Documentation=man:chatmail(8)",
        f"# {GENERATED}",
        f"# Nothing to serve before chatmail.ini exists (see {service.name}.service).",
        f"ConditionPathExists={DEFAULT_INI_PATH}",
        "",
        "[Socket]",
        f"# chatmail.ini's default {service.port}; `chatmail configure` sets the",
        f"# configured one in /etc/systemd/system/{service.name}.socket.d/chatmail.conf",
        "# (conf/filtermail).",
        f"ListenStream={LISTEN_HOST}:{SETTINGS[service.port].default}",
        "",
        "[Install]",
        "WantedBy=sockets.target",
    ]) + "\n"


# --- OpenRC ----------------------------------------------------------------------------

# wait_for_socket PATH: the start_post of services with a unix socket.
WAIT_FOR_SOCKET = f"""
# wait_for_socket PATH: up to {SOCKET_WAIT_SECONDS} s.
wait_for_socket() {{
	tries={SOCKET_WAIT_SECONDS * 10}
	while [ ! -S "$1" ] && [ "$tries" -gt 0 ]; do
		sleep 0.1
		tries=$((tries - 1))
	done
	[ -S "$1" ] || {{ eerror "$1 did not appear"; return 1; }}
}}
"""


def openrc_files(platform):
    """{file name: text} of the relay's init scripts (.initd) and their conf.d (.confd)."""
    files = {}
    for service in relay_units(platform):
        files[f"{service.name}.initd"] = openrc_script(service)
        files[f"{service.name}.confd"] = openrc_confd(service)
    return files


def openrc_script(service):
    text = "\n".join([
        "#!/sbin/openrc-run",
        f"# {service.name}: the OpenRC form of its systemd unit on Debian.",
        f"# {GENERATED}",
        "",
        f'description="{service.description}"',
        "",
        *openrc_variables(service), "",
        *openrc_depend(service), "",
        *openrc_start_pre(service), "",
        *openrc_start_post(service),
    ]) + "\n"
    return text + WAIT_FOR_SOCKET if service.socket else text


def socket_dir(service):
    return PurePosixPath(service.socket).parent


def openrc_socket(service):
    """The service's socket as its script names it: in $socket_dir, which conf.d may
    move."""
    return f"$socket_dir/{PurePosixPath(service.socket).name}"


def openrc_args(service):
    socket = openrc_socket(service) if service.socket else None
    return filled_args(service, socket, "$chatmail_ini")


def openrc_variables(service):
    """What openrc-run and supervise-daemon read; conf.d may set those with defaults."""
    lines = [f': "${{chatmail_ini:={DEFAULT_INI_PATH}}}"']
    if service.socket:
        lines.append(f': "${{socket_dir:={socket_dir(service)}}}"')
    lines += [
        "",
        f"command={service.program}",
        f'command_args="{" ".join(openrc_args(service))}"',
        f'command_user="{service.user}:{service.user}"',
        f"# Restart=always, RestartSec={service.restart_seconds}: supervise-daemon restarts "
        "it, without a limit.",
        "supervisor=supervise-daemon",
        f': "${{respawn_delay:={service.restart_seconds}}}"',
        "respawn_max=0",
    ]
    if service.stop_seconds:
        lines += ["# SIGTERM, then as long as conf/services.toml's stop_seconds before "
                  "SIGKILL;",
                  "# supervise-daemon's default would kill it after 5 s.",
                  f': "${{retry:=SIGTERM/{service.stop_seconds}/SIGKILL/5}}"']
    return lines + [
        f"umask={service.umask:03o}",
        "# Output to syslog (/var/log/messages), as the journal keeps it on Debian; without a",
        "# logger supervise-daemon sends it to /dev/null. An output_log in conf.d takes "
        "precedence.",
        ': "${output_logger:=logger -t $RC_SVCNAME -p daemon.info}"',
        ': "${error_logger:=logger -t $RC_SVCNAME -p daemon.info}"',
        "no_new_privs=yes",
        f'rc_ulimit="${{rc_ulimit:--n {service.open_files}}}"',
    ]


def openrc_depend(service):
    return [
        "depend() {",
        "\t# The services that use it start after it (and find it listening).",
        *(f"\tbefore {name}" for name in service.before),
        *(["\tafter net"] if service.network != "none" else []),
        "}",
    ]


def openrc_start_pre(service):
    lines = [
        "start_pre() {",
        "\t# Nothing to serve before `chatmail setup` wrote chatmail.ini.",
        '\tif [ ! -f "$chatmail_ini" ]; then',
        "\t\teerror \"$chatmail_ini is missing: run 'chatmail setup YOUR.DOMAIN' first\"",
        "\t\treturn 1",
        "\tfi",
    ]
    if service.socket:
        lines.append(f"\tcheckpath --directory --owner {service.user}:{service.user} "
                     '--mode 0755 "$socket_dir"')
    return lines + ["}"]


def openrc_start_post(service):
    """Return once the service serves: supervise-daemon returns when its process runs."""
    if service.socket:
        return ["start_post() {",
                "\t# Started means listening: the services ordered after it find the socket.",
                f'\twait_for_socket "{openrc_socket(service)}"',
                "}"]
    quoted = " ".join(f'"{arg}"' if "$" in arg else arg for arg in openrc_args(service))
    return ["start_post() {",
            "\t# Return once it serves: supervise-daemon returns when the process runs, "
            "about a",
            "\t# second before it listens, while Postfix answers mail with 451.",
            f"\tpython3 -m chatmaild.openrc wait-for-filter {quoted} || {{ stop; return 1; }}",
            "}"]


def openrc_confd(service):
    return "\n".join([
        f"# Settings for /etc/init.d/{service.name} (sourced by openrc-run before the "
        "script).",
        "",
        "# The relay's configuration file.",
        f"#chatmail_ini={DEFAULT_INI_PATH}",
        "",
        "# Open files (LimitNOFILE on Debian).",
        f'#rc_ulimit="-n {service.open_files}"',
        "",
        "# Seconds before a crashed service is started again (RestartSec on Debian).",
        f"#respawn_delay={service.restart_seconds}",
    ]) + "\n"


# --- writing them ----------------------------------------------------------------------

GENERATORS = {"systemd": systemd_files, "openrc": openrc_files}
EXECUTABLE = (".initd",)


def write_units(platform, outdir, prefix=""):
    """Write the platform's files into OUTDIR; return their paths."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in GENERATORS[platform.service_manager](platform).items():
        path = outdir / f"{prefix}{name}"
        path.write_text(text)
        path.chmod(0o755 if name.endswith(EXECUTABLE) else 0o644)
        written.append(path)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 -m chatmaild.admin.units",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir")
    parser.add_argument("--prefix", default="", help="put before each file's name")
    args = parser.parse_args(argv)
    for path in write_units(load_platform(), args.outdir, args.prefix):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
