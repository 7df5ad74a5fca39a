"""Postfix: our main.cf settings and master.cf services, applied with Postfix's own postconf.

main.cf and master.cf belong to the admin (Postfix has no include mechanism), so we never
write them. conf/postfix renders two lists instead:

  kind "postconf-main":    `key = value` lines; `!key` or `!key = value` removes a key
                           (the latter only while it still has that value)
  kind "postconf-master":  master.cf entries with indented `-o name=value` lines;
                           `!name/type` removes a service, `!name/type/param` or
                           `!name/type/param = value` one of its -o parameters

apply() changes only what differs from the live configuration: `postconf -e` for main.cf,
`postconf -M` to add a service, `-F` for a differing field, `-P` for a differing -o
parameter, `-X` to remove. Settings and services we do not name, and -o parameters an admin
added to ours, stay. validate() does the same in a scratch copy and then asks postconf
itself, which reports mistakes (unknown or unused parameters, bad fields) on stderr.
Parsing the lists and planning the edits is components/postconf.py; this module reads the
live configuration and runs postconf.
"""

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

from ..apply import ApplyResult
from ..host import act
from .postconf import (
    MAIN_KIND,
    MASTER_KIND,
    PostconfError,
    plan_all,
    split_setting,
    undo_commands,
)

UNDO_FILE = "postfix-undo"
SBIN_PATH = "/usr/sbin:/sbin"


# --- the live configuration -----------------------------------------------------------------

def _tool(name):
    path = os.environ.get("PATH", "") + os.pathsep + SBIN_PATH
    return shutil.which(name, path=path) or name


def _run(tool, *args):
    # argv[0] is the bare name, so that messages read "postconf: warning: ..." as usual.
    return subprocess.run([tool, *args], executable=_tool(tool), capture_output=True,
                          text=True)


def run_postconf(config_dir, *args):
    """Run postconf on `config_dir`; returns (stdout, stderr); PostconfError if it fails."""
    proc = _run("postconf", "-c", str(config_dir), *args)
    if proc.returncode != 0:
        raise PostconfError(proc.stderr.strip() or f"postconf {' '.join(args)} failed")
    return proc.stdout, proc.stderr


def _parse_listing(stdout):
    """postconf's 'name = value' lines -> {name: value}."""
    pairs = {}
    for line in stdout.splitlines():
        if line.strip():
            name, value = split_setting(line)
            pairs[name] = value or ""
    return pairs


def live_main(config_dir):
    """The settings written in main.cf (postconf -n), values as written, not expanded."""
    return _parse_listing(run_postconf(config_dir, "-n")[0])


def _by_service(listing):
    """{'name/type/x': value} -> {'name/type': {x: value}}."""
    services = {}
    for key, value in listing.items():
        service, _, item = key.rpartition("/")
        services.setdefault(service, {})[item] = value
    return services


def live_fields(config_dir):
    """{'name/type': {field: value}} for every master.cf service (postconf -F)."""
    return _by_service(_parse_listing(run_postconf(config_dir, "-F")[0]))


def live_params(config_dir):
    """{'name/type': {param: value}} of every -o parameter in master.cf (postconf -P)."""
    return _by_service(_parse_listing(run_postconf(config_dir, "-P")[0]))


def ensure_config_files(config_dir, platform):
    """Create main.cf and master.cf where the Postfix package left none (debconf
    "No configuration" installs no main.cf). Returns the paths created."""
    created = []
    for name, seed in (("main.cf", platform.postfix_main_cf_seed),
                       ("master.cf", platform.postfix_master_cf_seed)):
        target = Path(config_dir) / name
        if target.exists():
            continue
        if seed and Path(seed).is_file():
            shutil.copy2(seed, target)
        elif name == "main.cf":
            target.write_text("")  # Postfix's built-in defaults, plus what we set
        else:
            raise PostconfError(f"{target} does not exist, and there is no master.cf to "
                                "start from: reinstall the postfix package")
        target.chmod(0o644)
        created.append(str(target))
    return created


# --- applying -------------------------------------------------------------------------------

def read_live(config_dir):
    """Everything the plans need, read before any edit: postconf pauses up to two seconds
    when it reads a main.cf written a moment ago, to let it "cool down"; writing does not
    pause."""
    return SimpleNamespace(main=live_main(config_dir), fields=live_fields(config_dir),
                           params=live_params(config_dir), entries=live_entries(config_dir))


def live_entries(config_dir):
    """{'name/type': whole master.cf entry} (postconf -M)."""
    entries = {}
    for line in run_postconf(config_dir, "-M")[0].splitlines():
        words = line.split()
        if len(words) >= 2:
            entries[f"{words[0]}/{words[1]}"] = line
    return entries


def record_undo(undo_file, undo):
    """Keep the first recorded state of every setting we change, for purge (the package's
    postrm replays the file's lines, newest first, as `postconf OPTION ARGUMENT`)."""
    undo_file = Path(undo_file)
    try:
        lines = undo_file.read_text().splitlines()
    except FileNotFoundError:
        lines = []
    known = {line.split("\t", 1)[0] for line in lines}
    for target, option, argument in undo:
        if target not in known:
            known.add(target)
            lines.append(f"{target}\t{option}\t{argument}")
    undo_file.parent.mkdir(parents=True, exist_ok=True)
    undo_file.write_text("".join(line + "\n" for line in lines))


