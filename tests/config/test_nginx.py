"""conf/nginx: rendered for every relay configuration, checked with the real `nginx -T`
beside Debian's own nginx configuration and an admin's sites, and run for real."""

import json
import re
import shutil
import ssl
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest

from chatmaild.admin.components import nginx
from chatmaild.admin.platform import load_platform
from chatmaild.config import read_config
from tests.config.scratch_nginx import ADMIN_SITE_NAME, ScratchRelay
from tests.conftest import block

STREAM = "/etc/nginx/modules-enabled/90-chatmail-relay-stream.conf"
SITE = "/etc/nginx/conf.d/chatmail-relay.conf"

pytestmark = pytest.mark.skipif(
    nginx.nginx_binary() is None or not Path("/etc/nginx/nginx.conf").exists(),
    reason="needs Debian packages nginx and libnginx-mod-stream")


@pytest.fixture
def rendered(relay_config, debian12, render):
    return render("nginx", relay_config, debian12)


@pytest.fixture
def admin_nginx(tmp_path, debian12):
    """A copy of this machine's Debian /etc/nginx at another place, where tests add an
    admin's sites; returns (platform pointing at it, its directory)."""
    etc = tmp_path / "etc-nginx"
    shutil.copytree("/etc/nginx", etc, symlinks=True)
    main = etc / "nginx.conf"
    main.write_text(main.read_text().replace("/etc/nginx/", f"{etc}/"))
    platform = SimpleNamespace(**vars(debian12))
    platform.nginx_config_dir = str(etc)
    platform.nginx_http_include_dir = f"{etc}/conf.d"
    platform.nginx_toplevel_include_dir = f"{etc}/modules-enabled"
    return platform, etc


def servers(text):
    """The bodies of the top-level server blocks of an http include file."""
    bodies, rest = [], text
    while "\nserver {" in rest:
        body = block(rest, "\nserver")
        bodies.append(body)
        rest = rest[rest.index(body) + len(body):]
    return bodies


def directives(body, name):
    return re.findall(rf"^\s*{name}\s+([^;]*);", body, re.M)


# -- what is rendered ------------------------------------------------------------------


def test_files_and_places(rendered):
    assert sorted(rendered) == [SITE, STREAM]
    for item in rendered.values():
        assert (item.mode, item.owner, item.reload) == (0o644, "root", ["nginx"])


def test_port_443_multiplexer(rendered, relay_config):
    stream = block(rendered[STREAM].content, "stream")
    mapping = block(stream, "map $ssl_preread_alpn_protocols $chatmail_alpn_backend")
    assert directives(mapping, "default") == ["127.0.0.1:8443"]
    assert r"~\bsmtp\b 127.0.0.1:465;" in mapping and r"~\bimap\b 127.0.0.1:993;" in mapping
    [server] = servers("\n" + stream.replace("    server {", "server {"))
    listens = ["443"] + ([] if relay_config.disable_ipv6 else ["[::]:443"])
    assert directives(server, "listen") == listens
    assert directives(server, "ssl_preread") == ["on"]
    assert directives(server, "proxy_pass") == ["$chatmail_alpn_backend"]


def test_port_80(rendered, relay_config, debian12):
    port80 = servers(rendered[SITE].content)[0]
    assert directives(port80, "listen") == (
        ["80"] if relay_config.disable_ipv6 else ["80", "[::]:80"])
    names = directives(port80, "server_name")[0].split()
    if relay_config.ipv4_relay:
        assert names == [relay_config.ipv4_relay]
    else:
        domain = relay_config.mail_domain
        assert names == [domain, f"mta-sts.{domain}", f"www.{domain}"]
    # not default_server: the admin's default site (Debian's "default") keeps that role
    assert "default_server" not in port80
    acme = "location /.well-known/acme-challenge/"
    if relay_config.tls_cert_mode == "acme":
        assert directives(block(port80, acme), "root") == [debian12.acme_webroot]
    else:
        assert acme not in port80
    assert directives(block(port80, "location /"), "return") == [
        "301 https://$host$request_uri"]


