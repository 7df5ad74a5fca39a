import os
import shutil
import tempfile

import pytest

from .container import Container, build_rootfs


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
