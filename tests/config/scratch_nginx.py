"""A relay's web side running for real on free loopback ports: nginx with the rendered
conf/nginx files, the rendered conf/www site, fcgiwrap with the newemail CGI, and plain
TCP listeners standing in for Dovecot's 993 and Postfix's 465.

Only what a test machine lacks is changed in the rendered files: ports (443, 80, 8443,
465, 993 become free loopback ports), the IPv6 listeners, syslog logging, and the
certificate paths (a scratch self-signed pair). Everything else, locations, redirects,
the ALPN map and the fastcgi parameters, runs as rendered.
"""

import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from chatmaild.admin.apply import apply_files
from chatmaild.admin.components import nginx as nginx_component
from chatmaild.admin.components import www
from chatmaild.admin.render import render_component
from tests.conftest import REPO, free_port, stop_process

SYSLOG = "access_log syslog:server=unix:/dev/log,facility=local7;"
ADMIN_SITE_NAME = "admin.example"


class Listener:
    """A TCP listener standing in for Dovecot or Postfix: records the first bytes of
    the first connection it accepts."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(5)
        self.port = self.sock.getsockname()[1]

    def first_bytes(self):
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(5)
            return conn.recv(65536)

    def close(self):
        self.sock.close()


def client_hello(alpn):
    """The bytes of a TLS ClientHello that offers the `alpn` protocols."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="chat.example.org")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def wait_for(ready, proc, what, log, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited {proc.returncode}: {log()}")
        if ready():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what} not ready after {timeout}s: {log()}")