def test_https_server(rendered, relay_config, debian12):
    site = rendered[SITE].content
    main = servers(site)[1]
    assert directives(main, "listen") == ["127.0.0.1:8443 ssl default_server"]
    domain = relay_config.mail_domain
    expected_names = relay_config.ipv4_relay or f"{domain} mta-sts.{domain}"
    assert directives(main, "server_name") == [expected_names]
    assert directives(main, "ssl_certificate") == [relay_config.tls_cert_path]
    assert directives(main, "ssl_certificate_key") == [relay_config.tls_key_path]
    assert directives(main, "root") == [debian12.web_root]
    assert directives(block(main, "location = /mxdeliv"), "return") == ["404"]


def test_new_account_locations(rendered, relay_config):
    site = rendered[SITE].content
    main = servers(site)[1]
    for path in ("/new", "/cgi-bin/newemail.py"):
        location = block(main, f"location = {path}")
        assert directives(location, "fastcgi_pass") == ["unix:/run/fcgiwrap.socket"]
        assert directives(location, "include") == ["/etc/nginx/fastcgi_params"]
        assert directives(location, "fastcgi_param") == [
            "SCRIPT_FILENAME /usr/libexec/chatmail/chatmail-newemail",
            f"CHATMAIL_INI {relay_config.inipath}"]
        if relay_config.tls_cert_mode == "self":
            assert directives(location, "limit_req") == [
                "zone=chatmail_newaccount burst=5 nodelay"]
            assert "if (" not in location
        else:
            redirect = block(location, "if ($request_method = GET)")
            assert directives(redirect, "return") == [
                f"301 dcaccount:https://{relay_config.mail_domain}/new"]
            assert "limit_req" not in location
    zone = "limit_req_zone $binary_remote_addr zone=chatmail_newaccount:10m rate=2r/s;"
    assert (zone in site) == (relay_config.tls_cert_mode == "self")


def test_www_redirect(rendered, relay_config):
    redirects = servers(rendered[SITE].content)[2:]
    if relay_config.ipv4_relay:
        assert redirects == []
        return
    [www] = redirects
    domain = relay_config.mail_domain
    assert directives(www, "listen") == ["127.0.0.1:8443 ssl"]
    assert directives(www, "server_name") == [f"www.{domain}"]
    assert directives(www, "return") == [f"301 https://{domain}$request_uri"]


# -- nginx -T on the rendered files among Debian's configuration -----------------------


def test_nginx_accepts_the_rendered_files(relay_config, render, admin_nginx):
    platform, _ = admin_nginx
    files = list(render("nginx", relay_config, platform).values())
    assert nginx.validate(files, platform, stand_in_certificates=True) == []


def test_missing_certificate_is_a_problem(make_ini, render, admin_nginx, tmp_path):
    config = read_config(make_ini(
        tls_external_cert_and_key=f"{tmp_path}/fullchain.pem {tmp_path}/privkey.pem"))
    platform, etc = admin_nginx
    files = list(render("nginx", config, platform).values())
    assert nginx.validate(files, platform) == [
        f"{tmp_path}/fullchain.pem does not exist (named in {etc}/conf.d/chatmail-relay.conf)",
        f"{tmp_path}/privkey.pem does not exist (named in {etc}/conf.d/chatmail-relay.conf)"]
    nginx.make_stand_in_certificate(tmp_path)
    (tmp_path / "stand-in.pem").rename(tmp_path / "fullchain.pem")
    (tmp_path / "stand-in.key").rename(tmp_path / "privkey.pem")
    assert nginx.validate(files, platform) == []


def add_https_site(etc, name, *listens):
    """An admin's HTTPS site in sites-enabled/, one server per listen directive."""
    cert, key = nginx.make_stand_in_certificate(etc.parent)
    (etc / "sites-enabled" / name).write_text("".join(
        f"server {{\n    listen {listen};\n    server_name shop.example;\n"
        f"    ssl_certificate {cert};\n    ssl_certificate_key {key};\n}}\n"
        for listen in listens))


@pytest.fixture
def domain_relay(make_ini, render, admin_nginx):
    """(rendered files, platform, admin's /etc/nginx) of a relay with a domain."""
    config = read_config(make_ini())
    platform, etc = admin_nginx
    return list(render("nginx", config, platform).values()), platform, etc


