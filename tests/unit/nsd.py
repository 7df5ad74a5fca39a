"""A real authoritative DNS server for tests: NSD (Debian package `nsd`) on 127.0.0.1 and a
free port, serving a zone file the test writes.

NSD rather than a DNS server written in the test: it is an independent implementation
that loads the zone file `chatmail dns` prints exactly as an admin's DNS provider would,
so a syntax slip in our records fails the test; and being authoritative-only it never
sends a query anywhere, so tests stay on this host.
"""

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from tests.conftest import stop_process

NSD = shutil.which("nsd") or "/usr/sbin/nsd"

CONFIG = """\
server:
    ip-address: 127.0.0.1@{port}
    username: ""
    chroot: ""
    zonesdir: "{dir}"
    database: ""
    zonelistfile: "{dir}/zone.list"
    xfrdfile: "{dir}/xfrd.state"
    xfrdir: "{dir}"
    pidfile: "{dir}/nsd.pid"
    logfile: "{dir}/nsd.log"
    server-count: 1
    verbosity: 1
remote-control:
    control-enable: no
zone:
    name: "{origin}"
    zonefile: "{dir}/zone"
"""

ZONE_HEAD = """\
$ORIGIN {origin}.
$TTL 3600
@ IN SOA ns.{origin}. hostmaster.{origin}. 1 3600 600 86400 3600
@ IN NS ns.{origin}.
ns IN A 127.0.0.1
"""


class DnsDaemon:
    """What the tests' DNS server processes share: their log, waiting until they answer,
    and stopping them. `self.name` names the program and its log file in `self.dir`."""

    name = "dns"

    def log(self):
        path = self.dir / f"{self.name}.log"
        return path.read_text() if path.exists() else ""

    def wait_answering(self, qname, qtype, address, port=53, timeout=10.0):
        import dns.exception
        import dns.message
        import dns.query

        query = dns.message.make_query(qname, qtype)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}: "
                                     f"{self.proc.stderr.read().decode()}\n{self.log()}")
            try:
                dns.query.udp(query, address, port=port, timeout=0.2)
                return
            except (dns.exception.Timeout, OSError):
                time.sleep(0.05)
        raise AssertionError(f"{self.name} not answering after {timeout}s:\n{self.log()}")

    def stop(self):
        stop_process(self.proc)
        self.proc.stderr.close()


class Nsd(DnsDaemon):
    name = "nsd"

    def __init__(self, directory, origin, records, port):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.origin = origin.rstrip(".")
        self.port = port
        (self.dir / "nsd.conf").write_text(CONFIG.format(port=port, dir=self.dir,
                                                         origin=self.origin))
        (self.dir / "zone").write_text(ZONE_HEAD.format(origin=self.origin) + records)
        self.proc = subprocess.Popen([NSD, "-d", "-c", str(self.dir / "nsd.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_ready(self, timeout=10.0):
        self.wait_answering(self.origin + ".", "SOA", "127.0.0.1", self.port, timeout)


def started_in_test(make):
    """A fixture's body: yields start(*args, **kwargs), which makes a server with
    make(count so far, *args, **kwargs), waits until it answers and returns it; every server
    made is stopped after the test."""
    servers = []

    def start(*args, **kwargs):
        server = make(len(servers), *args, **kwargs)
        servers.append(server)
        server.wait_ready()
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def nsd(tmp_path):
    """nsd(origin, records) -> a running Nsd serving `records` (zone file lines)."""
    from ..conftest import free_port

    if not Path(NSD).exists():
        pytest.skip("needs NSD (apt install nsd) for a real DNS server")
    yield from started_in_test(lambda count, origin, records: Nsd(
        tmp_path / f"nsd{count}", origin, records, free_port()))
