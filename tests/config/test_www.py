"""conf/www: the pages, autoconfig, MTA-STS policy and invite QR code."""

import importlib.util
import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import replace
from html.parser import HTMLParser

import pytest

from chatmaild.admin.apply import NEW_SUFFIX
from chatmaild.admin.components import www
from chatmaild.config import read_config

WEB = "/var/lib/chatmail-relay/www"
PAGES = ("index.html", "info.html", "privacy.html")
AUTOCONFIG = f"{WEB}/.well-known/autoconfig/mail/config-v1.1.xml"
QR = f"{WEB}/qr-invite.png"

class PageParser(HTMLParser):
    """Collects what a test looks at, and fails on tags closed out of order."""

    VOID = {"meta", "link", "img", "br", "input"}

    def __init__(self):
        super().__init__()
        self.open, self.ids, self.links, self.images = [], set(), [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "a":
            self.links.append(attrs.get("href"))
        if tag == "img":
            self.images.append(attrs.get("src"))
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()


def parse_page(text):
    parser = PageParser()
    parser.feed(text)
    parser.close()
    assert parser.open == [], f"unclosed: {parser.open}"
    return parser


@pytest.fixture
def site(relay_config, debian12, render):
    return render("www", relay_config, debian12)


def test_pages_are_well_formed_and_complete(site, relay_config):
    for name in PAGES:
        text = site[f"{WEB}/{name}"].content
        page = parse_page(text)
        assert "<title>" in text and relay_config.mail_domain in text
        assert "/privacy.html" in page.links and "/info.html" in page.links
        # no template left-overs, no Python value printed where a setting was missing
        for leftover in ("{{", "{%", "None", "undefined"):
            assert leftover not in text, (name, leftover)


def test_info_page_states_the_configured_limits(site, relay_config):
    text = site[f"{WEB}/info.html"].content
    assert f"up to {relay_config.max_user_send_per_minute} messages per minute" in text
    assert "up to 30 MB" in text  # max_message_size 31457280
    size = "2 GB" if relay_config.max_mailbox_size == "2G" else "500 MB"
    assert f"Storage per address: up to {size}" in text
    assert f"relay {relay_config.delete_mails_after} days after" in text
    assert f"deleted {relay_config.delete_large_after} days after" in text
    assert f"for {relay_config.delete_inactive_users_after} days" in text


def test_privacy_page_names_the_deletion_time(site, relay_config):
    text = site[f"{WEB}/privacy.html"].content
    assert f"at most {relay_config.delete_mails_after} days" in text
    assert f"for {relay_config.delete_inactive_users_after} days can be deleted" in text


def test_index_offers_dcaccount_or_in_self_mode_dclogin(site, relay_config):
    text = site[f"{WEB}/index.html"].content
    page = parse_page(text)
    dcaccount = f"DCACCOUNT:https://{relay_config.mail_domain}/new"
    if relay_config.tls_cert_mode == "self":
        assert QR not in site
        assert {"dclogin-link", "dclogin-text", "dclogin-copy"} <= page.ids
        assert 'fetch("/new", {method: "POST"' in text and "dclogin_url" in text
        assert dcaccount not in text
    else:
        assert site[QR].kind == "qrcode"
        assert site[QR].content.strip() == dcaccount
        assert page.links.count(dcaccount) == 2 and page.images == ["/qr-invite.png"]
        assert "<script" not in text


def test_autoconfig_lists_the_relay_servers(site, relay_config):
    root = ET.fromstring(site[AUTOCONFIG].content)
    provider = root.find("emailProvider")
    assert provider.get("id") == relay_config.mail_domain
    assert provider.findtext("domain") == relay_config.mail_domain

    def servers(kind):
        return [(s.get("type"), s.findtext("hostname"), s.findtext("port"),
                 s.findtext("socketType"), s.findtext("username"),
                 s.findtext("authentication")) for s in provider.findall(kind)]

    # an IPv4 relay's servers are at the bare address, not at the domain literal [a.b.c.d]
    host = relay_config.ipv4_relay or relay_config.mail_domain
    login = ("%EMAILADDRESS%", "password-cleartext")
    assert servers("incomingServer") == [
        ("imap", host, "993", "SSL", *login), ("imap", host, "143", "STARTTLS", *login),
        ("imap", host, "443", "SSL", *login)]
    assert servers("outgoingServer") == [
        ("smtp", host, "465", "SSL", *login), ("smtp", host, "587", "STARTTLS", *login),
        ("smtp", host, "443", "SSL", *login)]


def test_mta_sts_policy_except_for_ipv4_relays(site, relay_config):
    policy = f"{WEB}/.well-known/mta-sts.txt"
    if relay_config.ipv4_relay:
        assert policy not in site
    else:
        assert site[policy].content == (
            f"version: STSv1\nmode: enforce\nmx: {relay_config.mail_domain}\nmax_age: 2419200\n")


def test_robots_keep_out(site):
    assert site[f"{WEB}/robots.txt"].content == "User-agent: *\nDisallow: /\n"


def test_validate(site, debian12):
    problems = www.validate(list(site.values()), debian12)
    if QR in site and importlib.util.find_spec("qrcode") is None:
        assert problems == [f"{QR}: python3-qrcode is not installed"]
    else:
        assert problems == []
    broken = replace(site[AUTOCONFIG], content="<clientConfig>")
    [problem] = www.validate([broken], debian12)
    assert problem.startswith(AUTOCONFIG) and "not well-formed" in problem


def test_privacy_contacts_are_escaped(make_ini, debian12, render):
    config = read_config(make_ini(
        privacy_postal="Example <Relay> & Co\n    Street 1\n    12345 Town",
        privacy_mail="privacy@example.org",
        privacy_pdo="Data Officer",
        privacy_supervisor="The Authority",
    ))
    text = render("www", config, debian12)[f"{WEB}/privacy.html"].content
    parse_page(text)
    assert "Example &lt;Relay&gt; &amp; Co<br>\nStreet 1<br>\n12345 Town" in text
    assert '<a href="mailto:privacy@example.org">privacy@example.org</a>' in text
    assert "Data Officer" in text and "The Authority" in text
    assert "has not published contact details" not in text


def test_www_folder_replaces_our_pages(make_ini, debian12, render):
    config = read_config(make_ini(www_folder="/srv/relay-site"))
    assert sorted(render("www", config, debian12)) == [
        f"{WEB}/.well-known/autoconfig/mail/config-v1.1.xml", f"{WEB}/.well-known/mta-sts.txt"]


# -- the QR code image -----------------------------------------------------------------


def read_qr(path):
    result = subprocess.run(["zbarimg", "--raw", "-q", str(path)],
                            capture_output=True, text=True, check=True)
    return result.stdout.strip()


@pytest.fixture
def qr_target(make_ini, debian12, render):
    pytest.importorskip("qrcode", reason="needs Debian package python3-qrcode")
    if shutil.which("zbarimg") is None:
        pytest.skip("needs Debian package zbar-tools to read the QR code back")
    return render("www", read_config(make_ini()), debian12)[QR]


def test_qr_code_png_says_the_invite_url(qr_target, debian12, tmp_path):
    result = www.apply([qr_target], debian12, root=tmp_path)
    image = tmp_path / QR.lstrip("/")
    assert result.changed == [QR]
    assert image.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert oct(image.stat().st_mode & 0o777) == "0o644"
    assert read_qr(image) == "DCACCOUNT:https://chat.example.org/new"


def test_qr_code_is_tracked_like_every_generated_file(qr_target, debian12, tmp_path):
    image = tmp_path / QR.lstrip("/")
    www.apply([qr_target], debian12, root=tmp_path)
    first = image.read_bytes()
    # same text, same bytes: nothing to do
    assert www.apply([qr_target], debian12, root=tmp_path).changed == []
    # an image the admin put there is kept, ours goes beside it
    image.write_bytes(b"the admin's own picture")
    result = www.apply([qr_target], debian12, root=tmp_path)
    assert result.kept == [QR] and image.read_bytes() == b"the admin's own picture"
    assert image.with_name(image.name + NEW_SUFFIX).read_bytes() == first


def test_files_of_other_kinds_are_left_to_chatmaild_apply(site, debian12, tmp_path):
    assert www.apply([site[AUTOCONFIG]], debian12, root=tmp_path).changed == []
    assert not (tmp_path / AUTOCONFIG.lstrip("/")).exists()
