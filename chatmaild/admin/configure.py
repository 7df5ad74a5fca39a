"""`chatmail configure`: apply chatmail.ini to the system.

The Debian postinst, the Alpine post-install and an admin after editing chatmail.ini all
run the same thing: the steps in <data_dir>/postinst.d/, named NN-name, in order. Steps
are POSIX shell scripts; they get the relay's settings and the platform's facts in the
environment (CHATMAIL_* and PLATFORM_*), so none of them parses chatmail.ini or asks
which distribution it runs on. One step calls `chatmail apply-files`, which renders
conf/, validates every component with its daemon's own checker and only then writes
anything (apply_configuration below). Services to reload are collected in the file
$CHATMAIL_RELOAD_LIST; services to restart (a changed unit drop-in) in
<state_dir>/pending-restarts, kept until done. The services step acts on both.
"""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from .apply import NEW_SUFFIX, ApplyResult, apply_files
from .components import component_module
from .platform import data_dir
from .render import render_all
from .services import relay_services, relay_sockets

PENDING_RESTARTS = "pending-restarts"
STEP_NAME = re.compile(r"^[0-9][0-9]-[a-z0-9][a-z0-9-]*$")


class StepFailed(Exception):
    pass


def steps_dir():
    return data_dir() / "postinst.d"


def list_steps(folder=None):
    folder = Path(folder) if folder else steps_dir()
    return sorted(p for p in folder.iterdir() if STEP_NAME.match(p.name) and p.is_file())


def relay_settings(config):
    """The settings steps need, as environment variables (all strings)."""
    values = {
        "mail_domain": config.mail_domain_bare,
        "mail_domain_full": config.mail_domain,
        "ipv4_relay": config.ipv4_relay or "",
        "tls_cert_mode": config.tls_cert_mode,
        "tls_cert_path": config.tls_cert_path,
        "tls_key_path": config.tls_key_path,
        "acme_email": config.acme_email,
        "mailboxes_dir": str(config.mailboxes_dir),
        "turn_secret_path": config.turn_secret_path,
        "disable_ipv6": "true" if config.disable_ipv6 else "false",
        "mtail_address": config.mtail_address or "",
    }
    return {"CHATMAIL_" + key.upper(): value for key, value in values.items()}


def platform_settings(platform):
    """The platform's facts, and the relay's services and sockets on it (services.toml),
    as environment variables (all strings)."""
    facts = {key: str(value) for key, value in vars(platform).items()}
    facts["relay_services"] = " ".join(relay_services())
    facts["relay_sockets"] = " ".join(relay_sockets(platform))
    return {"PLATFORM_" + key.upper(): value for key, value in facts.items()}


def step_environment(config, platform, reload_list, no_reload):
    env = dict(os.environ)
    env.update(relay_settings(config))
    env.update(platform_settings(platform))
    env["CHATMAIL_INI"] = str(config.inipath)
    env["CHATMAIL_DATA_DIR"] = str(data_dir())
    env["CHATMAIL_RELOAD_LIST"] = str(reload_list)
    env["CHATMAIL_NO_RELOAD"] = "1" if no_reload else ""
    return env


def run_steps(config, platform, no_reload=False, reload=(), folder=None, out=None):
    """Run every step in order; raise StepFailed naming the step that failed.
    `reload`: services to reload even if none of their files changed."""
    with tempfile.TemporaryDirectory(prefix="chatmail-configure.") as tmp:
        reload_list = Path(tmp) / "reload"
        reload_list.write_text("".join(f"{platform_service(platform, name)}\n"
                                       for name in reload))
        env = step_environment(config, platform, reload_list, no_reload)
        for step in list_steps(folder):
            print(f"chatmail configure: {step.name}", file=out or sys.stdout, flush=True)
            code = subprocess.run([str(step)], env=env).returncode
            if code:
                raise StepFailed(f"step {step.name} failed (exit status {code}); "
                                 "nothing after it was done")


def platform_service(platform, name):
    """The service that runs daemon NAME here: `--reload dovecot` (certbot's deploy hook)
    reloads chatmail-dovecot on Alpine. Other names are services already."""
    return getattr(platform, f"{name}_service", name)


def group_by_component(files, kinds=None):
    groups = {}
    for item in files:
        if kinds is None or item.kind in kinds:
            groups.setdefault(item.component, []).append(item)
    return sorted(groups.items())


def validate_components(files, platform):
    """Problems found by each component's validate(); empty when everything is valid."""
    problems = []
    for component, items in group_by_component(files):
        module = component_module(component)
        if module is not None and hasattr(module, "validate"):
            problems += [f"{component}: {p}" for p in module.validate(items, platform)]
    return problems


def apply_configuration(config, platform, reload_list=None):
    """Render, validate, then write. Returns an exit code; on a validation problem
    nothing is written and the running configuration stays as it was."""
    files = render_all(config, platform)
    problems = validate_components(files, platform)
    if problems:
        print("chatmail: the new configuration is not valid, nothing was changed:",
              file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    result = apply_files(files, platform.state_dir)
    result.merge(apply_special_kinds(files, platform))
    report(result)
    if reload_list:
        with open(reload_list, "a", encoding="utf-8") as f:
            f.writelines(f"{service}\n" for service in sorted(result.reload))
    if result.restart:
        # Kept until the services step has done it: a restart that was interrupted or
        # failed is retried by the next `chatmail configure`, or the daemon would keep
        # running with a unit definition that is no longer on disk.
        pending = Path(platform.state_dir) / PENDING_RESTARTS
        with open(pending, "a", encoding="utf-8") as f:
            f.writelines(f"{service}\n" for service in sorted(result.restart))
    return 0


def apply_special_kinds(files, platform):
    """Hand files of kinds other than "file" to their component's apply()."""
    result = ApplyResult()
    special = {item.kind for item in files} - {"file"}
    for component, items in group_by_component(files, special):
        result.merge(component_module(component).apply(items, platform))
    return result


def report(result):
    for path in result.changed:
        print(f"  updated {path}")
    for path in result.removed:
        print(f"  removed {path} (no longer needed)")
    for path in result.orphaned:
        print(f"  {path} is no longer needed, but you changed it: left in place")
    for path in result.kept:
        print(f"  kept your changes to {path}; the new version is {path}{NEW_SUFFIX}"
              " (merge it, then run 'chatmail configure')")