def apply(files, platform, config_dir=None, undo_file=None):
    """Edit the live main.cf/master.cf (or those in `config_dir`) to match the rendered
    postconf-* items. Returns an ApplyResult naming the files changed, with the item's
    services to reload, or to restart for a setting a reload does not apply. How to undo
    each edit is recorded in `undo_file` (default: <state_dir>/postfix-undo for the live
    configuration)."""
    if undo_file is None and config_dir is None:
        undo_file = Path(platform.state_dir) / UNDO_FILE
    config_dir = Path(config_dir or platform.postfix_config_dir)
    items = [item for item in files if item.kind in (MAIN_KIND, MASTER_KIND)]
    result = ApplyResult()
    if not items:
        return result
    created = ensure_config_files(config_dir, platform)
    live = read_live(config_dir)
    for item, commands, restart in plan_all(items, live):
        if undo_file is not None:
            record_undo(undo_file, undo_commands(commands, live.main, live.entries,
                                                 live.params))
        for arguments in commands:
            run_postconf(config_dir, *arguments)
        path = str(config_dir / Path(item.path).name)
        if commands or path in created:
            result.changed.append(path)
            result.reload.update(item.reload)
        if restart:
            result.restart.update(item.reload)
    return result


# --- validation -----------------------------------------------------------------------------

def _copy_live_config(platform, scratch):
    """main.cf and master.cf, the files postconf reads, with their times (see _cool_down)."""
    live = Path(platform.postfix_config_dir)
    for name in ("main.cf", "master.cf"):
        if (live / name).is_file():
            shutil.copy2(live / name, scratch / name)
    ensure_config_files(scratch, platform)


def _cool_down(scratch):
    """Date our scratch main.cf back, so that postconf reads it without the pause it
    makes for a file written a moment ago (see read_live)."""
    main_cf = scratch / "main.cf"
    past = main_cf.stat().st_mtime - 10
    os.utime(main_cf, (past, past))


def _stderr_problems(scratch, option):
    try:
        _, stderr = run_postconf(scratch, option)
    except PostconfError as exc:
        return [str(exc)]
    return [line for line in stderr.splitlines() if line.strip()]


def _table_problems(files, scratch):
    """Check every regexp table main.cf and master.cf name with postmap, which compiles
    each pattern; a table we do not render is a problem too."""
    rendered = {item.path: item for item in files}
    names = set()
    for item in files:
        if item.kind in (MAIN_KIND, MASTER_KIND):
            names.update(re.findall(r"regexp:([^\s,]+)", item.content))
    problems = []
    for index, name in enumerate(sorted(names)):
        if name not in rendered:
            problems.append(f"regexp:{name} is named in the Postfix settings but not rendered")
            continue
        copy = scratch / f"table{index}"
        copy.write_text(rendered[name].content)
        proc = _run("postmap", "-c", str(scratch), "-q", "probe", f"regexp:{copy}")
        problems += [line.replace(str(copy), name) for line in proc.stderr.splitlines()
                     if line.strip()]
    return problems


def validate(files, platform):
    """Apply the rendered settings to a scratch copy of the live main.cf and master.cf
    (Debian's defaults where there are none) and let postconf judge the result: any output
    on stderr is a problem, as upstream treats it."""
    if not any(item.kind in (MAIN_KIND, MASTER_KIND) for item in files):
        return []
    with tempfile.TemporaryDirectory(prefix="chatmail-postfix-") as tmp:
        scratch = Path(tmp)
        try:
            _copy_live_config(platform, scratch)
            apply(files, platform, config_dir=scratch)
        except PostconfError as exc:
            return [str(exc).replace(str(scratch), platform.postfix_config_dir)]
        _cool_down(scratch)
        problems = _stderr_problems(scratch, "-n") + _stderr_problems(scratch, "-M")
        problems += _table_problems(files, scratch)
        # Name the files the admin knows, not the scratch copies.
        problems = [line.replace(str(scratch), platform.postfix_config_dir)
                    for line in problems]
    # -n and -M report the same main.cf warnings; say each once.
    return list(dict.fromkeys(problems))


# What Debian's postfix writes as /etc/aliases when it configures itself.
DEFAULT_ALIASES = "# See man 5 aliases for format\npostmaster:    root\n"


def alias_database(platform):
    """The file Postfix builds from the aliases file (postfix_map_type's suffix)."""
    suffix = "db" if platform.postfix_map_type == "hash" else platform.postfix_map_type
    return f"{platform.postfix_aliases}.{suffix}"


def make_alias_database(platform, host, say):
    """Postfix installed with "No configuration" never builds its alias database, and
    then warns about the missing map on every lookup; Debian 13's does not even write the
    aliases file. Write the one Debian's postfix writes and build the database once
    (after the main.cf settings set alias_database). An existing file or database is the
    admin's and is left alone."""
    aliases = host.path(platform.postfix_aliases)
    if not aliases.exists():
        aliases.write_text(DEFAULT_ALIASES)
        say(f"wrote {platform.postfix_aliases} (postmaster: root)")
    if not host.path(alias_database(platform)).exists():
        act(host.run, ["newaliases"], "newaliases")
