"""A relay on Debian 12 moved to Debian 13 as Debian's release notes tell admins, with
README's "Upgrade Debian 12 to 13" commands as they are: sources switched to trixie
(ours too), `apt upgrade --without-new-pkgs`, `apt full-upgrade`, noninteractive, then a
reboot. Before, the relay has an account with mail, a DKIM key, a certificate, the TURN
secret and an admin's edit; after, Dovecot 2.4 runs with the relay's 2.4 configuration
and the instant-IDLE plugin built for it, the old password logs in, the mail is there,
new mail is signed with the same DKIM key, the edit is kept, and `chatmail status` is all
good. The containers reach no archive: Debian 13's packages come from a stand-in holding
the newest build of everything the system tests' Debian 13 root file system has."""

import json
import os
import re
import shutil
import subprocess
import tempfile

import pytest

from tests.unit.mailfactory import armor, encrypted_mail

from .conftest import deltachat_clients
from .container import Container, build_rootfs, deltachat_venv
from .repos import CACHE, DEBIAN_DOVECOT, build_repo, release_apt_options
from .test_install import DOMAIN, INSTALL, readme_block
from .test_restarts import PACKETS
from .test_upgrade import CREATE_ACCOUNT, KEPT, READ_INBOX

# Where the container finds the stand-in for Debian 13's archive.
ARCHIVE = "/srv/debian-archive-trixie"
EDITED = "/var/lib/chatmail-relay/www/index.html"
EDIT = "<!-- the admin wrote this -->"


# Two Delta Chat accounts, kept in the container's file system across the move.
CLIENTS_BEFORE = r'''
import json
with open_rpc(VENV, "/root/dc-accounts") as rpc:
    alice, bob = verified_pair(rpc, DOMAIN)
    bob.create_chat(alice).send_text("before the move")
    print(json.dumps({"text": alice.wait_for_incoming_msg().get_snapshot().text}))
'''

CLIENTS_AFTER = r'''
import json
with open_rpc(VENV, "/root/dc-accounts") as rpc:
    alice, bob = DeltaChat(rpc).get_all_accounts()
    alice.bring_online()
    bob.bring_online()
    bob.create_chat(alice).send_text("after the move")
    msg = alice.wait_for_incoming_msg().get_snapshot()
    print(json.dumps({"text": msg.text, "encrypted": msg.show_padlock}))
'''

# An encrypted message (as the filters see one) from the test account to another relay
# through submission. The other relay is not reachable from the container: the message
# waits in Postfix's queue as it would leave, signed, and is verified there against the
# relay's DKIM key, as the other relay verifies it against the published record.
ADDRESS = f"abcdefghi@{DOMAIN}"
ELSEWHERE = "friend@other-relay.example"
SEND_AND_VERIFY_DKIM = r'''
import base64, json, smtplib, ssl, subprocess, sys, time
import dkim
domain, sender, recipient = sys.argv[1:4]
context = ssl.create_default_context()
context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
with smtplib.SMTP("127.0.0.1", 587) as smtp:
    smtp.starttls(context=context)
    smtp.login(sender, "correct-horse-battery")
    smtp.sendmail(sender, [recipient], sys.stdin.buffer.read())
der = subprocess.run(["openssl", "pkey", "-in", f"/etc/dkimkeys/{domain}.private", "-pubout",
                      "-outform", "DER"], capture_output=True, check=True).stdout
record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)
for _ in range(100):
    queued = [json.loads(line) for line in subprocess.run(
        ["postqueue", "-j"], capture_output=True, text=True).stdout.splitlines()]
    queued = [entry["queue_id"] for entry in queued
              if any(r["address"] == recipient for r in entry["recipients"])]
    if queued:
        break
    time.sleep(0.1)
message = subprocess.run(["postcat", "-hbq", queued[0]], capture_output=True,
                         check=True).stdout
subprocess.run(["postsuper", "-d", queued[0]], capture_output=True)
print(dkim.verify(message, dnsfunc=lambda name, timeout=5: record))
'''


@pytest.fixture(scope="module")
def suite():
    """The move starts on Debian 12."""
    return "bookworm"


def installed_packages(rootfs):
    out = subprocess.run(["dpkg-query", f"--admindir={rootfs}/var/lib/dpkg", "-W",
                          "-f", "${Package} ${db:Status-Abbrev}\n"],
                         capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.split()[1:] == ["ii"]]


def debian_archive_stand_in(directory, suite):
    """A stand-in for Debian's archive of `suite` as far as a relay's release upgrade
    needs it: the newest build of every package in the system tests' root file system
    of `suite` (everything the relay depends on, and a base system) and Debian's Dovecot,
    downloaded once into the cache."""
    rootfs = build_rootfs(suite)
    cache = CACHE / f"debian-archive-{rootfs.name}"
    if not (cache / ".complete").exists():
        cache.mkdir(parents=True, exist_ok=True)
        packages = sorted({*installed_packages(rootfs), *DEBIAN_DOVECOT[suite]})
        subprocess.run(["apt-get", *release_apt_options(suite), "download", "-q",
                        *packages], cwd=cache, check=True, capture_output=True)
        (cache / ".complete").touch()
        forget_stand_ins_of_removed_rootfs()
    return build_repo(directory, sorted(cache.glob("*.deb")), origin="Debian",
                      label="Debian", suite=suite)


