"""Our .apk files and signed repository as the real apk-tools (2.14.4, in Alpine's
minirootfs) reads them: signatures, data hashes, the index it would write itself, the
dependencies it resolves, and an installation with `apk add`."""

import contextlib
import os
import re
import shutil
import subprocess
import sys
import zlib

import pytest

from chatmaild.admin.platform import load_platform
from tests.package.apk_format import gzip_streams, parse_apkindex, read_index
from tests.conftest import REPO
from tests.package.conftest import ARCH, PYTHON_VERSION, load_mkapk
from tests.package.test_apk import apkbuild_vars_of_plugin

REPOSITORY = "/srv/chatmail-repo"


@pytest.fixture
def alpine(alpine_root, repo_dir, public_key):
    """The minirootfs with our repository in REPOSITORY as its only one, and our key
    trusted (what docs/alpine.md tells an Alpine admin to do)."""
    shutil.copytree(repo_dir / ARCH, alpine_root.host_path(f"{REPOSITORY}/{ARCH}"))
    shutil.copy(public_key, alpine_root.host_path("/etc/apk/keys"))
    alpine_root.host_path("/etc/apk/repositories").write_text(REPOSITORY + "\n")
    return alpine_root


def untrust_our_key(alpine, public_key):
    alpine.host_path(f"/etc/apk/keys/{public_key.name}").unlink()


def package_paths(apks):
    return [f"{REPOSITORY}/{ARCH}/{path.name}" for path in apks.values()]


# --- package signatures ----------------------------------------------------------------

def test_apk_verify_accepts_each_package(alpine, apks):
    result = alpine.apk("verify", *package_paths(apks))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" - OK") == len(apks)


def test_apk_verify_refuses_a_package_whose_key_is_not_trusted(alpine, apks, public_key):
    untrust_our_key(alpine, public_key)
    result = alpine.apk("verify", *package_paths(apks))
    assert result.returncode != 0
    assert result.stdout.count("UNTRUSTED") == len(apks)


def test_apk_verify_refuses_a_package_whose_files_were_changed(alpine, apks):
    # The signature covers the control stream, whose datahash covers the data stream:
    # a changed file must be caught although the signature still verifies.
    signature, control, data = gzip_streams(apks["chatmail-relay"].read_bytes())
    original = b"chatmail configure --reload"
    assert original in data[1]
    tampered = data[1].replace(original, b"chatmail cOnfigure --reload", 1)
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    tampered_stream = compressor.compress(tampered) + compressor.flush()
    path = alpine.host_path("/tmp/tampered.apk")
    path.write_bytes(signature[0] + control[0] + tampered_stream)
    result = alpine.apk("verify", "/tmp/tampered.apk")
    assert result.returncode != 0
    assert " - OK" not in result.stdout


# --- the signed index --------------------------------------------------------------------

def test_apk_update_trusts_our_signed_index(alpine, apks):
    result = alpine.apk("update")
    assert result.returncode == 0, result.stderr
    assert "UNTRUSTED" not in result.stderr
    listed = alpine.apk("search", "--exact", "-v", *apks)
    versions = {line.split(" - ")[0] for line in listed.stdout.splitlines()}
    assert versions == {path.name.removesuffix(".apk") for path in apks.values()}


def test_apk_update_refuses_the_index_without_our_key(alpine, apks, public_key):
    untrust_our_key(alpine, public_key)
    result = alpine.apk("update")
    assert "UNTRUSTED signature" in result.stderr
    assert alpine.apk("search", "--exact", *apks).stdout == ""


def test_index_is_the_one_apk_index_writes(alpine, apks, repo_dir):
    # abuild indexes noarch packages with --rewrite-arch for the repository's arch.
    result = alpine.apk("index", "--rewrite-arch", ARCH, "-o", "/tmp/APKINDEX.tar.gz",
                        *package_paths(apks))
    assert result.returncode == 0, result.stderr
    theirs = subprocess.run(["tar", "-xzOf", str(alpine.host_path("/tmp/APKINDEX.tar.gz")),
                             "APKINDEX"], capture_output=True, check=True).stdout
    _, _, _, ours = read_index(repo_dir / ARCH / "APKINDEX.tar.gz")
    assert parse_apkindex(ours["APKINDEX"].decode()) == parse_apkindex(theirs.decode())
    assert ours["APKINDEX"] == theirs


# --- resolving and installing ------------------------------------------------------------

def missing_packages(output):
    return set(re.findall(r"^  (\S+) \(no such package\):$", output, re.M))


