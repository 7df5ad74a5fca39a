"""The built .deb packages: lintian-clean, with the files where units and admins expect them."""

import subprocess

import pytest

from chatmaild.admin.platform import load_platform
from chatmaild.admin.services import relay_services, systemd_units
from tests.conftest import REPO, host_suite

# Our packages for the Debian release this machine runs.
DIST = REPO / "dist" / host_suite()


def debs():
    found = sorted(DIST.glob("*.deb"))
    if not found:
        pytest.fail(f"no packages in {DIST}: run `make build` first")
    return found


def deb_named(name):
    matches = [deb for deb in debs() if deb.name.startswith(name + "_")]
    assert matches, f"no {name} package in {DIST}"
    return matches[0]


def contents(deb):
    out = subprocess.run(["dpkg-deb", "--contents", str(deb)], capture_output=True,
                         text=True, check=True).stdout
    return {line.split()[5].lstrip(".") for line in out.splitlines()}


def test_lintian_clean():
    result = subprocess.run(
        ["lintian", "--fail-on", "error,warning", "--display-info", *map(str, debs())],
        capture_output=True, text=True)
    problems = [line for line in result.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr


# upstream's console-script names; ours live in /usr/libexec/chatmail, off PATH
SERVICE_PROGRAMS = ["doveauth", "lastlogin", "chatmail-metadata", "filtermail",
                    "chatmail-expire", "chatmail-quota-expire", "chatmail-fsreport",
                    "chatmail-newemail"]


def test_python3_chatmaild_layout():
    files = contents(deb_named("python3-chatmaild"))
    assert "/usr/bin/chatmail" in files
    assert "/usr/share/man/man8/chatmail.8.gz" in files
    for daemon in SERVICE_PROGRAMS:
        assert f"/usr/libexec/chatmail/{daemon}" in files
        assert f"/usr/bin/{daemon}" not in files
    assert "/usr/lib/python3/dist-packages/chatmaild/defaults/appversions.json" in files
    assert "/usr/lib/python3/dist-packages/chatmaild/admin/components/__init__.py" in files


def test_python3_chatmaild_depends_on_debian_libraries():
    fields = subprocess.run(["dpkg-deb", "--field", str(deb_named("python3-chatmaild")),
                             "Depends"], capture_output=True, text=True, check=True).stdout
    for lib in ["libcrypt1", "python3-aiosmtpd", "python3-dkim", "python3-dnspython"]:
        assert lib in fields
    # the standard library does their work (bench/results/footprint.md: memory)
    assert "filelock" not in fields and "psutil" not in fields


def test_chatmail_relay_layout():
    files = contents(deb_named("chatmail-relay"))
    assert "/usr/share/chatmail-relay/conf/platform.toml" in files
    assert "/usr/share/chatmail-relay/steps/dkim-key" in files
    assert "/usr/share/chatmail-relay/steps/functions.sh" in files
    assert "/usr/share/chatmail-relay/hooks/certbot-deploy" in files
    # nothing we generate is a dpkg conffile (unattended-upgrades would stall on it)
    conffiles = subprocess.run(["dpkg-deb", "--ctrl-tarfile", str(deb_named("chatmail-relay"))],
                               capture_output=True).stdout
    assert b"./conffiles" not in conffiles


@pytest.mark.parametrize("socket", ["filtermail.socket", "filtermail-incoming.socket"])
def test_filter_sockets_are_installed_and_enabled(socket):
    """dh_installsystemd --name=filtermail takes the .socket beside the .service and
    enables it (sockets.target); `chatmail configure` starts it."""
    deb = deb_named("chatmail-relay")
    assert any(path.endswith(f"/systemd/system/{socket}") for path in contents(deb))
    assert f"deb-systemd-helper enable '{socket}'" in maintainer_script(deb, "postinst")


def test_an_upgrade_does_not_stop_the_filters():
    """debhelper stops the relay's services before an upgrade unpacks (preinst); the
    filters' sockets must keep listening, so Postfix's connections wait instead of
    being refused, until configure restarts the filters on the new code."""
    preinst = maintainer_script(deb_named("chatmail-relay"), "preinst")
    assert "deb-systemd-invoke stop 'doveauth.service'" in preinst
    assert "filtermail" not in preinst


def test_maintainer_scripts_name_the_relay_services():
    """postinst and prerm get conf/services.toml's lists when the package is built."""
    deb = deb_named("chatmail-relay")
    platform = load_platform()
    postinst = maintainer_script(deb, "postinst")
    assert f'RELAY_SERVICES="{" ".join(relay_services())}"' in postinst
    units = " ".join(systemd_units(platform))
    assert f'UNITS="{units}"' in maintainer_script(deb, "prerm")
    assert "filtermail-incoming.socket" in units and "chatmail-expire.timer" in units
    assert "#RELAY_" not in postinst


def maintainer_script(deb, name):
    return subprocess.run(["dpkg-deb", "--info", str(deb), name], capture_output=True,
                          text=True, check=True).stdout


def test_steps_are_executable_in_the_package():
    out = subprocess.run(["dpkg-deb", "--contents", str(deb_named("chatmail-relay"))],
                         capture_output=True, text=True, check=True).stdout
    steps = [line for line in out.splitlines() if "/steps/" in line
             and "/steps/functions" not in line and not line.endswith("/")]
    assert steps
    for line in steps:
        assert line.startswith("-rwxr-xr-x"), line


def test_maintainer_scripts_are_shellcheck_clean():
    scripts = [REPO / "debian" / name for name in
               ("chatmail-relay.config", "chatmail-relay.postinst", "chatmail-relay.prerm",
                "chatmail-relay.postrm")]
    scripts += sorted((REPO / "steps").iterdir()) + sorted((REPO / "hooks").iterdir())
    result = subprocess.run(["shellcheck", "-x", "-s", "sh", *map(str, scripts)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout
