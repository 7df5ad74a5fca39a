"""A small internet for system tests: network namespaces joined by a bridge, an
authoritative DNS server (Debian's nsd) for the test domains and an ACME server (Debian's
pebble), all on a private range that is routed nowhere else (../shared/spec/testing.md).

    with Internet() as net:
        net.add_host("relay-a", "10.231.0.10")      # a namespace for a container
        net.set_zone("relay-a.test", records)        # served by nsd
        net.directory_url, net.ca_certificates()     # pebble, and what to trust

Each host is a namespace /run/netns/<prefix>-<name> with one interface, eth0, whose peer
sits on the bridge in the hub namespace. Nothing is connected to the host's own network:
the namespaces have only their /24 and loopback. nsd and pebble run as host processes in
their namespaces (`ip netns exec`). close() (also run at exit, and for namespaces a
crashed earlier run left behind) kills them and deletes every namespace.
"""

import atexit
import ipaddress
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

PREFIX = "cmnet"
NETWORK = ipaddress.ip_network("10.231.0.0/24")  # never routed anywhere: no default route
DNS_ADDRESS = "10.231.0.2"
ACME_ADDRESS = "10.231.0.3"
ACME_PORT = 14000
ACME_MANAGEMENT_PORT = 15000


def ip(*args, check=True):
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def netns_exec(namespace, command, check=True, timeout=30, input=None):
    result = subprocess.run(["ip", "netns", "exec", namespace, *command], capture_output=True,
                            text=True, timeout=timeout, input=input)
    if check and result.returncode:
        raise RuntimeError(f"{' '.join(command)} in {namespace}: {result.stdout}{result.stderr}")
    return result


def remove_stale_namespaces():
    """Namespaces an earlier run (its process now gone) did not delete."""
    for name in ip("netns", "list").stdout.split():
        parts = name.split("-")
        if parts[0] != PREFIX or len(parts) < 3 or not parts[1].isdigit():
            continue
        if not Path(f"/proc/{parts[1]}").exists():
            ip("netns", "del", name, check=False)


# Looks up a name with dnspython at one server; run with Debian's python in a namespace.
DNS_QUERY = r"""
import sys, dns.resolver
resolver = dns.resolver.Resolver(configure=False)
resolver.nameservers = [sys.argv[1]]
resolver.lifetime = 2
answer = resolver.resolve(sys.argv[2], sys.argv[3], raise_on_no_answer=False)
print("\n".join(r.to_text() for r in (answer.rrset or [])))
"""