def test_apk_resolves_our_own_dependencies_and_names_alpines(alpine, parsed):
    # Only our repository is there: apk must find py3-chatmaild=VERSION in it, take
    # /bin/sh from busybox, and name exactly the Alpine packages we depend on as missing.
    result = alpine.apk("add", "--simulate", "chatmail-relay")
    assert result.returncode != 0
    declared = set()
    for name in ["chatmail-relay", "py3-chatmaild", "chatmail-relay-openrc"]:
        declared |= {re.split(r"[=~<>]", d)[0] for d in parsed[name].pkginfo["depend"]}
    ours_or_alpines_base = {"py3-chatmaild", "chatmail-relay-openrc", "/bin/sh",
                            "ca-certificates-bundle"}
    assert missing_packages(result.stderr) == declared - ours_or_alpines_base


def test_apk_add_installs_the_openrc_package_and_keeps_the_admins_changes(
        alpine, parsed, tmp_path):
    # apk writes the files of our data stream and records their checksums, which
    # `apk audit` checks. It needs the init scripts of Alpine's daemons, stood in for.
    missing = missing_packages(alpine.apk("add", "--simulate", "chatmail-relay-openrc").stderr)
    assert missing == set(STAND_IN_OPENRC) - {"dovecot-openrc"}
    use_stand_ins(alpine, missing, tmp_path / "stand-ins")
    result = alpine.apk("add", "chatmail-relay-openrc")
    assert result.returncode == 0, result.stdout + result.stderr
    listed = alpine.apk("info", "-L", "chatmail-relay-openrc").stdout.splitlines()
    ours = {info.name for info, _ in parsed["chatmail-relay-openrc"].data
            if info.isfile() or info.issym()}
    assert {line for line in listed[1:] if line} == ours
    audit = alpine.apk("audit", "--full").stdout.splitlines()
    assert not [line for line in audit if line[2:] in ours], audit
    init = alpine.host_path("/etc/init.d/doveauth")
    assert init.stat().st_mode & 0o777 == 0o755
    assert alpine.host_path("/etc/init.d/opendkim.chatmail").readlink().name == "opendkim"
    confd = alpine.host_path("/etc/conf.d/doveauth")
    confd.write_text(confd.read_text() + "# changed by the admin\n")
    assert "U etc/conf.d/doveauth" in alpine.apk("audit").stdout.splitlines()
    removed = alpine.apk("del", "chatmail-relay-openrc")
    assert removed.returncode == 0, removed.stderr
    assert not init.exists()
    assert confd.read_text().endswith("# changed by the admin\n")


# --- a whole installation, Alpine's packages stood in for ---------------------------------

STAND_IN_VERSIONS = {"python3": f"{PYTHON_VERSION}.0-r0"}
# Alpine's -openrc packages with the init scripts of the daemons the relay uses, pulled
# in, as on Alpine, by install_if: OpenRC and the package they belong to. All but
# dovecot's have a script the relay enables (enable-services): it runs Dovecot as
# chatmail-dovecot.
STAND_IN_OPENRC = {"dovecot-openrc": ["dovecot"], "opendkim-openrc": ["opendkim"],
                   "postfix-openrc": ["postfix"], "nginx-openrc": ["nginx"],
                   "busybox-openrc": ["crond"]}
# Stand-ins with a program that runs: busybox (from the minirootfs) under the daemon's
# name, so that a process can run it while apk replaces it.
STAND_IN_PROGRAMS = {"dovecot": "usr/sbin/dovecot", "nginx": "usr/sbin/nginx"}
# OpenRC's commands, logging what the install scripts ask of them.
RC_LOG = "/var/log/rc-calls"
RC_COMMAND = f'#!/bin/sh\necho "$(basename "$0") $*" >> {RC_LOG}\n'
# Python, logging what it is asked to run (the chatmail command, a Python script).
PYTHON_LOG = "/var/log/python-calls"
PYTHON_COMMAND = f'#!/bin/sh\necho "$*" >> {PYTHON_LOG}\n'
STAND_INS = "/srv/stand-ins"


