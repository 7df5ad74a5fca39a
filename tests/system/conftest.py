import contextlib
import functools
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

from .container import HERE, Container, build_rootfs, deltachat_venv

# The Debian releases a relay runs on (12 and 13): every module's relays run on each, the
# release a parameter of the module-scoped `suite` fixture.
SUITES = ("bookworm", "trixie")


def pytest_configure(config):
    config.addinivalue_line("markers", "only_on(suite): a check of one Debian release's "
                            "specifics, not collected for the other")


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0 or not shutil.which("systemd-nspawn"):
        skip = pytest.mark.skip(reason="system tests need root and systemd-nspawn")
        for item in items:
            item.add_marker(skip)
    elsewhere = [item for item in items if not runs_on_its_suite(item)]
    if elsewhere:
        config.hook.pytest_deselected(items=elsewhere)
        items[:] = [item for item in items if item not in elsewhere]


def runs_on_its_suite(item):
    marker = item.get_closest_marker("only_on")
    callspec = getattr(item, "callspec", None)
    return not (marker and callspec and callspec.params.get("suite") not in marker.args)


@pytest.fixture(scope="module", params=SUITES)
def suite(request):
    """The Debian release of the module's relays; a module overrides it to run on fewer."""
    return request.param


_rootfs_lock = threading.Lock()


@functools.cache
def _rootfs_of(suite):
    return build_rootfs(suite)


def rootfs_of(suite):
    """The cached root file system of `suite` (built on first use; threads may ask)."""
    with _rootfs_lock:
        return _rootfs_of(suite)


@pytest.fixture(scope="module")
def rootfs(suite):
    return rootfs_of(suite)


def selected_suites(request):
    """The suites the selected tests of the requesting module run on (one with -k trixie),
    so that no relay is installed for a release no test asks for."""
    return sorted({item.callspec.params["suite"] for item in request.session.items
                   if item.module is request.module and hasattr(item, "callspec")
                   and "suite" in item.callspec.params}, key=SUITES.index)


class StartedTogether:
    """Containers booted and prepared (installed) each in a thread of its own, all started
    when the first is asked for: an install mostly waits for dpkg, apt and systemd, so
    on 2 cores the others' installs overlap it and the tests of the first.
    get(key) waits for that one; stop() stops all."""

    def __init__(self, keys, make, prepare):
        self.keys, self.make, self.prepare = list(keys), make, prepare
        self.boxes, self.threads, self.errors = {}, {}, {}

    def _start_all(self):
        for key in self.keys:
            # made here, not in the thread: stop() must know every container it booted
            self.boxes[key] = self.make(key)
            self.threads[key] = threading.Thread(target=self._start, args=(key,), daemon=True)
            self.threads[key].start()

    def _start(self, key):
        try:
            self.boxes[key].boot()
            self.prepare(self.boxes[key])
        except BaseException as exc:  # raised again in the test's thread by get()
            self.errors[key] = exc

    def get(self, key):
        if not self.threads:
            self._start_all()
        self.threads[key].join()
        if key in self.errors:
            raise self.errors[key]
        return self.boxes[key]

    def stop(self):
        for box in self.boxes.values():
            box.stop()


@contextlib.contextmanager
def started_together(keys, make, prepare):
    together = StartedTogether(keys, make, prepare)
    try:
        yield together
    finally:
        together.stop()


def new_container(name, suite, **options):
    """A container of `suite` (not booted), in a fresh work directory."""
    return Container(f"{name}-{suite}-{os.getpid()}", rootfs_of(suite),
                     tempfile.mkdtemp(prefix="chatmail-system-", dir="/var/tmp"),
                     suite=suite, **options)


@contextlib.contextmanager
def booted(name, suite, **options):
    """A booted container of `suite` (new_container), stopped at the end."""
    box = new_container(name, suite, **options)
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


def install(box, script=None):
    """README's install commands (test_install.INSTALL, or `script`) run in `box`; the
    failure shows the end of the install's output and of the relay's journal."""
    from .test_install import INSTALL

    result = box.run(script or INSTALL, check=False, timeout=900)
    if result.returncode:
        journal = box.run("journalctl -b --no-pager -n 60 -u dovecot -u doveauth -u postfix*",
                          check=False).stdout
        raise AssertionError(f"install on {box.suite} exited {result.returncode}:\n"
                             f"{result.stdout[-5000:]}{result.stderr[-3000:]}{journal}")


def installed_relays(request, name, venv=None, prepare=None):
    """started_together: a relay for each selected suite of the requesting module,
    installed from dist/ with README's commands (then prepare(box), if given); with the
    Delta Chat `venv` mounted, box.clients runs client scripts."""
    def make(suite):
        box = new_container(name, suite, binds=[(venv, venv)] if venv else [])
        if venv:
            box.clients = deltachat_clients(box, venv)
        return box

    def install_and_prepare(box):
        install(box)
        if prepare:
            prepare(box)

    return started_together(selected_suites(request), make, install_and_prepare)


@pytest.fixture(scope="module")
def relays_by_suite(request):
    with installed_relays(request, "relay", deltachat_venv()) as relays:
        yield relays


@pytest.fixture(scope="module")
def relay(relays_by_suite, suite):
    """A relay on `suite` installed from dist/ with README's commands, with preseeded
    answers (no debconf prompt may be needed: the install runs with no terminal);
    relay.clients(script, *args, timeout) runs deltachat_pair.py + script there."""
    return relays_by_suite.get(suite)


@pytest.fixture(scope="module")
def relay_with_clients(relay):
    return relay
