"""The instant-IDLE plugin's package, dovecot-chatmail-instant-idle (dovecot/plugin/debian),
one build per Debian release: its module where the relay's configuration looks, its
dependency on exactly the Dovecot ABI it was built for, the relay's relations to it, and
the packaged module loaded by a real Dovecot. (lintian: test_deb.py's test_lintian_clean
checks every package in dist/, this one among them.)"""

import re
import subprocess
from pathlib import Path
from statistics import median

import pytest

from chatmaild.admin.platform import load_platform
from tests.config.test_dovecot import (  # noqa: F401 (push, scratch_dir: fixtures)
    STOCK_DELAY, push, run_idle_relay, scratch_dir)
from tests.conftest import REPO
from tests.package.conftest import load_mkapk
from tests.package.test_deb import contents, deb_named, maintainer_script

PACKAGE = "dovecot-chatmail-instant-idle"
MODULE = load_platform("debian12").dovecot_instant_idle_plugin
# Debian 13's build, made in its chroot by `make debs-trixie`
TRIXIE_DIST = REPO / "dist" / "trixie"
# dovecot-dev's description of the Dovecot it is for (shell variables), as the plugin's
# Makefile reads it
DOVECOT_CONFIG = "/usr/lib/dovecot/dovecot-config"


def field(deb, name):
    return subprocess.run(["dpkg-deb", "--field", str(deb), name], capture_output=True,
                          text=True, check=True).stdout.strip()


def relations(deb, name):
    return [relation.strip() for relation in field(deb, name).split(",")]


def host_release():
    text = Path("/etc/os-release").read_text()
    return re.search(r'^VERSION_ID="?(\d+)', text, re.M).group(1)


def abi_of_dovecot_headers(config_h="/usr/include/dovecot/config.h"):
    """The ABI the plugin is compiled for (its version symbol), in the spelling of
    dovecot-core's Provides: "2.3.ABIv19(2.3.19.1)" -> "2.3.abiv19"."""
    text = Path(config_h).read_text()
    return re.search(r'#define DOVECOT_ABI_VERSION "([^"(]+)', text).group(1).lower()


def dovecot_core_provides():
    out = subprocess.run(["dpkg-query", "-W", "-f=${Provides}", "dovecot-core"],
                         capture_output=True, text=True, check=True).stdout
    return [relation.strip() for relation in out.split(",")]


def test_installs_the_module_where_the_relay_looks():
    files = contents(deb_named(PACKAGE))
    assert {path for path in files if path.startswith("/usr/lib/")} == {
        "/usr/lib/", "/usr/lib/dovecot/", "/usr/lib/dovecot/modules/", MODULE}
    assert field(deb_named(PACKAGE), "Architecture") != "all"


def test_depends_on_the_dovecot_abi_it_was_built_for():
    """The ABI of the headers it was compiled with, which the installed dovecot-core (the
    one this host's build used) provides: installable here, and only where the module
    loads."""
    abi = "dovecot-abi-" + abi_of_dovecot_headers()
    depends = relations(deb_named(PACKAGE), "Depends")
    assert abi in depends
    assert [relation for relation in depends if relation.startswith("dovecot")] == [abi]
    assert abi in dovecot_core_provides()


def test_version_names_the_debian_release_it_was_built_for():
    """+deb12 < +deb13: an upgrade to the next Debian release replaces the build for the
    old release's Dovecot."""
    assert field(deb_named(PACKAGE), "Version").endswith("+deb" + host_release())


def test_debian13_build_depends_on_dovecot_24():
    debs = sorted(TRIXIE_DIST.glob(PACKAGE + "_*.deb"))
    if not debs:
        pytest.skip(f"no {PACKAGE} in {TRIXIE_DIST}: run `make debs-trixie`")
    [deb] = debs
    assert field(deb, "Version").endswith("+deb13")
    version = load_platform("debian13").dovecot_version
    abis = [r for r in relations(deb, "Depends") if r.startswith("dovecot-abi-")]
    assert len(abis) == 1 and abis[0].startswith(f"dovecot-abi-{version}.abiv"), abis


def test_relay_depends_on_it_and_reconfigures_when_it_changes():
    """Depends (docs/decisions.md): unattended-upgrades installs a new dependency, never a
    new Recommends. dpkg runs the relay's postinst (triggered) whenever the module file is
    installed, upgraded or removed; Dovecot's binary no longer concerns it."""
    relay = deb_named("chatmail-relay")
    assert PACKAGE in relations(relay, "Depends")
    assert PACKAGE not in field(relay, "Recommends")
    triggers = maintainer_script(relay, "triggers").splitlines()
    assert [line for line in triggers if line.startswith("interest")] == \
        [f"interest-noawait {MODULE}"]
    postinst = maintainer_script(relay, "postinst")
    assert f"\nINSTANT_IDLE_PLUGIN={MODULE}\n" in postinst


def test_packaged_module_loads_into_dovecot(push, scratch_dir):  # noqa: F811
    """The module from the package, in the relay's configuration with this host's
    Dovecot: loaded, and IDLE wakes at once."""
    subprocess.run(["dpkg-deb", "-x", str(deb_named(PACKAGE)), str(scratch_dir / "deb")],
                   check=True)
    run = run_idle_relay(push, scratch_dir / "deb" / MODULE.lstrip("/"), scratch_dir / "modules")
    assert run.loads_plugin and run.problems == []
    assert median(run.waits) < STOCK_DELAY / 10, run.waits
    assert max(run.waits) < STOCK_DELAY * 1.2, run.waits


def test_alpine_apkbuild_builds_a_module_that_loads_into_dovecot(push, scratch_dir):  # noqa: F811
    """alpine/dovecot-chatmail-instant-idle/APKBUILD's unpack, build and package, run as
    abuild runs them (alpine/mkapk.py's helpers) against this host's dovecot-dev, as far
    as a Debian host goes: abuild builds it on Alpine, against Alpine's. The module goes
    into dovecot-config's module directory under the name the relay looks for, and loads
    into a live Dovecot with the relay's configuration, where IDLE wakes at once."""
    if not Path(DOVECOT_CONFIG).exists():
        pytest.skip(f"needs dovecot-dev ({DOVECOT_CONFIG})")
    apkbuild = REPO / "alpine" / "dovecot-chatmail-instant-idle" / "APKBUILD"
    srcdir, pkgdir = scratch_dir / "src", scratch_dir / "pkg"
    srcdir.mkdir()
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "startdir": str(apkbuild.parent),
           "srcdir": str(srcdir), "pkgdir": str(pkgdir)}
    load_mkapk().run_in_apkbuild(apkbuild, env, 'cd "$srcdir"; unpack; cd "$builddir"; '
                                 'build; cd "$builddir"; package', cwd=srcdir)
    moduledir = subprocess.run(["sh", "-c", f'. {DOVECOT_CONFIG}; printf %s "$dovecot_moduledir"'],
                               capture_output=True, text=True, check=True).stdout
    name = Path(load_platform("alpine").dovecot_instant_idle_plugin).name
    assert [p.relative_to(pkgdir).as_posix() for p in pkgdir.rglob("*.so")] == \
        [f"{moduledir.lstrip('/')}/{name}"]
    run = run_idle_relay(push, pkgdir / moduledir.lstrip("/") / name, scratch_dir / "modules")
    assert run.loads_plugin and run.problems == []
    assert median(run.waits) < STOCK_DELAY / 10, run.waits
