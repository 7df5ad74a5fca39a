"""Dovecot: check the rendered configuration with Dovecot's own parser, `doveconf -n`.

The files are checked as copies in a scratch directory, so the running Dovecot and the
installed files are never touched. Our dovecot.conf names the other files of ours by
their installed paths (auth.conf, push_notification.lua); in the copy those names point
at the copies, so what is checked is the new set of files, not a mix with the old one.

What `doveconf -n` checks: the syntax, every setting name and value, sections, filters
and includes (the admin's local.conf included, as Dovecot will read it). What it does
not: it does not open files named with `<` (ssl_cert, ssl_key, ssl_dh; verified on
2.3.19), nor the files passdb/userdb and plugins read (auth.conf, the Lua script), nor
does it look up users or executables. Those are read by the running daemons; the
certificates exist because the step tls-certificate makes or checks them first, and
tests/config/test_dovecot.py starts a real Dovecot with every file of ours.
"""

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

MAIN_CONFIG_NAME = "dovecot.conf"


@dataclass
class DoveconfResult:
    returncode: int
    output: str  # the configuration as Dovecot understood it (non-default settings)
    messages: list  # doveconf's errors and warnings, one a line

    @property
    def ok(self):
        return self.returncode == 0


def validate(files, platform):
    """Problems `doveconf -n` finds in the rendered Dovecot configuration."""
    config_files = dovecot_config_files(files, platform)
    main = main_config(config_files)
    if main is None:
        return []  # nothing of ours for this Dovecot version
    doveconf = shutil.which("doveconf")
    if doveconf is None:
        return ["doveconf not found: is Dovecot installed?"]
    with tempfile.TemporaryDirectory(prefix="chatmail-doveconf.") as scratch:
        copies = write_scratch_copies(config_files, Path(scratch))
        result = run_doveconf(copies[main.path], doveconf)
        if result.ok:
            return []
        return [unredirect(message, copies) for message in result.messages]


def dovecot_config_files(files, platform):
    """The files Dovecot reads (not the service manager's), i.e. those in its folder."""
    folder = platform.dovecot_config_dir.rstrip("/") + "/"
    return [item for item in files if item.path.startswith(folder)]


def main_config(files):
    """The file Dovecot is started with, or None."""
    for item in files:
        if Path(item.path).name == MAIN_CONFIG_NAME:
            return item
    return None


def write_scratch_copies(files, scratch):
    """Copy `files` below `scratch` (same relative paths), each mention of one of them
    redirected to its copy. Returns {installed path: copy's path}."""
    copies = {item.path: str(scratch / item.path.lstrip("/")) for item in files}
    for item in files:
        copy = Path(copies[item.path])
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(redirect(item.content, copies), encoding="utf-8")
    return copies


def redirect(text, moves):
    """`text` with every path in `moves` ({old: new}) replaced, in one pass: a new path
    usually contains its old one, which must not be replaced again. The longest match
    wins, so /a/b/c follows its own entry even when /a/b moves too."""
    if not moves:
        return text
    olds = sorted(moves, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(old) for old in olds))
    return pattern.sub(lambda match: moves[match.group(0)], text)


def unredirect(text, copies):
    """A doveconf message about a copy, naming the installed path the admin knows."""
    return redirect(text, {copy: path for path, copy in copies.items()})


def run_doveconf(path, doveconf="doveconf"):
    """`doveconf -n -c path`: Dovecot's verdict on a configuration file."""
    proc = subprocess.run(
        [doveconf, "-n", "-c", str(path)],
        capture_output=True, text=True, timeout=60,
    )
    messages = [line.removeprefix("doveconf: ") for line in proc.stderr.splitlines()
                if line.strip()]
    if proc.returncode and not messages:
        messages = [f"doveconf -n failed with exit status {proc.returncode}"]
    return DoveconfResult(proc.returncode, proc.stdout, messages)
