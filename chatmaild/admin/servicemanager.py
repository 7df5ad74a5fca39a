"""The service manager (systemd or OpenRC, from platform.service_manager): ask it about
units (`chatmail status`), and start, reload or restart them (`chatmail configure`, whose
decisions are in reloads.py).

Every command goes through a `run` function (argv -> Completed) so tests can answer for
a service manager that does not run on the test host, or run it in another root.
"""

from dataclasses import dataclass
from pathlib import Path

from .host import act, run_command, run_shown


@dataclass
class UnitState:
    name: str
    exists: bool  # the unit / init script is installed
    enabled: bool  # starts at boot (systemd: enabled or static; OpenRC: in a runlevel)
    active: bool  # running (a timer: waiting)
    text: str  # the manager's own words, e.g. "active (running)", "failed", "stopped"


class ServiceManagerError(Exception):
    """The service manager could not be asked at all (e.g. systemd is not PID 1)."""


class Systemd:
    """One `systemctl show` for all units: fast, and works without root."""

    PROPERTIES = "Id,LoadState,ActiveState,SubState,UnitFileState"

    def __init__(self, run=run_command):
        self.run = run

    def missing(self, host):
        """What keeps it from running services on HOST (host.py), or None."""
        if not host.has_command("systemctl"):
            return "systemctl not found: the relay's services need systemd running"
        return None

    @staticmethod
    def not_running(host):
        """Why services cannot start now although systemd is installed, or None: it did
        not boot this system (sd_booted(3): no /run/systemd/system)."""
        if host.path("/run/systemd/system").is_dir():
            return None
        return "systemd is not running here (a chroot or an image build)"

    def is_active(self, name):
        return self.run(["systemctl", "--quiet", "is-active", name]).returncode == 0

    def do(self, action, name, has_command):
        """ACTION (start, stop, restart, reload-or-restart) on unit NAME. On Debian,
        deb-systemd-invoke honours policy-rc.d, so image builders and test hosts can keep
        services from starting."""
        tool = "deb-systemd-invoke" if has_command("deb-systemd-invoke") else "systemctl"
        act(self.run, [tool, action, name], f"{action} {name}")

    def start_failed(self, name):
        """Start unit NAME, which failed to (re)start just now. Not with deb-systemd-invoke,
        which starts no static unit (journald is one); and past the start limit, which
        stops Restart= loops, not this one start."""
        self.run(["systemctl", "--quiet", "reset-failed", name])
        act(self.run, ["systemctl", "start", name], f"start {name}")

    def reload_units(self):
        act(self.run, ["systemctl", "daemon-reload"], "systemctl daemon-reload")

    @staticmethod
    def unit_name(name):
        return name if "." in name else name + ".service"

    def states(self, names):
        units = [self.unit_name(name) for name in names]
        result = self.run(["systemctl", "show", "--property=" + self.PROPERTIES, "--", *units])
        if result.returncode != 0:
            raise ServiceManagerError(
                f"systemctl failed ({result.returncode}): {result.stderr.strip()}")
        by_id = {block.get("Id"): block for block in parse_show_blocks(result.stdout)}
        return {name: self._state(name, by_id.get(unit, {}))
                for name, unit in zip(names, units)}

    @staticmethod
    def _state(name, props):
        load = props.get("LoadState", "not-found")
        active, sub = props.get("ActiveState", "unknown"), props.get("SubState", "")
        # "static" units (no [Install]) start when something pulls them in: count as enabled.
        enabled = props.get("UnitFileState", "") in (
            "enabled", "enabled-runtime", "static", "alias", "indirect", "generated")
        text = f"{active} ({sub})" if sub and sub != active else active
        if load != "loaded":
            text = load  # not-found, masked, error
        return UnitState(name, load == "loaded", enabled, active == "active", text)


def parse_show_blocks(text):
    """`systemctl show` output: one KEY=VALUE block per unit, blocks separated by a blank
    line."""
    blocks, current = [], {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
            current = {}
            continue
        key, _, value = line.partition("=")
        current[key] = value
    if current:
        blocks.append(current)
    return blocks


class OpenRC:
    """Existence and runlevels from the file system, the running state from rc-service."""

    def __init__(self, run=run_command, init_dir="/etc/init.d", runlevels_dir="/etc/runlevels"):
        self.run = run
        self.init_dir = Path(init_dir)
        self.runlevels_dir = Path(runlevels_dir)

    def states(self, names):
        return {name: self._state(name) for name in names}

    def missing(self, host):
        if not host.has_command("rc-service"):
            return ("rc-service not found: the relay's services need OpenRC (apk add openrc, "
                    "then boot with it)")
        return None

    @staticmethod
    def not_running(host):
        # OpenRC writes it when it enters a runlevel; without it rc-service fails with a
        # misleading "already starting".
        if host.path("/run/openrc/softlevel").exists():
            return None
        return ("OpenRC did not boot this system (a chroot, an image build or a container "
                "without it)")

    def is_active(self, name):
        return self.run(["rc-service", "--quiet", name, "status"]).returncode == 0

    def do(self, action, name, has_command=None):
        what = f"{action} {name}"
        if action == "reload-or-restart":
            if run_shown(self.run, ["rc-service", name, "reload"]) != 0:
                act(self.run, ["rc-service", name, "restart"], what)
        elif action == "start":
            # OpenRC still counts a service whose process died as started, and `start`
            # would only warn that it is: restart it first if it crashed.
            act(self.run, ["rc-service", "--ifcrashed", name, "restart"], what)
            act(self.run, ["rc-service", name, "start"], what)
        else:
            act(self.run, ["rc-service", name, action], what)

    def start_failed(self, name):
        self.do("start", name)

    def forget(self, name):
        """Forget that NAME was started (it is not running, whatever OpenRC thinks)."""
        act(self.run, ["rc-service", "--quiet", name, "zap"], f"zap {name}")

    def _enabled(self, name):
        return any((level / name).exists() for level in self.runlevels_dir.glob("*"))

    def _state(self, name):
        if not (self.init_dir / name).exists():
            return UnitState(name, False, False, False, "not-found")
        result = self.run(["rc-service", name, "status"])
        # " * status: started" / "stopped"; "crashed" (exit status 32) comes on stderr
        output = result.stdout + (result.stderr or "")
        text = output.strip().rpartition("status:")[2].strip() or "unknown"
        return UnitState(name, True, self._enabled(name), result.returncode == 0, text)


def service_manager(platform, run=run_command, **paths):
    """The manager named by platform.service_manager ("systemd" or "openrc")."""
    kind = platform.service_manager
    if kind == "systemd":
        return Systemd(run)
    if kind == "openrc":
        return OpenRC(run, **paths)
    raise ValueError(f"unknown service manager {kind!r} in the platform table")


def dead_master_pid(pid_file, proc_dir="/proc"):
    """The pid in Postfix's master.pid if no master process runs with it; None when one
    does or there is no pid file (never started, or not ours to read: it is root's)."""
    try:
        pid = int(Path(pid_file).read_text())
    except (OSError, ValueError):
        return None
    try:
        if (Path(proc_dir) / str(pid) / "comm").read_text().strip() == "master":
            return None
    except OSError:
        pass
    return pid
