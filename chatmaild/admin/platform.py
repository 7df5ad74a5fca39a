"""The platform we run on and its facts, from conf/platform.toml: what differs between the
distributions we package for (paths, users, service names, Dovecot's version).

conf/platform.toml holds [common] (the facts every platform shares), tables that only
other tables build on ([debian]: what both Debian releases share), and one table per
platform, which has a `name` and may name a `base`. A platform's facts are [common]'s,
overlaid by its base's, overlaid by its own.
"""

import os
import tomllib
from pathlib import Path
from types import SimpleNamespace

DEFAULT_DATA_DIR = "/usr/share/chatmail-relay"


class PlatformError(Exception):
    """The running system is not one we package for, or no such platform is known."""


def data_dir():
    """Where conf/ and steps/ are: the installed package, or a checkout (tests)."""
    return Path(os.environ.get("CHATMAIL_DATA_DIR", DEFAULT_DATA_DIR))


def conf_dir():
    return data_dir() / "conf"


def platform_names():
    return sorted(read_platform_table())


def read_platform_table():
    """{platform: its facts}."""
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
    raise PlatformError(
        f"unsupported system {distro} {version}: chatmail-relay supports Debian 12, "
        "Debian 13 and Alpine (set CHATMAIL_PLATFORM to override)"
    )


def load_platform(name=None):
    """The facts of platform `name` (default: $CHATMAIL_PLATFORM or the running system)."""
    name = name or os.environ.get("CHATMAIL_PLATFORM") or detect_platform()
    table = read_platform_table()
    if name not in table:
        raise PlatformError(f"unknown platform {name!r}; known: {', '.join(sorted(table))}")
    return SimpleNamespace(platform=name, **table[name])
