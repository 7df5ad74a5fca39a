"""Render the relay's configuration files from conf/ templates, chatmail.ini and the
platform table.

conf/platform.toml   the facts that differ between distributions (chatmaild.admin.platform)
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
                                             #   chatmaild.admin.apply; any other kind is applied
                                             #   by chatmaild/admin/components/<component>.py

Templates see `config` (chatmaild.config.Config), `platform` (the platform's facts as an
object: platform.postfix_map_type), `component` (the folder name) and `read_text(path)`
(a file's content without surrounding white space, "" if it does not exist: for secrets
generated at install, such as coturn's) and `exists(path)` (for what an optional package
installs, such as a Dovecot plugin). Rendering never
touches the system: it returns RenderedFile objects; chatmaild.admin.apply writes them.
"""

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .platform import conf_dir

class RenderError(Exception):
    """A template or manifest problem: a bug in the package, not the admin's input."""


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


def exists(path):
    return Path(path).exists()


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
               "read_text": read_text, "exists": exists}
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
