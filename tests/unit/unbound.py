"""A real recursive resolver for tests: Unbound (Debian package `unbound`) on port 53 of a
free loopback address (resolv.conf has no port option; binding port 53 needs root),
resolving test zones from stub servers on this host only.

Each zone is either served by a given authoritative server (e.g. tests/unit/nsd.py) or
"stalled": sent to a UDP socket that takes queries and never answers, as the name servers
of a hostile or broken sender's domain may. Every other name is refused, so the resolver
never sends a query off this host.
"""

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from tests.unit.nsd import DnsDaemon, started_in_test

UNBOUND = shutil.which("unbound") or "/usr/sbin/unbound"

CONFIG = """\
server:
    interface: {address}
    port: 53
    do-ip6: no
    do-not-query-localhost: no
    access-control: 127.0.0.0/8 allow
    username: ""
    chroot: ""
    directory: "{dir}"
    pidfile: "{dir}/unbound.pid"
    use-syslog: no
    logfile: "{dir}/unbound.log"
    verbosity: 1
    num-threads: 1
    module-config: "iterator"
    local-zone: "." refuse
"""

ZONE = """\
    local-zone: "{name}." transparent
"""

STUB = """\
stub-zone:
    name: "{name}."
    stub-addr: 127.0.0.1@{port}
"""


def free_dns_address():
    """A loopback address whose port 53 is free."""
    for last in range(1, 255):
        address = f"127.53.0.{last}"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((address, 53))
            except OSError:
                continue
        return address
    raise AssertionError("no loopback address 127.53.0.x with a free port 53")


class Unbound(DnsDaemon):
    """Unbound resolving `zones` ({zone name: authoritative server's port on 127.0.0.1})
    and `stalled` zones (a silent socket) on port 53 of `self.address`."""

    name = "unbound"

    def __init__(self, directory, zones, stalled=()):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.address = free_dns_address()
        self.silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.silent.bind(("127.0.0.1", 0))
        stubs = dict(zones)
        stubs.update({name: self.silent.getsockname()[1] for name in stalled})
        config = CONFIG.format(address=self.address, dir=self.dir)
        config += "".join(ZONE.format(name=name) for name in stubs)
        config += "".join(STUB.format(name=name, port=port) for name, port in stubs.items())
        (self.dir / "unbound.conf").write_text(config)
        self.proc = subprocess.Popen([UNBOUND, "-d", "-c", str(self.dir / "unbound.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    @property
    def resolv_conf(self):
        """A resolv.conf naming this resolver, for programs that read one."""
        path = self.dir / "resolv.conf"
        path.write_text(f"nameserver {self.address}\n")
        return path

    def command_prefix(self):
        """A command prefix that runs a program with this resolver in its resolv.conf: a
        mount namespace of its own, so the program finds its resolver as on a relay."""
        script = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
        return ["unshare", "--mount", "sh", "-c", script, str(self.resolv_conf)]

    def wait_ready(self, timeout=10.0):
        self.wait_answering("ready.example.", "TXT", self.address, timeout=timeout)

    def stop(self):
        super().stop()
        self.silent.close()


@pytest.fixture
def unbound(tmp_path):
    """unbound(zones, stalled=()) -> a running Unbound."""
    if not Path(UNBOUND).exists():
        pytest.skip("needs Unbound (apt install unbound) for a real resolver")
    if os.geteuid() != 0:
        pytest.skip("needs root: the resolver listens on port 53")
    yield from started_in_test(lambda count, zones, stalled=(): Unbound(
        tmp_path / f"unbound{count}", zones, stalled))
