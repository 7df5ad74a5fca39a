"""The relay's own services, from conf/services.toml, and the service manager's units for
them on a platform.

    python3 -m chatmaild.admin.services services|sockets|systemd-units   (debian/rules)

prints the names space-separated: the services, their socket units, or all their systemd
units (daily timers, sockets, services: what a removal stops) on this system's platform.
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


LISTS = {
    "services": lambda platform: relay_services(),
    "sockets": relay_sockets,
    "systemd-units": systemd_units,
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
