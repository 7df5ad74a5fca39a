"""Upgrades as a relay gets them: installed from our repository as README says when it
held the previous release (make build-previous: the tree of the last release that shipped
our patched Dovecot and the numbered shell steps), then unattended-upgrades takes the
current chatmail-relay and the instant-IDLE plugin it now depends on, with no prompt,
losing nothing and keeping an admin's edit. Also: our repository cannot replace other
packages (the pin), and Debian's Dovecot security update replaces our patched build at
once while the plugin keeps IDLE instant.

Debian 12 only: the previous release (PREVIOUS_REF) published Debian 12's packages
alone (its `make repo`: dist/repo from dist/*.deb, with its patched Dovecot for Debian 12).
Its Debian 13 build (`make debs-trixie` into dist/repo-trixie) was, as its Makefile says,
for the system tests on Debian 13, without a patched Dovecot ("not made yet"). No relay
on Debian 13 can have installed that release from our repository, and what this module
checks (the patched Dovecot giving way to the plugin) never happened there: the first
release with a trixie suite in its repository is the one to upgrade from on Debian 13."""

import os
import subprocess
import tempfile

import pytest

from .container import REPO, REPO_MOUNT, Container
from .repos import (build_repo, debian_security_dovecot, package_without_files,
                    stand_in_sources)
from .test_install import DOMAIN, INSTALL

UNATTENDED_UPGRADE = "apt-get update -q && unattended-upgrade -v"
DPKG_LOG = "/var/log/unattended-upgrades/unattended-upgrades-dpkg.log"
SITE = "/etc/nginx/conf.d/chatmail-relay.conf"
KEPT = [f"/home/vmail/mail/{DOMAIN}/abcdefghi@{DOMAIN}/password",
        f"/etc/dkimkeys/{DOMAIN}.private", "/etc/ssl/certs/mailserver.pem",
        "/etc/ssl/private/mailserver.key", "/etc/chatmail/turn-secret"]
SECURITY_MOUNT = "/srv/debian-security"
PIN = "/etc/apt/preferences.d/chatmail-relay.pref"

# The start of both scripts below: logged in over IMAPS as the test account.
LOGIN = r'''
import imaplib, ssl, sys
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
imap = imaplib.IMAP4_SSL("127.0.0.1", 993, ssl_context=ctx)
imap.login("abcdefghi@" + sys.argv[1], "correct-horse-battery")
'''

READ_INBOX = LOGIN + r'''
imap.select("INBOX")
_, data = imap.fetch("1:*", "(BODY[TEXT])")
print(b"".join(part[1] for part in data if isinstance(part, tuple)).decode())
'''

CREATE_ACCOUNT = LOGIN + r'''
imap.append("INBOX", None, None, b"Subject: kept\r\n\r\nthis message survives upgrades\r\n")
imap.logout()
'''


@pytest.fixture(scope="module")
def suite():
    """Debian 12 only (see the module's docstring)."""
    return "bookworm"


def installed_versions(box, *packages):
    out = box.run("dpkg-query -W " + " ".join(packages)).stdout
    return dict(line.split("\t") for line in out.splitlines())


@pytest.fixture(scope="module")
def upgraded(rootfs):
    """A relay installed from the previous build's repository, upgraded by
    unattended-upgrades after the repository got the current build."""
    workdir = tempfile.mkdtemp(prefix="chatmail-system-", dir="/var/tmp")
    security = tempfile.mkdtemp(prefix="chatmail-security-", dir="/var/tmp")
    box = Container(f"upgrade-{os.getpid()}", rootfs, workdir,
                    repos={REPO_MOUNT: REPO / "dist" / "repo-previous",
                           SECURITY_MOUNT: REPO / "dist" / "repo-previous"}, suite="bookworm")
    box.security_dir = security
    try:
        box.boot()
        box.run(INSTALL, timeout=900)
        box.previous = installed_versions(box, "chatmail-relay", "dovecot-core")
        box.run(f"python3 - {DOMAIN}", input=CREATE_ACCOUNT)
        box.before = {path: box.run(f"sha256sum {path}").stdout for path in KEPT}
        box.run(f"echo '# the admin was here' >> {SITE}")
        box.run(f"echo '# the admin was here' >> {PIN}")
        box.publish(REPO_MOUNT, REPO / "dist" / "repo")
        box.upgrade = box.run(UNATTENDED_UPGRADE, check=False, timeout=900)
        yield box
    finally:
        box.stop()
        subprocess.run(["rm", "-rf", security], check=False)


def test_previous_build_came_from_the_repository(upgraded):
    assert "~previous" in upgraded.previous["chatmail-relay"]
    assert upgraded.previous["dovecot-core"].endswith("+chatmail1~previous")