class Internet:
    def __init__(self, workdir=None):
        self.id = f"{PREFIX}-{os.getpid()}"
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="chatmail-net-", dir="/var/tmp"))
        self.hub = f"{self.id}-hub"
        self.hosts = {}  # name -> (namespace, address)
        self.zones = {}  # domain -> zone text
        self.processes = {}  # "nsd", "pebble" -> Popen
        self.closed = False
        atexit.register(self.close)

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self):
        remove_stale_namespaces()
        ip("netns", "add", self.hub)
        ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        ip("-n", self.hub, "link", "set", "br0", "up")
        ip("-n", self.hub, "link", "set", "lo", "up")
        self.add_host("dns", DNS_ADDRESS)
        self.add_host("acme", ACME_ADDRESS)
        self._write_ca()
        self._start_nsd()
        self._start_pebble()

    def close(self):
        if self.closed:
            return
        self.closed = True
        for name, process in list(self.processes.items()):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        if getattr(self, "pebble_log", None):
            self.pebble_log.close()
        for namespace, _ in self.hosts.values():
            ip("netns", "del", namespace, check=False)
        ip("netns", "del", self.hub, check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- hosts ----------------------------------------------------------------------------

    def namespace(self, name):
        return self.hosts[name][0]

    def address(self, name):
        return self.hosts[name][1]

    def add_host(self, name, address):
        """A namespace with eth0 at `address` on the bridge; its path for
        systemd-nspawn --network-namespace-path is /run/netns/<namespace>."""
        assert ipaddress.ip_address(address) in NETWORK
        namespace = f"{self.id}-{name}"
        ip("netns", "add", namespace)
        self.hosts[name] = (namespace, address)
        port = f"v{len(self.hosts)}"
        ip("-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0",
           "netns", namespace)
        ip("-n", self.hub, "link", "set", port, "master", "br0", "up")
        ip("-n", namespace, "link", "set", "lo", "up")
        ip("-n", namespace, "addr", "add", f"{address}/{NETWORK.prefixlen}", "dev", "eth0")
        ip("-n", namespace, "link", "set", "eth0", "up")
        return namespace

    def set_link(self, name, up):
        """Plug (up=True) or unplug a host's cable at the bridge."""
        port = f"v{list(self.hosts).index(name) + 1}"
        ip("-n", self.hub, "link", "set", port, "up" if up else "down")

    def resolv_conf(self):
        return f"nameserver {DNS_ADDRESS}\noptions timeout:2 attempts:2\n"

    # -- DNS ------------------------------------------------------------------------------

    def set_zone(self, domain, records, serial=None):
        """Serve `records` (zone file lines with absolute names, e.g. `chatmail dns`
        output) as the zone of `domain`, with an SOA and ns1.<domain> as its name server.
        nsd is restarted and answers the new serial before this returns."""
        serial = serial or int(time.time())
        self.zones[domain] = (
            f"$TTL 60\n"
            f"{domain}. 60 IN SOA ns1.{domain}. hostmaster.{domain}. {serial} 60 60 600 60\n"
            f"{domain}. 60 IN NS ns1.{domain}.\n"
            f"ns1.{domain}. 60 IN A {DNS_ADDRESS}\n"
            f"{records}\n"
        )
        self._start_nsd()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            soa = self.query(f"{domain}.", "SOA", check=False)
            if f" {serial} " in soa:
                return
            time.sleep(0.2)
        raise RuntimeError(f"nsd does not serve zone {domain}: {self._nsd_log()}")

    def query(self, name, rtype, check=True):
        """What nsd answers for (name, rtype), one record per line."""
        result = netns_exec(self.namespace("dns"), ["/usr/bin/python3", "-c", DNS_QUERY,
                                                    DNS_ADDRESS, name, rtype], check=check)
        return result.stdout

    def _nsd_log(self):
        path = self.workdir / "nsd" / "nsd.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def _start_nsd(self):
        old = self.processes.pop("nsd", None)
        if old and old.poll() is None:
            old.terminate()
            old.wait(10)
        directory = self.workdir / "nsd"
        directory.mkdir(exist_ok=True)
        zones = []
        for domain, text in self.zones.items():
            (directory / f"{domain}.zone").write_text(text)
            zones.append(f"zone:\n  name: {domain}\n  zonefile: {domain}.zone\n")
        conf = directory / "nsd.conf"
        conf.write_text(
            "server:\n"
            f"  ip-address: {DNS_ADDRESS}\n"
            "  port: 53\n"
            '  username: ""\n'
            '  database: ""\n'
            f"  zonesdir: {directory}\n"
            f"  zonelistfile: {directory}/zone.list\n"
            f"  xfrdfile: {directory}/xfrd.state\n"
            f"  xfrdir: {directory}\n"
            f"  pidfile: {directory}/nsd.pid\n"
            f"  logfile: {directory}/nsd.log\n"
            "  server-count: 1\n"
            "  verbosity: 1\n"
            "remote-control:\n"
            "  control-enable: no\n"
            + "".join(zones))
        check = subprocess.run(["nsd-checkconf", str(conf)], capture_output=True, text=True)
        if check.returncode:
            raise RuntimeError(f"nsd-checkconf: {check.stdout}{check.stderr}")
        for domain in self.zones:
            check = subprocess.run(["nsd-checkzone", domain, str(directory / f"{domain}.zone")],
                                   capture_output=True, text=True)
            if check.returncode:
                raise RuntimeError(f"nsd-checkzone {domain}: {check.stdout}{check.stderr}")
        (directory / "zone.list").unlink(missing_ok=True)
        self.processes["nsd"] = subprocess.Popen(
            ["ip", "netns", "exec", self.namespace("dns"), "nsd", "-d", "-c", str(conf)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_for_port(self.namespace("dns"), DNS_ADDRESS, 53, "nsd", udp=True)

    # -- ACME -----------------------------------------------------------------------------

    @property
    def directory_url(self):
        return f"https://{ACME_ADDRESS}:{ACME_PORT}/dir"

    def _write_ca(self):
        """A CA for pebble's own HTTPS listener (the Debian package ships no test
        certificates) and pebble's certificate for its address."""
        directory = self.workdir / "ca"
        directory.mkdir()
        self.listener_ca = directory / "test-network-ca.pem"

        def openssl(*args):
            subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-noenc",
                "-days", "2", "-keyout", "ca.key", "-out", self.listener_ca.name,
                "-subj", "/CN=chatmail test network CA",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-noenc",
                "-keyout", "acme.key", "-out", "acme.csr", "-subj", "/CN=acme.test")
        (directory / "ext").write_text(
            f"subjectAltName=IP:{ACME_ADDRESS},DNS:acme.test\n"
            "basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n")
        openssl("x509", "-req", "-in", "acme.csr", "-CA", self.listener_ca.name,
                "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-out", "acme.pem",
                "-extfile", "ext")

    def _start_pebble(self):
        directory = self.workdir / "ca"
        config = directory / "pebble.json"
        config.write_text(json.dumps({"pebble": {
            "listenAddress": f"{ACME_ADDRESS}:{ACME_PORT}",
            "managementListenAddress": f"{ACME_ADDRESS}:{ACME_MANAGEMENT_PORT}",
            "certificate": str(directory / "acme.pem"),
            "privateKey": str(directory / "acme.key"),
            # HTTP-01 and TLS-ALPN-01 where real CAs look: ports 80 and 443
            "httpPort": 80,
            "tlsPort": 443,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }}))
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0")
        self.pebble_log = open(self.workdir / "pebble.log", "wb")
        self.processes["pebble"] = subprocess.Popen(
            ["ip", "netns", "exec", self.namespace("acme"), "pebble", "-config", str(config),
             "-dnsserver", f"{DNS_ADDRESS}:53"],
            stdin=subprocess.DEVNULL, stdout=self.pebble_log, stderr=subprocess.STDOUT,
            env=env)
        self._wait_for_port(self.namespace("acme"), ACME_ADDRESS, ACME_PORT, "pebble")
        self._wait_for_port(self.namespace("acme"), ACME_ADDRESS, ACME_MANAGEMENT_PORT,
                            "pebble")

    def pebble_log_text(self):
        return (self.workdir / "pebble.log").read_text(errors="replace")

    def ca_certificates(self):
        """{file name: PEM} to trust on the test hosts: the CA of pebble's listener and the
        roots pebble issues under (new on every start of pebble)."""
        roots = netns_exec(self.namespace("acme"), [
            "curl", "-fsS", "--cacert", str(self.listener_ca),
            f"https://{ACME_ADDRESS}:{ACME_MANAGEMENT_PORT}/roots/0"]).stdout
        return {"chatmail-test-network-ca.crt": self.listener_ca.read_text(),
                "pebble-root.crt": roots}

    def _wait_for_port(self, namespace, address, port, what, udp=False, timeout=20):
        if udp:  # any DNS answer will do (REFUSED too)
            probe = ("import dns.message, dns.query; dns.query.udp("
                     f"dns.message.make_query('.', 'SOA'), '{address}', timeout=1, port={port})")
        else:
            probe = ("import socket; socket.create_connection("
                     f"('{address}', {port}), timeout=1)")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.processes[what].poll() is not None:
                raise RuntimeError(f"{what} exited: {self._nsd_log() if what == 'nsd' else ''}"
                                   f"{self.pebble_log_text() if what == 'pebble' else ''}")
            if netns_exec(namespace, ["/usr/bin/python3", "-c", probe], check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"{what} does not answer on {address}:{port}")