def stand_in_files(name, directory, program):
    if name == "openrc":
        for command in ("rc-update", "rc-service"):
            path = directory / "sbin" / command
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(RC_COMMAND)
            path.chmod(0o755)
    for script in STAND_IN_OPENRC.get(name, []):
        path = directory / "etc" / "init.d" / script
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/sbin/openrc-run\n")
        path.chmod(0o755)
    if name == "python3":
        path = directory / "usr" / "bin" / "python3"
        path.parent.mkdir(parents=True)
        path.write_text(PYTHON_COMMAND)
        path.chmod(0o755)
    if name in STAND_IN_PROGRAMS:
        path = directory / STAND_IN_PROGRAMS[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(program)
        path.chmod(0o755)


def publish_stand_ins(alpine, names, directory, versions=None):
    """Empty signed packages named NAMES and the -openrc packages of those of them that
    have one (OpenRC's with logging rc-update and rc-service, the -openrc ones with an
    init script, some with a program), in versions 1.0-r0 unless VERSIONS says
    otherwise, as the repository STAND_INS of ALPINE, whose apk trusts their key.
    Publishing again replaces the repository, signed with the same key."""
    mkapk = load_mkapk()
    key = mkapk.ensure_key(None, directory / "key")
    shutil.rmtree(directory / "files", ignore_errors=True)
    out = alpine.host_path(f"{STAND_INS}/{ARCH}")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    busybox = alpine.host_path("/bin/busybox").read_bytes()
    versions = {**STAND_IN_VERSIONS, **(versions or {})}
    builts = []
    openrc = {name for name in STAND_IN_OPENRC
              if name.removesuffix("-openrc") in {*names, "busybox"}}
    for name in sorted({*names, *openrc}):
        files = directory / "files" / name
        files.mkdir(parents=True)
        version = versions.get(name, "1.0-r0")
        # A trailing version makes each release's program a different file.
        stand_in_files(name, files, busybox + version.encode())
        base = name.removesuffix("-openrc")
        # busybox is the minirootfs's own, in whatever version it has.
        install_if = ["openrc", base if base == "busybox" else f"{base}={version}"]
        package = mkapk.Package(name=name, directory=files, pkgver=version,
                                pkgdesc=f"stand-in for Alpine's {name}",
                                url="https://alpinelinux.org", arch="noarch", license="MIT",
                                origin=base, install_if=install_if if name in openrc else [])
        builts.append(mkapk.write_apk(package, out, key, 0, "test", "", ""))
    mkapk.write_index(builts, out, ARCH, key, 0, "stand-ins")
    shutil.copy(key[1], alpine.host_path("/etc/apk/keys"))


def use_stand_ins(alpine, names, directory):
    """The stand-ins for NAMES published and in ALPINE's list of repositories."""
    publish_stand_ins(alpine, names, directory)
    with alpine.host_path("/etc/apk/repositories").open("a") as repositories:
        repositories.write(STAND_INS + "\n")


@pytest.fixture
def alpine_with_stand_ins(alpine, tmp_path):
    """The minirootfs with our repository and one of stand-ins for the Alpine packages it
    lacks (and OpenRC): `apk add chatmail-relay` installs for real. .stand_ins: their
    names."""
    missing = missing_packages(alpine.apk("add", "--simulate", "chatmail-relay").stderr)
    alpine.stand_ins = missing | {"openrc"}
    use_stand_ins(alpine, alpine.stand_ins, tmp_path / "stand-ins")
    assert alpine.apk("add", "openrc").returncode == 0
    alpine.add_dependency_users()
    return alpine


def rc_calls(alpine):
    log = alpine.host_path(RC_LOG)
    return log.read_text().splitlines() if log.exists() else []


def test_install_enables_the_relays_services_and_removal_stops_them(alpine_with_stand_ins):
    """apk runs chatmail-relay's post-install once chatmail-relay-openrc's init scripts are
    in place (a dependency, not install_if alone), so every service is enabled; removal
    stops them while their init scripts still exist."""
    alpine = alpine_with_stand_ins
    result = alpine.apk("add", "chatmail-relay")
    assert result.returncode == 0, result.stdout + result.stderr
    order = re.findall(r"Installing (\S+) ", result.stdout)
    # Every init script it enables is in place when its post-install runs (Alpine's
    # -openrc packages come after it when only install_if pulls them in).
    for openrc in ["chatmail-relay-openrc", "nginx-openrc", "opendkim-openrc",
                   "postfix-openrc"]:
        assert order.index(openrc) < order.index("chatmail-relay"), openrc
    assert "chatmail setup YOUR.DOMAIN" in result.stdout
    services = ["doveauth", "lastlogin", "chatmail-metadata", "filtermail",
                "filtermail-incoming", "chatmail-newemail", "chatmail-dovecot",
                "opendkim.chatmail",
                *(script for scripts in STAND_IN_OPENRC.values() for script in scripts)]
    enabled = {call.split()[2] for call in rc_calls(alpine) if call.startswith("rc-update add")}
    assert enabled >= set(services) - {"opendkim", "dovecot"}
    # the packages' own services stay off: the relay runs them with its configuration
    assert "opendkim" not in enabled and "dovecot" not in enabled
    result = alpine.apk("del", "chatmail-relay")
    assert result.returncode == 0, result.stdout + result.stderr
    calls = rc_calls(alpine)
    for service in ["doveauth", "filtermail-incoming", "chatmail-newemail",
                    "chatmail-dovecot", "opendkim.chatmail"]:
        assert f"rc-service --quiet {service} stop" in calls
        assert f"rc-update -a del {service}" in calls  # from every runlevel
    for script in ["doveauth", "opendkim.chatmail"]:
        assert not alpine.host_path(f"/etc/init.d/{script}").is_symlink()
        assert not alpine.host_path(f"/etc/init.d/{script}").exists()
    # Alpine's own services stay, as on Debian: the admin may use them for more.
    assert not [call for call in calls
                if re.match(r"rc-\S+ (--quiet )?(-a )?(del )?(postfix|dovecot|nginx)( |$)", call)
                and ("stop" in call or " del " in call)]


@contextlib.contextmanager
def running(alpine, program):
    """A process in ALPINE running PROGRAM (a stand-in's busybox, as `sleep`), with /proc
    mounted there so that the trigger can see it."""
    proc_dir = alpine.host_path("/proc")
    subprocess.run(["mount", "-t", "proc", "proc", str(proc_dir)], check=True)
    root = str(alpine.path)
    process = subprocess.Popen(["sleep", "600"], executable=program,
                               preexec_fn=lambda: (os.chroot(root), os.chdir("/")))
    try:
        yield process
    finally:
        process.kill()
        process.wait()
        subprocess.run(["umount", str(proc_dir)], check=True)


TRIGGER_RUN = r"Executing chatmail-relay-[^ ]+\.trigger"


def restarts(alpine):
    return [call for call in rc_calls(alpine) if call.endswith(" restart")]


def test_upgrading_a_daemon_restarts_it_if_it_runs_the_replaced_program(
        alpine_with_stand_ins, tmp_path):
    """Alpine's packages leave running daemons alone on upgrade; chatmail-relay's trigger
    restarts the relay's daemons that run a program apk replaced (a Dovecot left running
    would refuse every login)."""
    alpine = alpine_with_stand_ins
    result = alpine.apk("add", "chatmail-relay")
    assert result.returncode == 0, result.stdout + result.stderr
    # apk runs a new package's trigger once: nothing replaced, nothing restarted.
    assert re.search(TRIGGER_RUN, result.stdout)
    assert restarts(alpine) == []
    with running(alpine, "/usr/sbin/dovecot"):
        publish_stand_ins(alpine, alpine.stand_ins, tmp_path / "stand-ins",
                          {"dovecot": "1.0-r1"})
        result = alpine.apk("upgrade", "dovecot")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "restarting chatmail-dovecot (apk replaced /usr/sbin/dovecot)" in result.stdout
        assert restarts(alpine) == ["rc-service --quiet chatmail-dovecot restart"]
    # A program changing in /usr/sbin fires the trigger again; Dovecot now runs its
    # current program and nginx does not run: nothing to restart.
    with running(alpine, "/usr/sbin/dovecot"):
        publish_stand_ins(alpine, alpine.stand_ins, tmp_path / "stand-ins",
                          {"dovecot": "1.0-r1", "nginx": "1.0-r1"})
        result = alpine.apk("upgrade", "nginx")
        assert result.returncode == 0, result.stdout + result.stderr
        assert re.search(TRIGGER_RUN, result.stdout)
        assert restarts(alpine) == ["rc-service --quiet chatmail-dovecot restart"]


def python_calls(alpine):
    log = alpine.host_path(PYTHON_LOG)
    return log.read_text().splitlines() if log.exists() else []


def publish_plugin_stand_in(alpine, directory, plugin):
    """The instant-IDLE plugin's package (alpine/dovecot-chatmail-instant-idle, built by
    abuild on Alpine) with its APKBUILD's relations and its module file, signed, in a
    repository of its own that ALPINE lists and trusts."""
    mkapk = load_mkapk()
    key = mkapk.ensure_key(None, directory / "key")
    files = directory / "plugin"
    module = files / load_platform("alpine").dovecot_instant_idle_plugin.lstrip("/")
    module.parent.mkdir(parents=True)
    module.write_bytes(b"\x7fELF stand-in")
    out = alpine.host_path(f"/srv/plugin/{ARCH}")
    out.mkdir(parents=True)
    package = mkapk.Package(name=plugin["pkgname"], directory=files,
                            pkgver=f"{plugin['pkgver']}-r{plugin['pkgrel']}",
                            pkgdesc="stand-in", url="https://x", arch="noarch",
                            license="MIT", origin=plugin["pkgname"],
                            depends=plugin["depends"].split(),
                            install_if=plugin["install_if"].split())
    built = mkapk.write_apk(package, out, key, 0, "test", "", "")
    mkapk.write_index([built], out, ARCH, key, 0, "plugin")
    shutil.copy(key[1], alpine.host_path("/etc/apk/keys"))
    with alpine.host_path("/etc/apk/repositories").open("a") as repositories:
        repositories.write("/srv/plugin\n")


def test_the_plugin_comes_with_the_relay_and_its_coming_and_going_reconfigures(
        alpine_with_stand_ins, tmp_path):
    """Where the repository has the instant-IDLE plugin for this Alpine's Dovecot, apk
    installs it with the relay (install_if: Alpine has no Recommends), and a change in
    Dovecot's module directory runs `chatmail configure` (chatmail-relay's trigger), which
    loads the plugin while it is there, or no longer names it."""
    alpine = alpine_with_stand_ins
    plugin = apkbuild_vars_of_plugin()
    # The stand-in Dovecot's release must be the one the plugin was built for.
    release = plugin["depends"].split("~")[1]
    publish_stand_ins(alpine, alpine.stand_ins, tmp_path / "stand-ins",
                      {"dovecot": f"{release}-r1"})
    publish_plugin_stand_in(alpine, tmp_path, plugin)
    ini = alpine.host_path("/etc/chatmail/chatmail.ini")
    ini.parent.mkdir(parents=True)
    ini.write_text("[params]\nmail_domain = chat.example.org\n")
    result = alpine.apk("add", "chatmail-relay")
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"Installing dovecot-chatmail-instant-idle ", result.stdout)
    configures = [call for call in python_calls(alpine) if call.endswith("chatmail configure")]
    assert configures, python_calls(alpine)
    # install_if keeps it while the relay is installed ("apk del" says so): an admin
    # who wants it gone forbids it (docs/alpine.md).
    before = len(python_calls(alpine))
    result = alpine.apk("add", "!dovecot-chatmail-instant-idle")
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"Purging dovecot-chatmail-instant-idle ", result.stdout)
    assert [call for call in python_calls(alpine)[before:]
            if call.endswith("chatmail configure")]