def test_admin_https_site_on_port_443_is_reported(domain_relay):
    files, platform, etc = domain_relay
    add_https_site(etc, "shop", "443 ssl", "[::]:443 ssl")
    problems = nginx.validate(files, platform, stand_in_certificates=True)
    assert len(problems) == 2
    assert problems[0].startswith(f"{etc}/sites-enabled/shop: 'listen 443 ssl' takes port 443")
    assert "'127.0.0.1:8443 ssl'" in problems[0]
    assert problems[1].startswith(f"{etc}/sites-enabled/shop: 'listen [::]:443 ssl'")


def test_admin_https_site_on_8443_lives_beside_the_relay(domain_relay):
    files, platform, etc = domain_relay
    add_https_site(etc, "shop", "127.0.0.1:8443 ssl")
    assert nginx.validate(files, platform, stand_in_certificates=True) == []


def test_second_default_server_is_reported(domain_relay):
    files, platform, etc = domain_relay
    add_https_site(etc, "shop", "127.0.0.1:8443 ssl default_server")
    [problem] = nginx.validate(files, platform, stand_in_certificates=True)
    assert "duplicate default server for 127.0.0.1:8443" in problem
    assert f"{etc}/" in problem and "chatmail-nginx-" not in problem


def test_admin_stream_block_is_reported(domain_relay):
    files, platform, etc = domain_relay
    (etc / "modules-enabled" / "60-admin-stream.conf").write_text(
        "stream { server { listen 2222; proxy_pass 127.0.0.1:22; } }\n")
    [problem] = nginx.validate(files, platform, stand_in_certificates=True)
    assert '"stream" directive is duplicate' in problem


def test_validate_never_writes_through_symlinks(domain_relay, tmp_path):
    """An admin who linked our file from elsewhere keeps that file untouched."""
    files, platform, etc = domain_relay
    elsewhere = tmp_path / "kept.conf"
    elsewhere.write_text("# the admin's\n")
    (etc / "conf.d" / "chatmail-relay.conf").symlink_to(elsewhere)
    assert nginx.validate(files, platform, stand_in_certificates=True) == []
    assert elsewhere.read_text() == "# the admin's\n"


def test_missing_stream_module_is_reported(domain_relay):
    files, platform, _ = domain_relay
    platform.nginx_stream_module = "/nonexistent/ngx_stream_module.so"
    [problem] = nginx.validate(files, platform, stand_in_certificates=True)
    assert "libnginx-mod-stream" in problem


@pytest.mark.parametrize("arguments,taken", [
    ("443", True), ("443 ssl", True), ("[::]:443 ssl", True), ("0.0.0.0:443", True),
    ("192.0.2.7:443", True), ("*:443", True), ("443 quic reuseport", False),
    ("127.0.0.1:8443 ssl", False), ("4430", False), ("unix:/run/x.sock", False),
])
def test_which_listeners_take_port_443(arguments, taken):
    assert nginx.takes_tcp_port(arguments.split(), "443") is taken


# -- a running nginx -------------------------------------------------------------------


@pytest.fixture
def relay(request, make_ini, debian12, tmp_path):
    """A scratch relay web side for the chatmail.ini settings in request.param."""
    if shutil.which("fcgiwrap") is None:
        pytest.skip("needs Debian package fcgiwrap")
    config = read_config(make_ini(**request.param))
    scratch = ScratchRelay(config, debian12, tmp_path)
    try:
        yield scratch.start()
    finally:
        scratch.stop()


DOMAIN_RELAY = {"mail_domain": "chat.example.org"}
IPV4_RELAY = {"mail_domain": "127.0.0.1"}


def unverified_urlopen(url, **kwargs):
    request = urllib.request.Request(url, **kwargs)
    return urllib.request.urlopen(request, context=ssl._create_unverified_context(), timeout=10)


