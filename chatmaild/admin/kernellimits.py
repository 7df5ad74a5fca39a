"""The kernel limits of sysctl.d/60-chatmail-relay.conf, now: boots apply the file, but a
relay should not wait for a reboot. A running value is only raised, never lowered (the
admin may have set more); where /proc/sys is read-only (a container) the host's limits
apply, and we say which ones to raise there."""

LIMITS_FILE = "60-chatmail-relay.conf"


def wanted_limits(platform, host):
    """{key: value} of our sysctl file, or of the admin's file of the same name, which
    replaces ours at boot as here."""
    for folder in (platform.sysctl_admin_dir, platform.sysctl_dir):
        path = host.path(f"{folder}/{LIMITS_FILE}")
        if path.is_file():
            return parse_sysctl_file(path.read_text())
    return {}


def parse_sysctl_file(text):
    limits = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and line[:1].isalpha():
            limits[key.strip()] = int(value.strip())
    return limits


def raise_kernel_limits(platform, host, say):
    for key, wanted in wanted_limits(platform, host).items():
        path = host.path(f"/proc/sys/{key.replace('.', '/')}")
        try:
            current = int(path.read_text())
        except (OSError, ValueError):
            continue
        if current >= wanted:
            continue
        try:
            path.write_text(f"{wanted}\n")
        except OSError:
            say(f"warning: {key} is {current} and cannot be changed here; the relay needs "
                f"{wanted} (raise it on the host if this is a container)")
        else:
            say(f"raised {key} from {current} to {wanted}")
