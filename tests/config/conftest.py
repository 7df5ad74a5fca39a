"""Render conf/ for a matrix of relay configurations, as `chatmail configure` would."""

import pytest

from chatmaild.admin.platform import load_platform
from chatmaild.admin.render import render_component
from chatmaild.config import read_config

# name -> chatmail.ini settings; together they switch every conditional in the templates.
RELAY_CONFIGS = {
    "domain": {"mail_domain": "chat.example.org"},
    "underscore-domain": {"mail_domain": "_chat.example.org"},
    "ipv4": {"mail_domain": "203.0.113.5", "iroh_relay": ""},
    "external-cert": {
        "mail_domain": "chat.example.org",
        "tls_external_cert_and_key": "/etc/ssl/chatmail/fullchain.pem /etc/ssl/chatmail/privkey.pem",
    },
    "no-ipv6": {"mail_domain": "chat.example.org", "disable_ipv6": "true"},
    "mtail": {"mail_domain": "chat.example.org", "mtail_address": "127.0.0.1"},
    "debugging": {
        "mail_domain": "chat.example.org", "imap_compress": "true", "imap_rawlog": "true",
        "privacy_mail": "privacy@example.org", "max_mailbox_size": "2G",
    },
}


@pytest.fixture(params=sorted(RELAY_CONFIGS))
def relay_config(request, tmp_path):
    """A Config for each entry of RELAY_CONFIGS (tests using it run once per entry)."""
    settings = dict(RELAY_CONFIGS[request.param])
    domain = settings.pop("mail_domain")
    lines = ["[params]", f"mail_domain = {domain}"]
    lines += [f"{key} = {value}" for key, value in settings.items()]
    path = tmp_path / "chatmail.ini"
    path.write_text("\n".join(lines) + "\n")
    return read_config(path)


@pytest.fixture
def debian12():
    return load_platform("debian12")


@pytest.fixture
def render():
    """render(component, config, platform) -> {path: RenderedFile}"""

    def render(component, config, platform):
        return {item.path: item for item in render_component(component, config, platform)}

    return render