@pytest.mark.parametrize("relay", [DOMAIN_RELAY], indirect=True)
def test_live_domain_relay(relay):
    # Delta Chat's DCACCOUNT: flow: POST /new for credentials (urllib, through port 443)
    with unverified_urlopen(f"https://127.0.0.1:{relay.ports.mux}/new", method="POST",
                            data=b"", headers={"Host": "chat.example.org"}) as response:
        assert response.headers["Content-Type"] == "application/json"
        account = json.load(response)
    assert account["email"].endswith("@chat.example.org") and len(account["password"]) == 12
    assert "dclogin_url" not in account
    status, _, body = relay.https("POST", "/cgi-bin/newemail.py")
    assert status == 200 and json.loads(body)["email"].endswith("@chat.example.org")

    # a browser's GET goes to the app
    for path in ("/new", "/cgi-bin/newemail.py"):
        status, headers, _ = relay.https("GET", path)
        assert (status, headers["Location"]) == (301, "dcaccount:https://chat.example.org/new")

    # pages and what clients and servers fetch
    status, _, body = relay.https("GET", "/")
    assert status == 200 and b"Chat privately with chat.example.org" in body
    status, _, body = relay.https("GET", "/.well-known/autoconfig/mail/config-v1.1.xml")
    assert status == 200
    assert ET.fromstring(body).find("emailProvider").get("id") == "chat.example.org"
    status, _, body = relay.https("GET", "/.well-known/mta-sts.txt",
                                  host="mta-sts.chat.example.org", sni="mta-sts.chat.example.org")
    assert status == 200 and b"mx: chat.example.org\n" in body
    if (Path(relay.platform.web_root) / "qr-invite.png").exists():
        status, headers, body = relay.https("GET", "/qr-invite.png")
        assert (status, headers["Content-Type"]) == (200, "image/png")
    assert relay.https("GET", "/mxdeliv")[0] == 404

    # www. and plain HTTP go to https://<domain>; certbot's challenges are served on port 80
    status, headers, _ = relay.https("GET", "/info.html?x=1", host="www.chat.example.org",
                                     sni="www.chat.example.org")
    assert (status, headers["Location"]) == (301, "https://chat.example.org/info.html?x=1")
    status, headers, _ = relay.http("GET", "/privacy.html")
    assert (status, headers["Location"]) == (301, "https://chat.example.org/privacy.html")
    challenge = Path(relay.platform.acme_webroot) / ".well-known/acme-challenge/t0ken"
    challenge.parent.mkdir(parents=True)
    challenge.write_text("t0ken.thumbprint")
    status, _, body = relay.http("GET", "/.well-known/acme-challenge/t0ken")
    assert (status, body) == (200, b"t0ken.thumbprint")


@pytest.mark.parametrize("relay", [DOMAIN_RELAY], indirect=True)
def test_live_alpn_routing(relay):
    for alpn, backend in ((["imap"], "imap"), (["smtp"], "smtp")):
        hello, received = relay.forward_alpn(alpn)
        assert received == {backend: hello}, alpn
    # HTTPS, with or without ALPN, reaches the web server, and the admin's site is picked
    # by its name
    assert relay.https("GET", "/", alpn=["h2", "http/1.1"])[0] == 200
    status, _, body = relay.https("GET", "/", host=ADMIN_SITE_NAME, sni=ADMIN_SITE_NAME)
    assert (status, body) == (200, b"the admin's own site\n")


@pytest.mark.parametrize("relay", [IPV4_RELAY], indirect=True)
def test_live_self_signed_relay(relay):
    # no SNI and a bare IP as Host, as a browser sends them
    status, _, body = relay.https("GET", "/", host="127.0.0.1")
    assert status == 200 and b"dclogin-link" in body
    status, _, body = relay.https("GET", "/new", host="127.0.0.1")
    account = json.loads(body)
    assert status == 200 and account["email"].endswith("@[127.0.0.1]")
    assert account["dclogin_url"].startswith("dclogin:")
    assert "&ih=127.0.0.1&sh=127.0.0.1&ic=3" in account["dclogin_url"]
    # throttled: a burst of 5 beyond the rate, then 503
    statuses = [relay.https("POST", "/new", host="127.0.0.1")[0] for _ in range(10)]
    assert 503 in statuses and statuses[:4] == [200] * 4