class ScratchRelay:
    """Start with ScratchRelay(config, platform, tmp_path).start(); stop() at the end."""

    def __init__(self, config, platform, tmp_path):
        self.config = config
        self.dir = tmp_path / "scratch-relay"
        self.dir.mkdir()
        self.platform = SimpleNamespace(**vars(platform))
        self.platform.web_root = str(self.dir / "www")
        self.platform.acme_webroot = str(self.dir / "acme")
        self.platform.state_dir = str(self.dir / "state")
        self.platform.libexec_dir = str(self.dir / "libexec")
        self.platform.fcgiwrap_socket = str(self.dir / "fcgiwrap.sock")
        self.ports = SimpleNamespace(
            mux=free_port(), http=free_port(), https=free_port())
        self.imap, self.smtp = Listener(), Listener()
        self.processes = []

    # -- setting up --------------------------------------------------------------------

    def start(self):
        self.cert, self.key = nginx_component.make_stand_in_certificate(self.dir)
        self.install_site()
        self.install_admin_site()
        self.install_newemail_cgi()
        self.install_nginx_config()
        self.start_fcgiwrap()
        self.start_nginx()
        return self

    def install_site(self):
        files = render_component("www", self.config, self.platform)
        apply_files(files, self.platform.state_dir)
        try:
            www.apply(files, self.platform)
        except ImportError:
            pass  # no python3-qrcode here: the page's image is then missing

    def install_admin_site(self):
        """An admin's own HTTPS site, moved to 127.0.0.1:8443 as the relay needs."""
        root = self.dir / "admin-site"
        root.mkdir()
        (root / "index.html").write_text("the admin's own site\n")
        self.admin_site = (
            "server {\n"
            "    listen 127.0.0.1:8443 ssl;\n"
            f"    server_name {ADMIN_SITE_NAME};\n"
            f"    ssl_certificate {self.cert};\n"
            f"    ssl_certificate_key {self.key};\n"
            f"    root {root};\n"
            "}\n")

    def install_newemail_cgi(self):
        """The CGI as the package installs it, but running this checkout's chatmaild."""
        libexec = Path(self.platform.libexec_dir)
        libexec.mkdir()
        cgi = libexec / "chatmail-newemail"
        cgi.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} "
                       "-m chatmaild.newemail\n")
        cgi.chmod(0o755)

    def install_nginx_config(self):
        for name in ("toplevel", "http", "temp"):
            (self.dir / name).mkdir()
        for item in render_component("nginx", self.config, self.platform):
            folder = "toplevel" if "stream {" in item.content else "http"
            (self.dir / folder / Path(item.path).name).write_text(
                self.on_scratch_ports(item.content))
        (self.dir / "http" / "admin.conf").write_text(
            self.admin_site.replace("127.0.0.1:8443", f"127.0.0.1:{self.ports.https}"))
        (self.dir / "nginx.conf").write_text(self.main_config())

    def on_scratch_ports(self, text):
        replacements = {
            "listen 443;": f"listen 127.0.0.1:{self.ports.mux};",
            "listen 80;": f"listen 127.0.0.1:{self.ports.http};",
            "127.0.0.1:8443": f"127.0.0.1:{self.ports.https}",
            "127.0.0.1:465;": f"127.0.0.1:{self.smtp.port};",
            "127.0.0.1:993;": f"127.0.0.1:{self.imap.port};",
            f" {self.config.tls_cert_path};": f" {self.cert};",
            f" {self.config.tls_key_path};": f" {self.key};",
            SYSLOG: f"access_log {self.dir}/access.log;",
        }
        for old, new in replacements.items():
            text = text.replace(old, new)
        return "".join(line for line in text.splitlines(keepends=True)
                       if "listen [::]" not in line)

    def main_config(self):
        """nginx.conf for a single unprivileged-path process (not Debian's: that one
        writes /run/nginx.pid and includes the host's sites)."""
        temp = self.dir / "temp"
        return f"""\
daemon off;
master_process off;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log info;
load_module {self.platform.nginx_stream_module};
events {{ worker_connections 64; }}
include {self.dir}/toplevel/*.conf;
http {{
    include {self.platform.nginx_config_dir}/mime.types;
    default_type application/octet-stream;
    client_body_temp_path {temp}/body;
    fastcgi_temp_path {temp}/fastcgi;
    proxy_temp_path {temp}/proxy;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    include {self.dir}/http/*.conf;
}}
"""

    def start_fcgiwrap(self):
        log = self.dir / "fcgiwrap.log"
        proc = subprocess.Popen(
            ["fcgiwrap", "-f", "-s", f"unix:{self.platform.fcgiwrap_socket}"],
            stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
        self.processes.append(proc)
        wait_for(lambda: os.path.exists(self.platform.fcgiwrap_socket), proc, "fcgiwrap",
                 lambda: log.read_text(errors="replace"))

    def start_nginx(self):
        proc = subprocess.Popen(
            [nginx_component.nginx_binary(), "-c", str(self.dir / "nginx.conf"),
             "-e", str(self.dir / "error.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.processes.append(proc)
        # Ready once a TLS handshake through the multiplexer reaches the HTTPS server (one
        # process: its other listeners are open by then too).
        wait_for(self.completes_a_handshake, proc, "nginx's port 443 multiplexer",
                 self.errors)

    def completes_a_handshake(self):
        context = ssl._create_unverified_context()
        try:
            with socket.create_connection(("127.0.0.1", self.ports.mux), timeout=2) as raw:
                with context.wrap_socket(raw):
                    return True
        except OSError:
            return False

    def errors(self):
        try:
            return (self.dir / "error.log").read_text(errors="replace")[-3000:]
        except FileNotFoundError:
            return "(no error log)"

    def stop(self):
        for proc in reversed(self.processes):
            stop_process(proc)
        self.imap.close()
        self.smtp.close()

    # -- talking to it -----------------------------------------------------------------

    def https(self, method, path, host=None, sni=None, alpn=None):
        """A request through the port 443 multiplexer: (status, headers, body)."""
        context = ssl._create_unverified_context()
        if alpn:
            context.set_alpn_protocols(alpn)
        raw = socket.create_connection(("127.0.0.1", self.ports.mux), timeout=10)
        with context.wrap_socket(raw, server_hostname=sni) as tls:
            return http_exchange(tls, method, path, host or self.config.mail_domain)

    def http(self, method, path, host=None):
        """A plain HTTP request to the port 80 server."""
        with socket.create_connection(("127.0.0.1", self.ports.http), timeout=10) as sock:
            return http_exchange(sock, method, path, host or self.config.mail_domain)

    def forward_alpn(self, alpn):
        """Send a ClientHello offering `alpn` to the multiplexer; returns the bytes the
        IMAP and SMTP stand-ins got, as {"imap": ..., "smtp": ...} for the one reached."""
        hello = client_hello(alpn)
        with socket.create_connection(("127.0.0.1", self.ports.mux), timeout=10) as sock:
            sock.sendall(hello)
            for name, listener in (("imap", self.imap), ("smtp", self.smtp)):
                listener.sock.settimeout(0.5)
                try:
                    return hello, {name: listener.first_bytes()}
                except TimeoutError:
                    continue
        return hello, {}


def http_exchange(sock, method, path, host):
    import http.client

    request = (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
               "Content-Length: 0\r\n\r\n")
    sock.sendall(request.encode())
    response = http.client.HTTPResponse(sock)
    response.begin()
    body = response.read()
    return response.status, dict(response.getheaders()), body