def forget_stand_ins_of_removed_rootfs():
    """Each stand-in belongs to a root file system; rootfs.sh removes old ones."""
    for stand_in in CACHE.glob("debian-archive-rootfs-*"):
        if not (CACHE / stand_in.name.removeprefix("debian-archive-")).exists():
            shutil.rmtree(stand_in)


def reboot(box):
    """Shut the container down and boot it again on the same file system."""
    box.nspawn.terminate()
    box.nspawn.wait(60)
    subprocess.run(["umount", str(box.root)], check=True)
    box.boot()
    # coturn needs a non-loopback address, which a container of ours gets only after it
    # booted (Container.boot); a server has its own at boot.
    box.run("systemctl reset-failed coturn && systemctl restart coturn")


@pytest.fixture(scope="module")
def moved(rootfs):
    """A relay installed on Debian 12, then moved to Debian 13 with README's commands."""
    workdir = tempfile.mkdtemp(prefix="chatmail-system-", dir="/var/tmp")
    venv = deltachat_venv()
    box = Container(f"release-upgrade-{os.getpid()}", rootfs, workdir,
                    binds=[(venv, venv)])
    try:
        box.boot()
        box.run(INSTALL, timeout=900)
        box.clients = deltachat_clients(box, venv)
        box.clients_before = box.clients(CLIENTS_BEFORE, timeout=240)
        box.run(f"python3 - {DOMAIN}", input=CREATE_ACCOUNT)
        box.run(f"echo '{EDIT}' >> {EDITED} && chatmail configure >/dev/null")
        box.before = {path: box.run(f"sha256sum {path}").stdout for path in KEPT}
        # What stands in for deb.debian.org: Debian 12's Dovecot goes, Debian 13's
        # archive comes (into the container's own file system: it stays after a reboot).
        box.run("rm /etc/apt/sources.list.d/debian-stand-in.sources")
        debian_archive_stand_in(box.root / ARCHIVE.lstrip("/"), "trixie")
        box.run(f"""cat >/etc/apt/sources.list.d/debian-archive.sources <<EOF
Types: deb
URIs: file://{ARCHIVE}
Suites: bookworm
Components: main
Signed-By: {ARCHIVE}/chatmail-archive-keyring.pgp
EOF""")
        commands = readme_block("release upgrade commands")
        assert commands.rstrip().endswith("reboot")
        box.upgrade = box.run("set -e\n" + commands.rstrip().removesuffix("reboot"),
                              check=False, timeout=1800)
        if box.upgrade.returncode == 0:
            reboot(box)
        yield box
    finally:
        box.stop()


def failure_excerpt(out):
    """The lines of apt's output about our packages' maintainer scripts, and its end."""
    ours = [line for line in out.splitlines()
            if re.search(r"chatmail|dovecot|error|fail", line, re.I)]
    return "\n".join(ours[-80:]) + "\n...\n" + out[-3000:]


def test_the_upgrade_ran_without_a_prompt_or_an_error(moved):
    out = moved.upgrade.stdout + moved.upgrade.stderr
    assert moved.upgrade.returncode == 0, failure_excerpt(out)
    assert "Configuration file" not in out  # a conffile prompt
    assert moved.run(". /etc/os-release && echo $VERSION_CODENAME").stdout.strip() == "trixie"


def test_dovecot_24_runs_with_the_relays_configuration_and_the_plugin_built_for_it(moved):
    assert moved.run("dovecot --version").stdout.startswith("2.4.")
    plugin = moved.run("dpkg-query -W -f '${Version}' dovecot-chatmail-instant-idle").stdout
    assert plugin.endswith("+deb13")
    status = moved.run("chatmail status", check=False)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "instant IDLE: plugin" in status.stdout


def test_accounts_mail_keys_and_the_admins_edit_are_kept(moved):
    assert moved.run(f"python3 - {DOMAIN}", input=READ_INBOX).stdout.count(
        "this message survives upgrades") == 1
    for path, before in moved.before.items():
        assert moved.run(f"sha256sum {path}").stdout == before, path
    assert EDIT in moved.run(f"cat {EDITED}").stdout


def test_delta_chat_clients_set_up_before_the_move_go_on_encrypted(moved):
    before = moved.clients_before
    assert before.returncode == 0, before.stdout[-3000:] + before.stderr[-3000:]
    out = moved.clients(CLIENTS_AFTER, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == \
        {"text": "after the move", "encrypted": True}


def test_outgoing_mail_is_signed_with_the_same_dkim_key(moved):
    moved.run("cat >/root/send-and-verify.py", input=SEND_AND_VERIFY_DKIM)
    message = encrypted_mail(ADDRESS, ELSEWHERE, armor(PACKETS)).decode()
    verified = moved.run(f"python3 /root/send-and-verify.py {DOMAIN} {ADDRESS} {ELSEWHERE}",
                         input=message)
    assert verified.stdout.strip() == "True", verified.stdout + verified.stderr


def test_configure_again_changes_nothing(moved):
    out = moved.run("chatmail configure").stdout
    assert "updated" not in out and "restarting" not in out, out
