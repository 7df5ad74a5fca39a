"""systemd's two protocols for services, without libsystemd (python3-systemd would be a
new dependency for a few lines): sockets passed by socket activation, as sd_listen_fds(3)
takes them, and state notifications to the service manager, as sd_notify(3) sends them.

Both do nothing when the process was not started that way (OpenRC, tests, a manual run):
listen_fds() returns no sockets and notify() sends nothing.
"""

import logging
import os
import socket

log = logging.getLogger(__name__)

# The first passed descriptor; systemd passes LISTEN_FDS of them in a row.
SD_LISTEN_FDS_START = 3
LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def listen_fds():
    """The listening sockets systemd passed to this process, in the order of the socket
    unit's Listen* lines; [] when none were passed.

    The variables are inherited by children, which must not take the descriptors for
    theirs: they count only when LISTEN_PID is this process, and are removed once read.
    """
    passed_to = os.environ.get("LISTEN_PID", "")
    count = os.environ.get("LISTEN_FDS", "")
    for name in LISTEN_VARIABLES:
        os.environ.pop(name, None)
    if passed_to != str(os.getpid()) or not count.isdigit():
        return []
    fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count))
    for fd in fds:
        # systemd leaves them inheritable, for this process's exec; not for its children.
        os.set_inheritable(fd, False)
    return [socket.socket(fileno=fd) for fd in fds]


def notify_address():
    """Where NOTIFY_SOCKET says notifications go: a path, or a name in the abstract
    namespace when it starts with '@'. None when no service manager listens."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return None
    if address.startswith("@"):
        return "\0" + address[1:]
    return address


def notify(*assignments):
    """Tell the service manager about this service, e.g. notify("READY=1"). True when it
    was sent, False when no service manager asked for notifications or sending failed
    (logged: systemd then decides by its timeouts)."""
    address = notify_address()
    if address is None:
        return False
    message = "\n".join(assignments).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s",
                    os.environ["NOTIFY_SOCKET"], exc)
        return False
    return True
