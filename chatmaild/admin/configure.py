"""`chatmail configure`: apply chatmail.ini to the system.

The Debian postinst, the Alpine install scripts, certbot's deploy hook and an admin after
editing chatmail.ini all run the same pipeline, configure() below: make the relay's
directories and secrets, render every configuration file from chatmail.ini and the
platform's facts, validate them all with the daemons' own checkers and only then write
them (never over an admin's edit), and finally start, reload or restart what this run
changed (reloads.py decides). Three steps are small shell commands in <data_dir>/steps/,
because they drive shell tools: the DKIM key (opendkim-genkey), the TLS certificate
(openssl) and certbot; they get the few settings they need in the environment
(CHATMAIL_*, PLATFORM_*).

Everything the pipeline does to the system goes through a Host (host.py), the one seam
tests use to run it elsewhere.
"""

import os
from dataclasses import dataclass, field

from .apply import NEW_SUFFIX, ApplyResult, apply_files, record_created
from .components import component_module
from .components.postfix import make_alias_database
from .directories import make_directories
from .dkimrotate import Rotation, default_resolver
from .host import CommandFailed, Host, act
from .kernellimits import raise_kernel_limits
from .reloads import ServicesFailed, bring_up_services, host_service_manager
from .render import RenderError, render_all
from ..turn import generate_secret


class ConfigureFailed(Exception):
    """A step failed; the message says which and why. Steps before it are done."""


class InvalidConfiguration(Exception):
    """The rendered configuration does not pass a daemon's checker: nothing was written."""

    def __init__(self, problems):
        super().__init__("the new configuration is not valid, nothing was changed:\n" +
                         "\n".join(f"  {problem}" for problem in problems))


# What the shell steps read: the relay's settings and the platform's facts they use.
STEP_SETTINGS = ("mail_domain", "ipv4_relay", "tls_cert_mode", "tls_cert_path",
                 "tls_key_path", "acme_email")
STEP_FACTS = ("state_dir", "dkim_key_dir", "opendkim_user", "certbot_live_dir",
              "acme_webroot")


@dataclass
class Run:
    """One `chatmail configure`: what it works on, and what it changed so far."""

    config: object
    platform: object
    host: Host
    no_reload: bool = False
    reload: tuple = ()  # services the caller asks to reload (daemon names allowed)
    changes: ApplyResult = field(default_factory=ApplyResult)

    def say(self, message):
        print(f"chatmail: {message}", flush=True)


def configure(config, platform, host=None, no_reload=False, reload=(), steps=None):
    """Apply CONFIG on PLATFORM. Raises ConfigureFailed naming the step that failed.
    steps: the names of the steps to run (tests), default all."""
    run = Run(config, platform, host or Host(), no_reload, tuple(reload))
    unknown = set(steps or ()) - set(STEPS)
    if unknown:
        raise ValueError(f"no such steps: {', '.join(sorted(unknown))}")
    for name, step in STEPS.items():
        if steps is not None and name not in steps:
            continue
        print(f"chatmail configure: {name}", flush=True)
        try:
            step(run)
        except (CommandFailed, ServicesFailed, InvalidConfiguration, RenderError,
                OSError) as exc:
            raise ConfigureFailed(f"{name}: {exc}\n(nothing after this step was done)") \
                from None


def step_directories(run):
    make_directories(run.config, run.platform, run.host)


def step_kernel_limits(run):
    # In a chroot /proc/sys is the build host's: the limits apply when the system boots.
    if host_service_manager(run.platform, run.host).not_running(run.host):
        run.say("not raising kernel limits here: they apply when the system boots")
        return
    raise_kernel_limits(run.platform, run.host, run.say)


def step_turn_secret(run):
    """Made once per relay and never replaced: coturn and every credential handed out
    depend on it."""
    path = run.host.path(run.config.turn_secret_path)
    generate_secret(path, run.host.group_id(run.platform.vmail_user))
    record_created(run.host.path(run.platform.state_dir), run.config.turn_secret_path)


def step_dkim_rotation(run):
    """Sign with the new key of `chatmail dkim rotate` once DNS serves its record. DNS
    is asked only while a rotation is pending."""
    Rotation(run.config, run.platform, run.host, default_resolver(run.config),
             out=run.say).complete()


def shell_step(name):
    """The step <data_dir>/steps/NAME."""
    def step(run):
        script = f"{run.host.data_dir}/steps/{name}"
        act(run.host.run, [script], "the shell step", env=shell_step_environment(run))
    return step


def shell_step_environment(run):
    env = dict(os.environ)
    env.update(relay_settings(run.config))
    env.update(platform_settings(run.platform))
    env["CHATMAIL_DATA_DIR"] = run.host.data_dir
    env["CHATMAIL_NO_RELOAD"] = "1" if run.no_reload else ""
    return env


def relay_settings(config):
    """The settings the shell steps read, as environment variables (all strings)."""
    values = {key: getattr(config, key) or "" for key in STEP_SETTINGS}
    values["mail_domain"] = config.mail_domain_bare
    return {"CHATMAIL_" + key.upper(): str(value) for key, value in values.items()}


def platform_settings(platform):
    """The platform's facts the shell steps read, as environment variables."""
    return {"PLATFORM_" + key.upper(): str(getattr(platform, key)) for key in STEP_FACTS}


def step_files(run):
    run.changes = apply_configuration(run.config, run.platform, run.host)


def step_aliases(run):
    make_alias_database(run.platform, run.host, run.say)


def step_services(run):
    if run.no_reload:
        run.say("not starting or reloading services (--no-reload)")
        return
    bring_up_services(run.config, run.platform, run.host, run.say,
                      changed_reload=run.changes.reload, changed_restart=run.changes.restart,
                      asked_reload=[platform_service(run.platform, name)
                                    for name in run.reload])


STEPS = {
    "directories": step_directories,
    "kernel-limits": step_kernel_limits,
    "turn-secret": step_turn_secret,
    "dkim-key": shell_step("dkim-key"),
    "dkim-rotation": step_dkim_rotation,
    "tls-certificate": shell_step("tls-certificate"),
    "files": step_files,
    "aliases": step_aliases,
    "services": step_services,
    "acme-certificate": shell_step("acme-certificate"),
}


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


def apply_configuration(config, platform, host=None):
    """Render, validate, then write; returns the ApplyResult (what changed, what to
    reload or restart). On a validation problem nothing is written and the running
    configuration stays as it was: InvalidConfiguration."""
    root = host.root if host else "/"
    files = render_all(config, platform)
    problems = validate_components(files, platform)
    if problems:
        raise InvalidConfiguration(problems)
    result = apply_files(files, platform.state_dir, root)
    result.merge(apply_special_kinds(files, platform))
    report(result)
    return result


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
