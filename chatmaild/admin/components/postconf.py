"""What conf/postfix renders, parsed, and the postconf edits that bring a live Postfix
configuration to it, with the edits that would undo them. Pure: the live state comes in
as data (components/postfix.py reads it with postconf and runs the edits).
"""

from dataclasses import dataclass, field

MAIN_KIND = "postconf-main"
MASTER_KIND = "postconf-master"
SERVICE_TYPES = ("inet", "unix", "unix-dgram", "fifo", "pass")
# master.cf columns 3-7 as `postconf -F` names them.
MASTER_FIELDS = ("private", "unprivileged", "chroot", "wakeup", "process_limit")
# main.cf settings that take effect only when Postfix starts, not on `postfix reload`.
RESTART_SETTINGS = {"inet_interfaces", "inet_protocols", "import_environment"}
# Where the tools are when PATH lacks the sbin directories (non-root shells on Debian).

class PostconfError(Exception):
    """postconf or postmap failed, or the rendered lists cannot be parsed."""


# --- parsing what conf/postfix renders ----------------------------------------------------

def _content_lines(text):
    """The lines that carry something: no blank lines, no comments."""
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            yield line


def split_setting(text):
    """'key = value' -> (key, value); 'key' -> (key, None)."""
    key, sep, value = text.partition("=")
    return key.strip(), (value.strip() if sep else None)


def parse_main(text):
    """Rendered postconf-main text -> (settings {key: value}, removals {key: value|None})."""
    settings, removals = {}, {}
    for line in _content_lines(text):
        if line.startswith("!"):
            key, value = split_setting(line[1:])
            if not key:
                raise PostconfError(f"main.cf settings: nothing to remove in {line!r}")
            removals[key] = value
            continue
        key, value = split_setting(line)
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
            key, value = split_setting(line[1:])
            parse_removal_key(key)
            removals.append((key, value))
        elif line[0].isspace():
            if not entries:
                raise PostconfError(f"master.cf: continuation line without a service: {line!r}")
            entries[-1].extend(line.split())
        else:
            entries.append(line.split())
    return [_parse_service(words) for words in entries], removals


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


# --- undoing ----------------------------------------------------------------------------------

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


def plan_all(items, live):
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
