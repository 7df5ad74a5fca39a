"""conf/filtermail: systemd listens for the filters on the ports chatmail.ini gives, the
ones Postfix's smtpd_proxy_filter names, through drop-ins that systemd really reads."""

import configparser
import re
import shutil
import subprocess

import pytest

from chatmaild.admin.platform import load_platform
from chatmaild.admin.units import systemd_files
from chatmaild.config import read_config

# socket -> the chatmail.ini setting of its port, and the Postfix service that sends to it
SOCKETS = {
    "filtermail.socket": ("filtermail_smtp_port", "submission"),
    "filtermail-incoming.socket": ("filtermail_smtp_port_incoming", "smtp"),
}


def dropin(socket):
    return f"/etc/systemd/system/{socket}.d/chatmail.conf"


@pytest.fixture
def moved_ports(tmp_path):
    """A relay whose filters listen on other ports than the defaults."""
    path = tmp_path / "chatmail.ini"
    path.write_text("[params]\nmail_domain = chat.example.org\n"
                    "filtermail_smtp_port = 20080\nfiltermail_smtp_port_incoming = 20081\n")
    return read_config(path)


def listen_stream(content):
    parser = configparser.RawConfigParser(strict=False, delimiters=("=",))
    parser.optionxform = str
    parser.read_string(content)
    return parser["Socket"]["ListenStream"]


def proxy_filter(master_cf, service):
    """smtpd_proxy_filter of SERVICE in rendered master.cf lines."""
    block = re.search(rf"^{service}\s+inet.*?(?=^\S|\Z)", master_cf, re.M | re.S).group(0)
    return re.search(r"-o smtpd_proxy_filter=(\S+)", block).group(1)


@pytest.mark.parametrize("platform", ["debian12", "debian13"])
@pytest.mark.parametrize("socket", sorted(SOCKETS))
def test_socket_listens_where_postfix_sends(render, moved_ports, platform, socket):
    setting, postfix_service = SOCKETS[socket]
    files = render("filtermail", moved_ports, load_platform(platform))
    item = files[dropin(socket)]
    # A changed Listen line takes effect when the socket is restarted (and its service
    # with it: Requires=).
    assert item.restart == [socket] and item.reload == []
    port = getattr(moved_ports, setting)
    assert port in (20080, 20081)
    # The empty ListenStream= drops the unit's default port; configparser keeps the last.
    assert re.findall(r"^ListenStream=(.*)$", item.content, re.M) == ["", f"127.0.0.1:{port}"]
    master_cf = render("postfix", moved_ports, load_platform(platform))[
        "/etc/postfix/master.cf"].content
    assert listen_stream(item.content) == proxy_filter(master_cf, postfix_service)


@pytest.mark.parametrize("socket", sorted(SOCKETS))
def test_units_listen_on_the_default_ports(render, relay_config, socket):
    """Without the drop-in (before the first configure) the unit's own port (generated
    from conf/services.toml) is the default one, the same the drop-in then writes."""
    unit = systemd_files(load_platform("debian12"))[socket]
    item = render("filtermail", relay_config, load_platform("debian12"))[dropin(socket)]
    assert listen_stream(unit) == listen_stream(item.content)


def test_no_sockets_on_openrc(render, relay_config):
    assert render("filtermail", relay_config, load_platform("alpine")) == {}


@pytest.mark.parametrize("socket", sorted(SOCKETS))
def test_systemd_reads_the_dropin(render, moved_ports, tmp_path, socket):
    """systemd-analyze cat-config shows the unit with our drop-in after it."""
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("needs systemd-analyze (apt install systemd)")
    item = render("filtermail", moved_ports, load_platform("debian12"))[dropin(socket)]
    unit = tmp_path / "etc/systemd/system" / socket
    unit.parent.mkdir(parents=True)
    unit.write_text(systemd_files(load_platform("debian12"))[socket])
    path = tmp_path / dropin(socket).lstrip("/")
    path.parent.mkdir(parents=True)
    path.write_text(item.content)
    result = subprocess.run([analyze, "cat-config", f"--root={tmp_path}", "--no-pager",
                             f"systemd/system/{socket}"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.index(f"# {unit}") < result.stdout.index(f"# {path}")
