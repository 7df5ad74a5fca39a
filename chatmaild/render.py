"""Render the relay's configuration files from conf/ templates, chatmail.ini and the
platform table.

conf/platform.toml   the facts that differ between distributions: what all share, then
                     each platform's own
conf/<component>/    Jinja2 templates, plus targets.toml listing what they become:

    [[file]]
    template = "chatmail.conf.j2"            # in this folder
    path = "{dovecot_config_dir}/chatmail.conf"   # {key} = a platform fact
    mode = "0644"                            # optional, default 0644
    owner = "root"                           # optional, default root (a platform key
    group = "root"                           #   such as "{vmail_user}" works too)
    reload = ["dovecot"]                     # optional: services to reload on change
                                             #   ("{coturn_service}": a platform fact)
    restart = ["dovecot"]                    # optional: services to restart on change
                                             #   (needed when a unit drop-in changes)
    when = "not config.ipv4_relay"           # optional Jinja expression
    kind = "file"                            # optional: "file" (default) is written by
                                             #   chatmaild.apply; any other kind is applied
                                             #   by chatmaild/components/<component>.py

Templates see `config` (chatmaild.config.Config), `platform` (the platform's facts as an
object: platform.postfix_map_type), `component` (the folder name) and `read_text(path)`
(a file's content without surrounding white space, "" if it does not exist: for secrets
generated at install, such as coturn's). Rendering never
touches the system: it returns RenderedFile objects; chatmaild.apply writes them.
"""

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

DEFAULT_DATA_DIR = "/usr/share/chatmail-relay"


class RenderError(Exception):
    """A template or manifest problem: a bug in the package, not the admin's input."""


def data_dir():
    """Where conf/ and postinst.d/ are: the installed package, or a checkout (tests)."""
    return Path(os.environ.get("CHATMAIL_DATA_DIR", DEFAULT_DATA_DIR))


def conf_dir():
    return data_dir() / "conf"


def platform_names():
    return sorted(_read_platform_table())


def _read_platform_table():
    """{platform: its facts}. A platform is a table with a name; its facts are [common]'s,
    overlaid by those of the table its `base` names, overlaid by its own."""
    with open(conf_dir() / "platform.toml", "rb") as f:
        tables = tomllib.load(f)
    common = tables.get("common", {})
    platforms = {}
    for name, table in tables.items():
        if "name" in table:
            base = tables[table["base"]] if "base" in table else {}
            facts = {**common, **base, **table}
            facts.pop("base", None)
            platforms[name] = facts
    return platforms


def detect_platform(os_release="/etc/os-release"):
    """The platform table's name for the running system, from os-release."""
    fields = {}
    try:
        with open(os_release, encoding="utf-8") as f:
            for line in f:
                key, _, value = line.strip().partition("=")
                fields[key] = value.strip('"')
    except FileNotFoundError:
        pass
    distro, version = fields.get("ID", ""), fields.get("VERSION_ID", "")
    if distro == "alpine":
        return "alpine"
    if distro == "debian" and version.split(".")[0] in ("12", "13"):
        return "debian" + version.split(".")[0]
    raise RenderError(
        f"unsupported system {distro} {version}: chatmail-relay supports Debian 12, "
        "Debian 13 and Alpine (set CHATMAIL_PLATFORM to override)"
    )


def load_platform(name=None):
    """The facts of platform `name` (default: $CHATMAIL_PLATFORM or the running system)."""
    name = name or os.environ.get("CHATMAIL_PLATFORM") or detect_platform()
    table = _read_platform_table()
    if name not in table:
        raise RenderError(f"unknown platform {name!r}; known: {', '.join(sorted(table))}")
    return SimpleNamespace(platform=name, **table[name])


@dataclass
class RenderedFile:
    component: str
    path: str
    content: str  # or bytes, for files a component's apply() makes (images)
    mode: int = 0o644
    owner: str = "root"
    group: str = "root"
    reload: list = field(default_factory=list)
    restart: list = field(default_factory=list)
    kind: str = "file"


def components():
    """The component folders of conf/, in name order."""
    return sorted(p.name for p in conf_dir().iterdir() if (p / "targets.toml").is_file())


def _jinja_environment(folder):
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(folder)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


def read_text(path):
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return ""


def _read_targets(folder):
    try:
        with open(folder / "targets.toml", "rb") as f:
            return tomllib.load(f).get("file", [])
    except tomllib.TOMLDecodeError as exc:
        raise RenderError(f"{folder}/targets.toml: {exc}") from None


def _expand(text, platform):
    try:
        return text.format(**vars(platform))
    except KeyError as exc:
        raise RenderError(f"{text!r} names no platform fact {exc}") from None


def render_component(component, config, platform):
    """Render the files of one conf/ folder; returns a list of RenderedFile."""
    folder = conf_dir() / component
    env = _jinja_environment(folder)
    context = {"config": config, "platform": platform, "component": component,
               "read_text": read_text}
    rendered = []
    for target in _read_targets(folder):
        when = target.get("when")
        if when and not env.compile_expression(when, undefined_to_none=False)(**context):
            continue
        try:
            template = env.get_template(target["template"])
            content = template.render(**context)
        except Exception as exc:  # jinja2's errors have no common useful base here
            raise RenderError(f"conf/{component}/{target.get('template')}: {exc}") from exc
        rendered.append(RenderedFile(
            component=component,
            path=_expand(target["path"], platform),
            content=content,
            mode=int(target.get("mode", "0644"), 8),
            owner=_expand(target.get("owner", "root"), platform),
            group=_expand(target.get("group", "root"), platform),
            reload=[_expand(name, platform) for name in target.get("reload", [])],
            restart=[_expand(name, platform) for name in target.get("restart", [])],
            kind=target.get("kind", "file"),
        ))
    return rendered


def render_all(config, platform):
    files = []
    for component in components():
        files.extend(render_component(component, config, platform))
    seen = {}
    for item in files:
        if item.path in seen:
            raise RenderError(f"{item.path} is rendered by both {seen[item.path]} and "
                              f"{item.component}")
        seen[item.path] = item.component
    return files
