"""The relay's own services, from conf/services.toml, and the service manager's units for
them on a platform.

    python3 -m chatmaild.admin.services services|sockets|systemd-units|openrc-instances

prints the names space-separated: the services, their socket units, all their systemd
units (daily timers, sockets, services: what a removal stops), or the other daemons the
relay runs under init scripts of its own on OpenRC, on this system's platform (debian/rules
and Alpine's APKBUILD ask when they build the package).
"""

import sys
import tomllib

from .platform import conf_dir, load_platform


def read_services():
    """{name: its settings}, in the order they start, each with the shared settings (the
    table's top-level keys) it does not set itself."""
    with open(conf_dir() / "services.toml", "rb") as f:
        table = tomllib.load(f)
    shared = {key: value for key, value in table.items() if not isinstance(value, dict)}
    return {name: {**shared, **service} for name, service in table.items()
            if isinstance(service, dict)}


def relay_services():
    """Their names, in the order they start."""
    return list(read_services())


def relay_sockets(platform):
    """The socket units the service manager listens on for them (none without socket
    activation)."""
    if not platform.socket_activation:
        return []
    return [f"{name}.socket" for name, service in read_services().items()
            if "port" in service]


def systemd_units(platform):
    """Every systemd unit of the relay's own: daily timers, sockets, services."""
    timers = [unit for unit in platform.relay_timers.split() if unit.endswith(".timer")]
    return timers + relay_sockets(platform) + [f"{name}.service" for name in relay_services()]


def openrc_instances(platform):
    """On OpenRC, the other packages' daemons that the relay runs as services of its own
    (/new's fcgiwrap, Dovecot, OpenDKIM: platform.toml says why for each); the install
    scripts enable them and a removal stops them like the relay's own services."""
    if platform.service_manager != "openrc":
        return []
    return [platform.fcgiwrap_service, platform.dovecot_service, platform.opendkim_service]


LISTS = {
    "services": lambda platform: relay_services(),
    "sockets": relay_sockets,
    "systemd-units": systemd_units,
    "openrc-instances": openrc_instances,
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in LISTS:
        print(f"usage: python3 -m chatmaild.admin.services {'|'.join(LISTS)}",
              file=sys.stderr)
        return 2
    print(" ".join(LISTS[argv[0]](load_platform())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
