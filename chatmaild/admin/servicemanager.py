"""Ask the service manager (systemd or OpenRC, from platform.service_manager) about units.

Only questions, no actions: `chatmail status` uses it; starting and reloading is done by
the postinst.d steps. Every command goes through a `run` function (argv -> Completed) so
tests can answer for a service manager that does not run on the test host.
"""

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Completed:
    returncode: int
    stdout: str
    stderr: str = ""


def run_command(argv, timeout=30):
    """Run argv; a missing program is returncode 127, as in a shell."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return Completed(127, "", f"{argv[0]}: command not found")
    except subprocess.TimeoutExpired:
        return Completed(124, "", f"{argv[0]}: no answer within {timeout} s")
    return Completed(proc.returncode, proc.stdout, proc.stderr)


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
