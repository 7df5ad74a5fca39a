import os
import shutil
import tempfile
from pathlib import Path

import pytest

from .container import HERE, Container, build_rootfs, deltachat_venv


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0 or not shutil.which("systemd-nspawn"):
        skip = pytest.mark.skip(reason="system tests need root and systemd-nspawn")
        for item in items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def rootfs():
    return build_rootfs("bookworm")


@pytest.fixture(scope="module")
def container(rootfs):
    workdir = tempfile.mkdtemp(prefix="chatmail-system-", dir="/var/tmp")
    box = Container(f"relay-{os.getpid()}", rootfs, workdir)
    try:
        box.boot()
        yield box
    finally:
        box.stop()


def deltachat_clients(box, venv):
    """clients(script, *args, timeout) for `box`, which has `venv` (deltachat_venv())
    mounted at the same path: runs deltachat_pair.py + script there, with the container's
    own python3 (the client library is pure Python, the RPC server a static binary, so the
    Debian 12 venv serves Debian 13's Python too)."""
    from .test_install import DOMAIN

    prelude = (HERE / "deltachat_pair.py").read_text()
    site = next(Path(venv).glob("lib/python3*/site-packages"))

    def clients(script, *args, timeout=300, background_output=None):
        box.run("cat > /root/client.py", input=prelude + script)
        command = (f"timeout {timeout} env PYTHONPATH={site} python3 /root/client.py "
                   f"{DOMAIN} {venv}")
        command += "".join(f" {arg}" for arg in args)
        if background_output:
            return box.run(f"nohup {command} >{background_output} 2>{background_output}.err &")
        return box.run(command, check=False, timeout=timeout + 60)

    return clients


@pytest.fixture(scope="module")
def relay_with_clients(rootfs):
    """A relay installed from dist/ whose container can run Delta Chat client scripts:
    relay.clients(script, *args, timeout) runs deltachat_pair.py + script there."""
    from .test_install import INSTALL

    venv = deltachat_venv()
    box = Container(f"dc-{os.getpid()}", rootfs,
                    tempfile.mkdtemp(prefix="chatmail-system-", dir="/var/tmp"),
                    binds=[(venv, venv)])
    try:
        box.boot()
        box.run(INSTALL, timeout=900)
        box.clients = deltachat_clients(box, venv)
        yield box
    finally:
        box.stop()