@pytest.mark.parametrize("platform_name", ["debian12", "debian13", "alpine"])
def test_every_platform_puts_the_files_where_its_nginx_reads_them(platform_name, make_ini,
                                                                  render):
    platform = load_platform(platform_name)
    files = render("nginx", read_config(make_ini()), platform)
    if platform.nginx_stream_include_dir:
        stream = f"{platform.nginx_stream_include_dir}/chatmail-relay.conf"
        assert "\nstream {" not in files[stream].content  # inside the package's block
    else:
        stream = f"{platform.nginx_toplevel_include_dir}/90-chatmail-relay-stream.conf"
        assert "\nstream {" in files[stream].content
    assert sorted(files) == sorted([stream,
                                    f"{platform.nginx_http_include_dir}/chatmail-relay.conf"])
    site = files[f"{platform.nginx_http_include_dir}/chatmail-relay.conf"].content
    assert f"fastcgi_pass unix:{platform.fcgiwrap_socket};" in site
    # both folders are read with a *.conf glob, so apply's .chatmail-new proposals are not
    assert all(path.endswith(".conf") for path in files)


def test_www_folder_is_served_with_our_well_known_files(make_ini, debian12, render):
    config = read_config(make_ini(www_folder="/srv/relay-site"))
    main = servers(render("nginx", config, debian12)[SITE].content)[1]
    assert directives(main, "root") == ["/srv/relay-site", debian12.web_root]
    assert directives(block(main, "location /.well-known/"), "root") == [debian12.web_root]


def test_admin_server_for_the_relay_domain_is_reported(domain_relay):
    """A server the admin made earlier for the relay's domain (say, by certbot --nginx)
    would lose that name to ours without a word from nginx but a warning."""
    files, platform, etc = domain_relay
    (etc / "sites-enabled" / "old").write_text(
        "server {\n    listen 80;\n    server_name chat.example.org;\n    return 404;\n}\n")
    [problem] = nginx.validate(files, platform, stand_in_certificates=True)
    assert 'conflicting server name "chat.example.org" on 0.0.0.0:80' in problem
    assert "remove the relay's names from the other server" in problem


def alpine_nginx(etc):
    """/etc/nginx laid out as Alpine's nginx and nginx-mod-stream install it, at `etc`:
    module loaders in modules/, conf.d/ included at the top level, where nginx-mod-stream's
    stream.conf holds the one stream {} block, which includes stream.d/; http.d/ inside
    http {}, with the package's default.conf: the default server on port 80, answering
    404."""
    for folder in ("modules", "conf.d", "stream.d", "http.d"):
        (etc / folder).mkdir(parents=True)
    for name in ("mime.types", "fastcgi_params"):  # as Alpine's nginx ships them
        shutil.copy(f"/etc/nginx/{name}", etc / name)
    (etc / "modules" / "10_stream.conf").write_text(
        f'load_module "{load_platform("alpine").nginx_stream_module}";\n')
    (etc / "conf.d" / "stream.conf").write_text(
        f"stream {{\n    access_log off;\n    include {etc}/stream.d/*.conf;\n}}\n")
    (etc / "http.d" / "default.conf").write_text(
        "server {\n    listen 80 default_server;\n    listen [::]:80 default_server;\n"
        "    location / {\n        return 404;\n    }\n"
        "    location = /404.html {\n        internal;\n    }\n}\n")
    (etc / "nginx.conf").write_text(
        f"include {etc}/modules/*.conf;\n"
        "events {}\n"
        f"include {etc}/conf.d/*.conf;\n"
        f"http {{\n    include {etc}/mime.types;\n    include {etc}/http.d/*.conf;\n}}\n")


def test_alpine_nginx_accepts_the_rendered_files(relay_config, render, tmp_path):
    """With Alpine's layout our server goes into nginx-mod-stream's stream {} block: a
    second stream {} block would stop nginx ("stream" directive is duplicate)."""
    etc = tmp_path / "etc-nginx"
    alpine_nginx(etc)
    platform = SimpleNamespace(**vars(load_platform("alpine")))
    for key in ("nginx_config_dir", "nginx_toplevel_include_dir",
                "nginx_stream_include_dir", "nginx_http_include_dir"):
        setattr(platform, key, getattr(platform, key).replace("/etc/nginx", str(etc)))
    files = list(render("nginx", relay_config, platform).values())
    assert nginx.validate(files, platform, stand_in_certificates=True) == []
    own_block = SimpleNamespace(**{**vars(platform), "nginx_stream_include_dir": ""})
    [problem] = nginx.validate(list(render("nginx", relay_config, own_block).values()),
                               own_block, stand_in_certificates=True)
    assert '"stream" directive is duplicate' in problem