def test_unattended_upgrades_takes_the_relay_and_installs_the_plugin(upgraded):
    """The plugin is a new dependency from an allowed origin: unattended-upgrades installs
    it (a new Recommends it would not). Our patched Dovecot stays until Debian's next
    update: the repository no longer offers one."""
    assert upgraded.upgrade.returncode == 0, upgraded.upgrade.stdout[-4000:]
    versions = installed_versions(upgraded, "chatmail-relay", "python3-chatmaild",
                                  "chatmail-archive-keyring", "dovecot-chatmail-instant-idle",
                                  "dovecot-core")
    for package in ("chatmail-relay", "python3-chatmaild", "chatmail-archive-keyring"):
        assert "~previous" not in versions[package], versions
    assert versions["dovecot-chatmail-instant-idle"].endswith("+deb12"), versions
    assert versions["dovecot-core"] == upgraded.previous["dovecot-core"]


def test_nothing_is_lost(upgraded):
    for path, digest in upgraded.before.items():
        assert upgraded.run(f"sha256sum {path}").stdout == digest, path
    # Dovecot stores messages compressed: read the mailbox the way a client does
    inbox = upgraded.run(f"python3 - {DOMAIN}", input=READ_INBOX).stdout
    assert "this message survives upgrades" in inbox


def test_an_edited_generated_file_is_kept_and_reported(upgraded):
    assert "# the admin was here" in upgraded.run(f"cat {SITE}").stdout
    upgraded.run(f"test -f {SITE}.chatmail-new")
    assert f"kept your changes to {SITE}" in upgraded.run(f"cat {DPKG_LOG}").stdout


def test_an_edited_pin_is_kept_and_reported(upgraded):
    """chatmail-archive-keyring writes the pin from its postinst (not a conffile): an
    admin's edit survives its upgrade and is reported."""
    assert "# the admin was here" in upgraded.run(f"cat {PIN}").stdout
    assert f"kept your changes to {PIN}" in upgraded.run(f"cat {DPKG_LOG}").stdout


def test_relay_loads_the_plugin_after_the_upgrade(upgraded):
    status = upgraded.run("chatmail status", check=False)
    assert status.returncode == 0, status.stdout  # also fails on a stale Dovecot binary
    assert "(chatmail build), instant IDLE: plugin" in status.stdout, status.stdout


def test_state_of_the_shell_steps_is_taken_over(upgraded):
    """The previous release's `chatmail configure` kept its state in two files; the
    current one took them over into one."""
    state = upgraded.run("ls /var/lib/chatmail-relay").stdout.split()
    assert "configure-state.json" in state and "mailboxes-dir" in state, state
    assert "pending-restarts" not in state and "chatmail.ini.sha256" not in state, state


def test_our_repository_cannot_replace_other_packages(upgraded):
    """A package of another name in our repository, even with a higher version, is never
    a candidate: the keyring package's pin gives it priority -1."""
    stray = package_without_files(upgraded.security_dir, "nginx", "99:1.0")
    hijack = build_repo(upgraded.security_dir + "/hijack",
                        [*sorted((REPO / "dist" / "repo").glob("pool/bookworm/main/*.deb")), stray])
    upgraded.publish(REPO_MOUNT, hijack)
    try:
        upgraded.run("apt-get update -q")
        policy = upgraded.run("apt-cache policy nginx").stdout
        assert "Candidate: 99:1.0" not in policy, policy
        assert "99:1.0 -1" in policy, policy
    finally:
        upgraded.publish(REPO_MOUNT, REPO / "dist" / "repo")
        upgraded.run("apt-get update -q")


def test_debians_security_update_replaces_the_patched_build_and_idle_stays_instant(upgraded):
    """Debian publishes a dovecot security update: unattended-upgrades installs Debian's at
    once (the security fix is never held back), and the plugin, built for the same ABI,
    keeps IDLE instant."""
    ours = installed_versions(upgraded, "dovecot-core")["dovecot-core"]
    security_repo, version = debian_security_dovecot(upgraded.security_dir, ours)
    upgraded.publish(SECURITY_MOUNT, security_repo)
    upgraded.run(stand_in_sources("debian-security-stand-in", SECURITY_MOUNT,
                                  "bookworm-security"))
    result = upgraded.run(UNATTENDED_UPGRADE, check=False, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:]
    versions = installed_versions(upgraded, "dovecot-core", "dovecot-imapd", "dovecot-lmtpd")
    assert set(versions.values()) == {version}, versions
    status = upgraded.run("chatmail status", check=False)
    assert status.returncode == 0, status.stdout  # the relay works, without the patch
    assert "instant IDLE: plugin" in status.stdout, status.stdout
    assert "(chatmail build)" not in status.stdout, status.stdout
    inbox = upgraded.run(f"python3 - {DOMAIN}", input=READ_INBOX).stdout
    assert "this message survives upgrades" in inbox
