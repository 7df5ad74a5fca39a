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
"""

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from ..apply import ApplyResult

UNDO_FILE = "postfix-undo"
MAIN_KIND = "postconf-main"
MASTER_KIND = "postconf-master"
SERVICE_TYPES = ("inet", "unix", "unix-dgram", "fifo", "pass")
# master.cf columns 3-7 as `postconf -F` names them.
MASTER_FIELDS = ("private", "unprivileged", "chroot", "wakeup", "process_limit")
# main.cf settings that take effect only when Postfix starts, not on `postfix reload`.
RESTART_SETTINGS = {"inet_interfaces", "inet_protocols"}
# Where the tools are when PATH lacks the sbin directories (non-root shells on Debian).
SBIN_PATH = "/usr/sbin:/sbin"


class PostconfError(Exception):
    """postconf or postmap failed, or the rendered lists cannot be parsed."""


# --- parsing what conf/postfix renders ----------------------------------------------------

def _content_lines(text):
    """The lines that carry something: no blank lines, no comments."""
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            yield line


def _split_setting(text):
    """'key = value' -> (key, value); 'key' -> (key, None)."""
    key, sep, value = text.partition("=")
    return key.strip(), (value.strip() if sep else None)


def parse_main(text):
    """Rendered postconf-main text -> (settings {key: value}, removals {key: value|None})."""
    settings, removals = {}, {}
    for line in _content_lines(text):
        if line.startswith("!"):
            key, value = _split_setting(line[1:])
            if not key:
                raise PostconfError(f"main.cf settings: nothing to remove in {line!r}")
            removals[key] = value
            continue
        key, value = _split_setting(line)
        if value is None or not key:
            raise PostconfError(f"main.cf settings: expected 'key = value', got {line!r}")
        settings[key] = value
    return settings, removals


@dataclass
class Service:
    """One master.cf entry: `name type private unpriv chroot wakeup maxproc command args`."""

    name: str
    type: str
    fields: dict  # MASTER_FIELDS -> value, as written ("-" for the default)
    command: str  # the command and its arguments other than -o
    params: dict = field(default_factory=dict)  # -o name=value, in order

    @property
    def key(self):
        return f"{self.name}/{self.type}"

    def entry(self, params=None):
        """The entry as one line, as `postconf -M -e` takes it."""
        params = self.params if params is None else params
        # Postfix 3 takes a value with spaces in braces (postconf writes it so, too).
        options = [f"-o {{{name}={value}}}" if len(value.split()) > 1 else f"-o {name}={value}"
                   for name, value in params.items()]
        return " ".join([self.name, self.type, *self.fields.values(), self.command, *options])


def _option_text(first, words):
    """The text of one -o option starting with word `first`; an option in Postfix 3's
    `-o { name = value with spaces }` form takes the words up to the closing brace."""
    if not first.startswith("{"):
        return first
    parts = [first]
    while not parts[-1].endswith("}"):
        parts.append(next(words, "}"))
    return " ".join(parts)[1:-1].strip()


def _split_options(words):
    """Command words -> (the command without -o options, {name: value} of the -o options)."""
    command, params = [], {}
    words = iter(words)
    for word in words:
        if word == "-o" or (word.startswith("-o") and "=" in word):
            option = _option_text(next(words, "") if word == "-o" else word[2:], words)
            name, sep, value = option.partition("=")
            name, value = name.strip(), value.strip()
            if not sep or not name:
                raise PostconfError(f"master.cf: '-o {option}' is not '-o name=value'")
            params[name] = value
        else:
            command.append(word)
    return " ".join(command), params


def _parse_service(words):
    if len(words) < 8:
        raise PostconfError(f"master.cf: too few fields in {' '.join(words)!r}")
    name, type_ = words[0], words[1]
    if type_ not in SERVICE_TYPES:
        raise PostconfError(f"master.cf: unknown service type {type_!r} in {' '.join(words)!r}")
    command, params = _split_options(words[7:])
    return Service(name, type_, dict(zip(MASTER_FIELDS, words[2:7])), command, params)


def parse_removal_key(key):
    """'name/type' -> (name, type, None); 'name/type/param' -> (name, type, param)."""
    parts = key.split("/")
    if len(parts) >= 2 and parts[-1] in SERVICE_TYPES:
        return "/".join(parts[:-1]), parts[-1], None
    if len(parts) >= 3 and parts[-2] in SERVICE_TYPES:
        return "/".join(parts[:-2]), parts[-2], parts[-1]
    raise PostconfError(f"master.cf: {key!r} names no service/type or service/type/param")


def parse_master(text):
    """Rendered postconf-master text -> (services, removals [(key, value|None)])."""
    entries, removals = [], []
    for line in _content_lines(text):
        if line.startswith("!"):
            key, value = _split_setting(line[1:])
            parse_removal_key(key)
            removals.append((key, value))
        elif line[0].isspace():
            if not entries:
                raise PostconfError(f"master.cf: continuation line without a service: {line!r}")
            entries[-1].extend(line.split())
        else:
            entries.append(line.split())
    return [_parse_service(words) for words in entries], removals


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
            name, value = _split_setting(line)
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


# --- planning the edits (pure: live state in, postconf arguments out) ----------------------

def plan_main(text, live):
    """postconf arguments for main.cf: (['key=value' to set], [keys to remove])."""
    settings, removals = parse_main(text)
    to_set = [f"{key}={value}" for key, value in settings.items() if live.get(key) != value]
    to_remove = [key for key, value in removals.items()
                 if key in live and key not in settings and value in (None, live[key])]
    return to_set, to_remove


def main_commands(text, live):
    """The postconf invocations (argument lists) that make main.cf match `text`, and
    whether they change a setting that takes a restart."""
    to_set, to_remove = plan_main(text, live)
    changed = {argument.partition("=")[0] for argument in to_set} | set(to_remove)
    commands = [[option, *arguments]
                for option, arguments in (("-e", to_set), ("-X", to_remove)) if arguments]
    return commands, bool(changed & RESTART_SETTINGS)


@dataclass
class MasterPlan:
    """postconf arguments for master.cf, by postconf option."""

    add: list = field(default_factory=list)  # -M -e 'name/type = entry'
    fields: list = field(default_factory=list)  # -F -e 'name/type/field=value'
    params: list = field(default_factory=list)  # -P -e 'name/type/param=value'
    remove_params: list = field(default_factory=list)  # -P -X 'name/type/param'
    remove_services: list = field(default_factory=list)  # -M -X 'name/type'

    def commands(self):
        # Removals last: a service rewritten by -Me may still carry a parameter to remove.
        steps = (("-Me", self.add), ("-Fe", self.fields), ("-Pe", self.params),
                 ("-PX", self.remove_params), ("-MX", self.remove_services))
        return [[option, *arguments] for option, arguments in steps if arguments]


def _plan_service(service, fields, params, plan):
    if fields is None:
        plan.add.append(f"{service.key} = {service.entry()}")
        return
    live_command, _ = _split_options(fields.get("command", "").split())
    if live_command != service.command:
        # Another command: rewrite the entry, keeping -o parameters an admin added.
        plan.add.append(f"{service.key} = {service.entry({**params, **service.params})}")
        return
    for name in MASTER_FIELDS:
        if fields.get(name) != service.fields[name]:
            plan.fields.append(f"{service.key}/{name}={service.fields[name]}")
    for name, value in service.params.items():
        if params.get(name) != value:
            plan.params.append(f"{service.key}/{name}={value}")


def plan_master(text, fields, params):
    """The master.cf edits that make the live services (postconf -F and -P listings,
    grouped by live_fields/live_params) match the rendered text."""
    services, removals = parse_master(text)
    plan = MasterPlan()
    for service in services:
        _plan_service(service, fields.get(service.key), params.get(service.key, {}), plan)
    for key, value in removals:
        name, type_, param = parse_removal_key(key)
        service_key = f"{name}/{type_}"
        if param is None:
            if service_key in fields:
                plan.remove_services.append(service_key)
        elif param in params.get(service_key, {}) and value in (None, params[service_key][param]):
            plan.remove_params.append(key)
    return plan


# --- applying -------------------------------------------------------------------------------

def read_live(config_dir):
    """Everything the plans need, read before any edit: postconf pauses up to two seconds
    when it reads a main.cf written a moment ago, to let it "cool down"; writing does not
    pause."""
    return SimpleNamespace(main=live_main(config_dir), fields=live_fields(config_dir),
                           params=live_params(config_dir), entries=live_entries(config_dir))


def _plan_all(items, live):
    """[(item, postconf invocations, restart needed)]"""
    main_live, fields, params = live.main, live.fields, live.params
    plans = []
    for item in items:
        if item.kind == MAIN_KIND:
            plans.append((item, *main_commands(item.content, main_live)))
        else:
            # master.cf is read again on `postfix reload`, new listeners included.
            plans.append((item, plan_master(item.content, fields, params).commands(), False))
    return plans


def live_entries(config_dir):
    """{'name/type': whole master.cf entry} (postconf -M)."""
    entries = {}
    for line in run_postconf(config_dir, "-M")[0].splitlines():
        words = line.split()
        if len(words) >= 2:
            entries[f"{words[0]}/{words[1]}"] = line
    return entries


def undo_commands(commands, main_live, entries, params):
    """For each postconf edit, (target, option, argument) that restores the state before
    it: the value it had, or its absence."""
    undo = []
    for option, *arguments in commands:
        for argument in arguments:
            name, _, _ = argument.partition("=")
            name = name.strip()
            if option in ("-e", "-X"):
                old = main_live.get(name)
                undo.append((f"main:{name}", "-X", name) if old is None
                            else (f"main:{name}", "-e", f"{name}={old}"))
            elif option in ("-Me", "-MX"):
                old = entries.get(name)
                undo.append((f"service:{name}", "-MX", name) if old is None
                            else (f"service:{name}", "-Me", f"{name} = {old}"))
            elif option == "-Fe":
                key, _, field_name = name.rpartition("/")
                old = live_field(entries.get(key), field_name)
                if old is not None:
                    undo.append((f"field:{name}", "-Fe", f"{name}={old}"))
            else:  # -Pe, -PX
                key, _, param = name.rpartition("/")
                old = params.get(key, {}).get(param)
                undo.append((f"param:{name}", "-PX", name) if old is None
                            else (f"param:{name}", "-Pe", f"{name}={old}"))
    return undo


def live_field(entry, field_name):
    if entry is None or field_name not in MASTER_FIELDS:
        return None
    return entry.split()[2 + MASTER_FIELDS.index(field_name)]


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
    for item, commands, restart in _plan_all(items, live):
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
