"""The last part of `chatmail configure`: start what is not running and reload or restart
what changed, in dependency order: the dict services before Dovecot (it needs their
sockets), Dovecot before Postfix (SASL and LMTP sockets), OpenDKIM before Postfix
(milter).

What to do follows from what this run changed (the configuration files written, a unit
drop-in that needs a restart, chatmail.ini itself) and from what the caller asks
(`--reload`). Restarts are remembered in <state_dir>/configure-state.json until they are
done, so that one interrupted or failed is retried by the next run; so is the hash of
chatmail.ini as last applied, which the relay's own services read only when they start.
"""

import hashlib
import json
import os
from dataclasses import dataclass, field

from ..files import write_atomic
from .host import CommandFailed, act
from .servicemanager import dead_master_pid, service_manager
from .services import relay_services, relay_sockets

STATE_FILE = "configure-state.json"
# What versions before 0.6 kept in two files of their own.
LEGACY_PENDING_RESTARTS = "pending-restarts"
LEGACY_INI_HASH = "chatmail.ini.sha256"


class ServicesFailed(Exception):
    """A required service did not come up; the message says which."""


@dataclass
class ConfigureState:
    """What `chatmail configure` remembers between runs."""

    ini_sha256: str = ""
    pending_restarts: set = field(default_factory=set)

    @classmethod
    def load(cls, state_dir):
        try:
            with open(os.path.join(state_dir, STATE_FILE), encoding="utf-8") as f:
                data = json.load(f)
            return cls(data.get("chatmail_ini_sha256", ""),
                       set(data.get("pending_restarts", [])))
        except FileNotFoundError:
            return cls.load_legacy(state_dir)
        except ValueError:
            # Damaged: the next run reloads the relay's services once, which is harmless.
            return cls()

    @classmethod
    def load_legacy(cls, state_dir):
        def read(name):
            try:
                with open(os.path.join(state_dir, name), encoding="utf-8") as f:
                    return f.read()
            except FileNotFoundError:
                return ""

        return cls(read(LEGACY_INI_HASH).strip(),
                   set(read(LEGACY_PENDING_RESTARTS).split()))

    def save(self, state_dir):
        data = {"chatmail_ini_sha256": self.ini_sha256,
                "pending_restarts": sorted(self.pending_restarts)}
        write_atomic(os.path.join(state_dir, STATE_FILE),
                     (json.dumps(data, indent=1) + "\n").encode(), 0o644)
        for name in (LEGACY_PENDING_RESTARTS, LEGACY_INI_HASH):
            try:
                os.unlink(os.path.join(state_dir, name))
            except FileNotFoundError:
                pass


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class ServicePlan:
    """Which services to restart and which to reload, and how to bring one up."""

    def __init__(self, manager, host, say, restart, reload):
        self.manager, self.host, self.say = manager, host, say
        self.restart, self.reload = set(restart), set(reload)

    def do(self, action, name):
        self.manager.do(action, name, self.host.has_command)

    def bring_up(self, name):
        """Restart, reload or start NAME, as what changed requires."""
        if name in self.restart:
            # A changed unit drop-in (e.g. Dovecot's -c) only takes effect on a restart.
            self.say(f"restarting {name}")
            self.do("restart", name)
        elif name in self.reload:
            self.say(f"reloading {name}")
            self.do("reload-or-restart", name)
        elif not self.manager.is_active(name):
            self.say(f"starting {name}")
            self.do("start", name)

    def bring_up_socket(self, socket):
        """As bring_up, for the socket a filter is started on. A filter started without it
        (before socket activation: the upgrade to it) still listens on the port itself;
        restarting the filter lets systemd stop it, listen and start the new one on the
        socket in one go, without a pause in between."""
        service = socket.removesuffix(".socket")
        if not self.manager.is_active(socket) and self.manager.is_active(service):
            self.say(f"restarting {service} on {socket}")
            self.do("restart", service)
        else:
            self.bring_up(socket)


def relay_daemons(config, platform):
    """The system's daemons the relay configures, in the order they start."""
    daemons = [platform.dovecot_service]
    if not config.ipv4_relay:
        daemons.append(platform.opendkim_service)
    return daemons + ["postfix", "nginx", platform.fcgiwrap_service]


def host_service_manager(platform, host):
    return service_manager(platform, host.run, init_dir=host.path("/etc/init.d"),
                           runlevels_dir=host.path("/etc/runlevels"))


