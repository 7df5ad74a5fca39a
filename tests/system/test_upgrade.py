"""An admin upgrades through apt from the previous build: no prompt, no lost mailbox,
password, DKIM key or certificate, and an edit to a generated file survives (reported,
with our new version next to it)."""

import os
import tempfile

import pytest

from .container import Container
from .test_install import DOMAIN

INSTALL_PREVIOUS = f"""
set -e
echo "chatmail-relay chatmail-relay/mail_domain string {DOMAIN}" | debconf-set-selections
apt-get install -y -q --no-install-recommends /srv/dist/previous/python3-chatmaild_*.deb \
    /srv/dist/previous/chatmail-relay_*.deb
"""
UPGRADE = ("apt-get install -y -q --no-install-recommends "
           "/srv/dist/python3-chatmaild_*.deb /srv/dist/chatmail-relay_*.deb </dev/null")
SITE = "/etc/nginx/conf.d/chatmail-relay.conf"
KEPT = [f"/home/vmail/mail/{DOMAIN}/abcdefghi@{DOMAIN}/password",
        f"/etc/dkimkeys/{DOMAIN}.private", "/etc/ssl/certs/mailserver.pem",
        "/etc/ssl/private/mailserver.key", "/etc/chatmail/turn-secret"]

READ_INBOX = r'''
import imaplib, ssl, sys
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
imap = imaplib.IMAP4_SSL("127.0.0.1", 993, ssl_context=ctx)
imap.login("abcdefghi@" + sys.argv[1], "correct-horse-battery")
imap.select("INBOX")
_, data = imap.fetch("1:*", "(BODY[TEXT])")
print(b"".join(part[1] for part in data if isinstance(part, tuple)).decode())
'''

CREATE_ACCOUNT = r'''
import imaplib, ssl, sys
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
imap = imaplib.IMAP4_SSL("127.0.0.1", 993, ssl_context=ctx)
imap.login("abcdefghi@" + sys.argv[1], "correct-horse-battery")
imap.append("INBOX", None, None, b"Subject: kept\r\n\r\nthis message survives upgrades\r\n")
imap.logout()
'''


@pytest.fixture(scope="module")
def upgraded(rootfs):
    workdir = tempfile.mkdtemp(prefix="chatmail-system-", dir="/var/tmp")
    box = Container(f"upgrade-{os.getpid()}", rootfs, workdir)
    try:
        box.boot()
        box.run(INSTALL_PREVIOUS, timeout=900)
        box.run(f"python3 - {DOMAIN}", input=CREATE_ACCOUNT)
        box.before = {path: box.run(f"sha256sum {path}").stdout for path in KEPT}
        box.run(f"echo '# the admin was here' >> {SITE}")
        box.upgrade = box.run(UPGRADE, check=False, timeout=900)
        yield box
    finally:
        box.stop()


def test_upgrade_succeeds_without_prompt(upgraded):
    assert upgraded.upgrade.returncode == 0, upgraded.upgrade.stdout[-4000:]
    versions = upgraded.run("dpkg-query -W chatmail-relay python3-chatmaild").stdout
    assert "~previous" not in versions


def test_nothing_is_lost(upgraded):
    for path, digest in upgraded.before.items():
        assert upgraded.run(f"sha256sum {path}").stdout == digest, path
    # Dovecot stores messages compressed: read the mailbox the way a client does
    inbox = upgraded.run(f"python3 - {DOMAIN}", input=READ_INBOX).stdout
    assert "this message survives upgrades" in inbox


def test_an_edited_generated_file_is_kept_and_reported(upgraded):
    assert "# the admin was here" in upgraded.run(f"cat {SITE}").stdout
    upgraded.run(f"test -f {SITE}.chatmail-new")
    assert f"kept your changes to {SITE}" in upgraded.upgrade.stdout + upgraded.upgrade.stderr


def test_relay_runs_after_the_upgrade(upgraded):
    status = upgraded.run("chatmail status", check=False)
    assert status.returncode == 0, status.stdout
