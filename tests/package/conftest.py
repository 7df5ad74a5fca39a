"""The Alpine packages and their repository, built once per test run by alpine/mkapk.py
for test_apk (read back by our own reader) and test_apk_tools (read by apk-tools); the
relay's services' systemd units and OpenRC scripts as the build generates them."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from chatmaild.admin.platform import load_platform
from chatmaild.admin.services import openrc_instances, relay_services
from chatmaild.admin.units import write_units
from tests.conftest import REPO
from tests.package.alpine_root import AlpineShell, DebianShell, unpack_minirootfs
from tests.package.apk_format import read_apk

ARCH = "x86_64"
PYTHON_VERSION = "3.12"


def load_mkapk():
    """alpine/mkapk.py as a module; it imports alpine/apkformat.py from beside it, as it
    does when run as a script."""
    if str(REPO / "alpine") not in sys.path:
        sys.path.insert(0, str(REPO / "alpine"))
    spec = importlib.util.spec_from_file_location("mkapk", REPO / "alpine" / "mkapk.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def relay_lists():
    """The lists the APKBUILD writes beside enable-services, by file name: the relay's own
    services (conf/services.toml's) and the other daemons it runs under its own init
    scripts (platform.toml's)."""
    return {"relay-services": relay_services(),
            "relay-instances": openrc_instances(load_platform("alpine"))}


def enabled_services():
    """The services alpine/enable-services puts into the default runlevel: those of the
    lists it reads from beside it, and those it names."""
    text = (REPO / "alpine" / "enable-services").read_text()
    lists = {f"${variable}": relay_lists()[file] for variable, file in re.findall(
        r'^(\w+)=\$\(cat "\$\{0%/\*\}"/([\w-]+)\)', text, re.M)}
    names = re.search(r'^SERVICES="([^"]*)"', text, re.M).group(1).split()
    return [service for name in names for service in lists.get(name, [name])]


def write_relay_services(directory):
    """The lists as the APKBUILD writes them beside enable-services, into DIRECTORY."""
    for file, names in relay_lists().items():
        (directory / file).write_text(" ".join(names) + "\n")


# The relay's services as the build generates them (chatmaild/admin/units.py): systemd
# units as debian/rules names them for dh_installsystemd, on the Debian release this runs
# on, and Alpine's OpenRC scripts with their conf.d files.
SYSTEMD_PREFIX = "chatmail-relay."


@pytest.fixture(scope="session")
def systemd_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("systemd-units")
    write_units(load_platform(), directory, SYSTEMD_PREFIX)
    return directory


@pytest.fixture(scope="session")
def openrc_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("openrc-scripts")
    write_units(load_platform("alpine"), directory)
    return directory


@pytest.fixture(scope="session")
def repo_dir(tmp_path_factory):
    """The repository mkapk.py writes: ARCH/*.apk, ARCH/APKINDEX.tar.gz, the public key."""
    out = tmp_path_factory.mktemp("alpine-repo")
    result = subprocess.run([sys.executable, str(REPO / "alpine" / "mkapk.py"),
                             "--out", str(out), "--arch", ARCH,
                             "--python-version", PYTHON_VERSION],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.fixture(scope="session")
def apks(repo_dir):
    """{package name: path of its .apk}"""
    found = {path.name.rsplit("-", 2)[0]: path for path in (repo_dir / ARCH).glob("*.apk")}
    assert found, "mkapk.py wrote no packages"
    return found


@pytest.fixture(scope="session")
def parsed(apks):
    return {name: read_apk(path) for name, path in apks.items()}


@pytest.fixture(scope="session")
def public_key(repo_dir):
    keys = list(repo_dir.glob("*.rsa.pub"))
    assert len(keys) == 1, f"expected one public key in {repo_dir}, found {keys}"
    return keys[0]


@pytest.fixture
def alpine_root(tmp_path):
    """A fresh Alpine minirootfs to chroot into (needs root, as the system tests do)."""
    if os.geteuid() != 0:
        pytest.skip("entering Alpine's minirootfs needs chroot, so root")
    return unpack_minirootfs(tmp_path / "alpine")


@pytest.fixture(params=["debian-sh", "alpine-busybox"])
def shell(request, tmp_path):
    """Where a /bin/sh script runs: Debian's dash here, then Alpine's busybox ash."""
    if request.param == "debian-sh":
        return DebianShell(tmp_path)
    return AlpineShell(request.getfixturevalue("alpine_root"))
