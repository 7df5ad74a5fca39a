"""`pip install .` in a virtualenv gives working console scripts (the dh-python path
builds the same setup.cfg)."""

import subprocess
import sys
import venv

import pytest

from tests.conftest import REPO

SCRIPTS = [
    "chatmail", "doveauth", "lastlogin", "chatmail-metadata", "filtermail",
    "chatmail-expire", "chatmail-quota-expire", "chatmail-fsreport", "chatmail-newemail",
]


@pytest.fixture(scope="module")
def installed_venv(tmp_path_factory):
    root = tmp_path_factory.mktemp("venv")
    # Debian's libraries come from the system, as they do for python3-chatmaild.
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(root)
    build = tmp_path_factory.mktemp("build")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(root / "bin" / "python"), "install",
         "--no-deps", "--no-build-isolation", "--no-index", "--quiet", str(REPO)],
        check=True, cwd=build, env={"PATH": "/usr/bin:/bin", "HOME": str(build)},
    )
    return root


@pytest.mark.parametrize("script", SCRIPTS)
def test_console_script_help(installed_venv, script):
    result = subprocess.run([str(installed_venv / "bin" / script), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (result.stdout + result.stderr).strip()


def test_package_data_installed(installed_venv):
    code = ("from importlib import resources; import json; "
            "r = resources.files('chatmaild'); "
            "json.loads(r.joinpath('defaults', 'appversions.json').read_text()); "
            "assert 'mail_domain' in r.joinpath('ini', 'chatmail.ini.in').read_text()")
    subprocess.run([str(installed_venv / "bin" / "python"), "-c", code], check=True,
                   cwd="/", timeout=60)