def bring_up_services(config, platform, host, say, changed_reload=(), changed_restart=(),
                      asked_reload=()):
    """Start, reload and restart the relay's services as this run's changes require.
    Raises ServicesFailed when a required one does not come up."""
    manager = host_service_manager(platform, host)
    # A container without an init system has the relay's files but nothing to run its
    # services with: say so once, instead of a "not found" per service.
    problem = manager.missing(host)
    if problem:
        raise ServicesFailed(problem)
    # A chroot or an image build (debootstrap, piuparts): the files are in place, and
    # the services start with them when the system boots.
    offline = manager.not_running(host)
    if offline:
        say(f"{offline}: the relay's services start when it boots")
        return
    state_dir = host.path(platform.state_dir)
    state = ConfigureState.load(state_dir)
    # Remembered before anything is done: a restart interrupted now is done next time.
    state.pending_restarts |= set(changed_restart)
    state.save(state_dir)
    reload = set(changed_reload) | set(asked_reload)
    ini_sha256 = file_sha256(config.inipath)  # read by us, as config was
    ours = relay_services()
    if ini_sha256 != state.ini_sha256:
        reload |= set(ours)
    plan = ServicePlan(manager, host, say, state.pending_restarts, reload)
    try:
        prepare_service_manager(platform, manager, host, say)
        if retire_previous_release_postfix(platform, manager, host, say):
            plan.restart.add("postfix")
        sockets = relay_sockets(platform)
        daemons = relay_daemons(config, platform)
        for socket in sockets:
            plan.bring_up_socket(socket)
        for name in ours + daemons:
            plan.bring_up(name)
        optional = [platform.coturn_service] if host.has_command("turnserver") else []
        for name in optional:
            bring_up_optional(plan, name, platform, say)
        others = sorted((plan.restart | plan.reload) - set(sockets + ours + daemons + optional))
        state.pending_restarts = {name for name in others
                                  if not restart_system_service(plan, name, say)}
        state.save(state_dir)
        # Daily expiry and storage report: their timers, or the cron daemon that runs them.
        for timer in platform.relay_timers.split():
            if not manager.is_active(timer):
                plan.do("start", timer)
    except CommandFailed as exc:
        raise ServicesFailed(str(exc)) from None
    state.ini_sha256 = ini_sha256
    state.save(state_dir)


def bring_up_optional(plan, name, platform, say):
    """The relay works without it: a failure is a warning."""
    try:
        plan.bring_up(name)
    except CommandFailed:
        log = f"'journalctl -u {name}'" if platform.service_manager == "systemd" \
            else "the system log"
        say(f"warning: {name} did not start; the relay works without it (no TURN for")
        say(f"calls). See {log} (coturn needs a non-loopback address).")


def restart_system_service(plan, name, say):
    """A service outside the relay whose configuration changed (journald). The relay works
    without its new settings: a failure is a warning, and the restart stays pending for
    the next run. Returns whether it was restarted."""
    say(f"restarting {name}")
    try:
        plan.do("reload-or-restart", name)
        return True
    except CommandFailed:
        pass
    # Never leave it stopped: journald down means no logs at all.
    if not plan.manager.is_active(name):
        try:
            plan.manager.start_failed(name)
            say(f"{name} did not restart; started it again")
            return True
        except CommandFailed:
            pass
    now = "running with its old settings" if plan.manager.is_active(name) else "NOT RUNNING"
    say(f"warning: {name} did not restart and is {now}; 'chatmail configure' tries")
    say(f"again next time (see 'systemctl status {name}').")
    return False


def retire_previous_release_postfix(platform, manager, host, say):
    """After the upgrade to Debian 13 and before the reboot, Postfix still runs as
    Debian 12's postfix@- (platform.postfix_retired_service). Debian 13's postfix.service
    runs Postfix itself and Conflicts= with that instance, which is PartOf= it, so
    restarting it fails ("conflicting jobs") while the instance runs: stop the instance
    (nothing enables it any more). Returns whether it did, Postfix then being down until
    postfix.service starts."""
    old = platform.postfix_retired_service
    if not old or not manager.is_active(old):
        return False
    say(f"stopping {old} (the previous release's Postfix; "
        f"{platform.postfix_instance_service} runs it now)")
    manager.do("stop", old, host.has_command)
    return True


def prepare_service_manager(platform, manager, host, say):
    if platform.service_manager == "systemd":
        manager.reload_units()
        return
    # OpenRC: a service the relay may start now (coturn, installed since) also comes back
    # after a reboot. Alpine's package installs the helper; those the admin took out stay
    # out.
    enable_services = f"{host.data_dir}/enable-services"
    if os.access(host.path(enable_services), os.X_OK):
        act(host.run, [enable_services], "enable-services")
    retire_packaged_dovecot(platform, manager, host, say)
    forget_dead_postfix(platform, manager, host, say)


def retire_packaged_dovecot(platform, manager, host, say):
    """On Alpine the relay runs Dovecot as its own service (chatmail-dovecot); the dovecot
    package's service, started or enabled before, would take the same ports."""
    if platform.dovecot_service == "dovecot":
        return
    if manager.is_active("dovecot"):
        say(f"stopping dovecot: the relay runs Dovecot as {platform.dovecot_service}")
        manager.do("stop", "dovecot")
    if host.path("/etc/runlevels/default/dovecot").exists():
        host.run(["rc-update", "del", "dovecot", "default"])


def forget_dead_postfix(platform, manager, host, say):
    """Alpine's postfix init script keeps no pid file of its own, so OpenRC goes on
    counting Postfix as started after its master process died (or was stopped behind its
    back), and would neither start nor reload it. Postfix's own pid file tells: forget
    the state of a dead one, so that it is started."""
    if not manager.is_active("postfix"):
        return
    pid_file = host.path(f"{platform.postfix_queue_dir}/pid/master.pid")
    if dead_master_pid(pid_file, host.path("/proc")) is None:
        return
    say("postfix is not running, although OpenRC counts it as started: starting it")
    manager.forget("postfix")
