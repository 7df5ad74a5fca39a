"""The system `chatmail configure` sets up: its files, users and commands.

Everything the configuration engine does outside of chatmail.ini goes through a Host: a
path is host.path("/etc/..."), a command host.run([...]). The real system is Host(); the
tests give a Host on another root (Alpine's minirootfs, entered with chroot) so that the
same code makes directories, asks busybox and talks to a service manager there.
"""

import grp
import pwd
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .platform import data_dir as default_data_dir


@dataclass
class Completed:
    returncode: int
    stdout: str
    stderr: str = ""


def run_command(argv, timeout=30, show=False, env=None):
    """Run argv; a missing program is returncode 127, as in a shell. timeout=None waits
    as long as it takes. show=True: its output goes where ours goes, uncaptured (a
    daemon a service manager starts may keep a pipe open for ever). env: its whole
    environment (default: ours)."""
    try:
        proc = subprocess.run(argv, capture_output=not show, text=True, timeout=timeout,
                              env=env)
    except FileNotFoundError:
        return Completed(127, "", f"{argv[0]}: command not found")
    except subprocess.TimeoutExpired:
        return Completed(124, "", f"{argv[0]}: no answer within {timeout} s")
    return Completed(proc.returncode, proc.stdout or "", proc.stderr or "")


class CommandFailed(Exception):
    """A command (starting a service, say) failed; the message says which."""


def run_shown(run, argv, **options):
    """Run a command whose output is the admin's to read (a service manager's, say);
    its exit status."""
    sys.stdout.flush()
    return run(argv, timeout=None, show=True, **options).returncode


def act(run, argv, what, **options):
    """As run_shown; CommandFailed, saying WHAT failed, unless it succeeds."""
    code = run_shown(run, argv, **options)
    if code != 0:
        raise CommandFailed(f"{what} failed ({' '.join(argv)}: exit status {code})")


class Host:
    """ROOT: where its files are seen from here; RUN: runs its commands (argv, timeout);
    DATA_DIR: where the package's files are, as its commands see them."""

    def __init__(self, root="/", run=run_command, data_dir=None):
        self.root = Path(root)
        self.run = run
        self.data_dir = str(data_dir or default_data_dir())

    def path(self, path):
        """PATH as seen from here (PATH is absolute, as the host's programs see it)."""
        return self.root / str(path).lstrip("/")

    def has_command(self, name):
        return self.run(["sh", "-c", 'command -v "$0" >/dev/null', name]).returncode == 0

    def user_ids(self, name):
        """(uid, gid) of user NAME."""
        if self.root == Path("/"):
            entry = pwd.getpwnam(name)
            return entry.pw_uid, entry.pw_gid
        fields = self._entry("passwd", name)
        return int(fields[2]), int(fields[3])

    def group_id(self, name):
        if self.root == Path("/"):
            return grp.getgrnam(name).gr_gid
        return int(self._entry("group", name)[2])

    def _entry(self, database, name):
        """The fields of NAME in this root's /etc/passwd or /etc/group."""
        for line in self.path(f"/etc/{database}").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == name:
                return fields
        raise KeyError(f"no {name!r} in {database}")