# --- a package built elsewhere in our repository ----------------------------------------

def test_make_apk_signs_and_indexes_a_package_abuild_built(alpine_root, public_key,
                                                            tmp_path):
    """The instant-IDLE plugin is built by abuild on Alpine, signed with its builder's key,
    and copied into the repository: mkapk keeps it, signs it with the repository's key and
    indexes it, and apk, trusting only that key, installs it."""
    mkapk = load_mkapk()
    out = tmp_path / "repo"
    files = tmp_path / "files"
    module = files / load_platform("alpine").dovecot_instant_idle_plugin.lstrip("/")
    module.parent.mkdir(parents=True)
    module.write_bytes(b"\x7fELF stand-in")
    builder_key = mkapk.ensure_key(None, tmp_path / "builder-key")
    (out / ARCH).mkdir(parents=True)
    name = "dovecot-chatmail-instant-idle"
    # without its dependency on Dovecot, which this minirootfs lacks
    package = mkapk.Package(name=name, directory=files, pkgver="0.1.0-r0",
                            pkgdesc="stand-in for the plugin", url="https://x",
                            arch="x86_64", license="MIT", origin=name)
    mkapk.write_apk(package, out / ARCH, builder_key, 0, "abuild", "", "")
    for _ in range(2):  # a second `make apk` keeps it too
        result = subprocess.run([sys.executable, str(REPO / "alpine" / "mkapk.py"),
                                 "--out", str(out), "--arch", ARCH,
                                 "--python-version", PYTHON_VERSION],
                                capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 0, result.stdout + result.stderr
    index = read_index(out / ARCH / "APKINDEX.tar.gz")[3]["APKINDEX"].decode()
    assert name in {stanza["P"] for stanza in parse_apkindex(index)}
    shutil.copytree(out / ARCH, alpine_root.host_path(f"{REPOSITORY}/{ARCH}"))
    shutil.copy(public_key, alpine_root.host_path("/etc/apk/keys"))
    alpine_root.host_path("/etc/apk/repositories").write_text(REPOSITORY + "\n")
    verify = alpine_root.apk("verify", f"{REPOSITORY}/{ARCH}/{name}-0.1.0-r0.apk")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    added = alpine_root.apk("add", name)
    assert added.returncode == 0, added.stdout + added.stderr
    assert alpine_root.host_path(str(module.relative_to(files))).read_bytes() == \
        b"\x7fELF stand-in"
