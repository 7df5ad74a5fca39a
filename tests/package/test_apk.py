"""The Alpine packages: built from alpine/chatmail-relay/APKBUILD by alpine/mkapk.py, read
back as apk-tools would (signatures, per-file checksums, datahash, index), and compared
with the Debian packaging they must match (files, dependencies, install steps, services,
daily jobs).

The install scripts run twice: under Debian's sh and under Alpine's own busybox sh, in
Alpine's minirootfs (alpine_root.py); test_apk_tools.py has apk-tools read the packages."""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from chatmaild.admin.platform import load_platform
from tests.conftest import REPO
from chatmaild.admin.services import relay_services
from tests.package.conftest import (
    ARCH,
    PYTHON_VERSION,
    SYSTEMD_PREFIX,
    enabled_services,
    load_mkapk,
    relay_lists,
    write_relay_services,
)
from tests.package.test_deb import DIST as DEBS_DIR
from tests.package.test_deb import SERVICE_PROGRAMS
from tests.package.apk_format import (
    CHECKSUM_PAX_KEY,
    ends_with_end_of_archive,
    openssl_verify,
    parse_apkindex,
    read_apk,
    read_index,
)

ALPINE = REPO / "alpine"
# abuild's startdir for chatmail-relay: the APKBUILD, install scripts and trigger.
RELAY_APKBUILD_DIR = ALPINE / "chatmail-relay"
# The instant-IDLE plugin's: abuild builds it on Alpine (C against Alpine's dovecot-dev).
PLUGIN_APKBUILD_DIR = ALPINE / "dovecot-chatmail-instant-idle"
APKBUILD_DIRS = {"chatmail-relay": RELAY_APKBUILD_DIR,
                 "dovecot-chatmail-instant-idle": PLUGIN_APKBUILD_DIR}
DEBIAN = REPO / "debian"
DIST = REPO / "dist"
# conf/services.toml: the APKBUILD generates their init scripts and writes their list
# (relay-services) for the install scripts
RELAY_SERVICES = relay_services()
RELAY_SERVICES_FILE = "/usr/share/chatmail-relay/relay-services"
# The install scripts, the trigger and the runlevel helper they run.
INSTALL_SCRIPTS = [*sorted(RELAY_APKBUILD_DIR.glob("chatmail-relay.*-*")),
                   RELAY_APKBUILD_DIR / "chatmail-relay.trigger", ALPINE / "enable-services"]
# The init scripts written by hand (the relay's own services' are generated).
INIT_SCRIPTS = sorted(ALPINE.glob("*.initd"))
PERIODIC_SCRIPTS = sorted(ALPINE.glob("*.periodic"))

# Debian package -> Alpine package(s) giving the same thing; None: nothing needed
# (busybox or apk provide it). Every Debian dependency must be listed here.
DEBIAN_TO_ALPINE = {
    "adduser": None,                   # busybox adduser/addgroup
    "ca-certificates": ["ca-certificates-bundle"],  # the bundle file (platform ca_file)
    "dovecot-core": ["dovecot"],
    # apk installs the plugin with the relay by the plugin's install_if where the
    # repository has it (Alpine has no Recommends; abuild builds it on Alpine)
    "dovecot-chatmail-instant-idle": None,
    "dovecot-imapd": ["dovecot"],      # IMAP is in Alpine's main dovecot package
    "dovecot-lmtpd": ["dovecot-lmtpd"],
    "fcgiwrap": ["fcgiwrap"],
    "libnginx-mod-stream": ["nginx-mod-stream"],
    "nginx": ["nginx"],
    "opendkim": ["opendkim"],
    "opendkim-tools": ["opendkim-utils"],
    "openssl": ["openssl"],
    "procps": None,                    # busybox kill
    "postfix": ["postfix"],
    "python3-chatmaild": ["py3-chatmaild"],
    "python3-jinja2": ["py3-jinja2"],
    "python3-png": ["py3-pypng"],
    "python3-qrcode": ["py3-qrcode"],
    "python3-aiosmtpd": ["py3-aiosmtpd"],
    "python3-dkim": ["py3-dkimpy"],
    "python3-dnspython": ["py3-dnspython"],
    "libcrypt1": None,                 # musl's libc has crypt_r (chatmaild.sha512crypt)
}
# Alpine needs these beyond the mapping: what Debian's packages bundle, Alpine splits.
ALPINE_ONLY = {
    "chatmail-relay": {"dovecot-lua": "Debian's dovecot-core has the Lua plugins",
                       "dnssec-root": "OpenDKIM's trust anchor (Debian: dns-root-data, "
                                      "pulled in by opendkim)",
                       "lua5.3-cjson": "auth.lua, Dovecot 2.4's passdb (Debian 13's "
                                       "package depends on lua-cjson; 12 has Dovecot 2.3)",
                       "lua5.3-socket": "auth.lua reaches doveauth's socket (Debian 13: "
                                        "lua-socket)",
                       "/bin/sh": "abuild adds it for install scripts",
                       "certbot": "Debian recommends it; apk installs no recommendations",
                       "chatmail-relay-openrc": "Debian's init scripts are in the package; "
                                                "post-install needs them unpacked first"},
    "py3-chatmaild": {"python3": "Debian: ${python3:Depends}",
                      f"python3~{PYTHON_VERSION}": "abuild's Python version tracing"},
}


def apkbuild_var(name, directory=RELAY_APKBUILD_DIR):
    """A variable of the APKBUILD in `directory`, as abuild sees it after sourcing it."""
    result = subprocess.run(["sh", "-c", f'startdir={directory}; srcdir=/nonexistent; '
                             f'. ./APKBUILD; printf %s "${name}"'],
                            cwd=directory, capture_output=True, text=True, check=True)
    return result.stdout


def test_builds_the_packages_of_the_apkbuild(apks):
    # py3-chatmaild-pyc stays empty here (no bytecode for Alpine's Python is made on
    # Debian); abuild fills it on Alpine.
    assert set(apks) == {"chatmail-relay", "py3-chatmaild", "chatmail-relay-openrc"}
    for path in apks.values():
        assert path.name.endswith(f"-{apkbuild_var('pkgver')}-r{apkbuild_var('pkgrel')}.apk")


def test_version_is_debian_changelogs():
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    debian_version = re.match(r"\S+ \(([^)]+)\)", first).group(1)
    from chatmaild import __version__
    assert apkbuild_var("pkgver") == debian_version == __version__


# --- the apk v2 format --------------------------------------------------------------

def test_signature_verifies_with_public_key(parsed, public_key):
    for name, apk in parsed.items():
        assert apk.signature_name == f".SIGN.RSA.{public_key.name}", name
        assert openssl_verify(public_key, apk.signature, apk.control_stream[0]), name


def test_signature_fails_for_a_changed_control_stream(parsed, public_key):
    apk = parsed["chatmail-relay"]
    assert not openssl_verify(public_key, apk.signature, apk.control_stream[0] + b"\0")


def test_signature_and_control_tars_are_cut_data_tar_is_not(parsed):
    for name, apk in parsed.items():
        assert not ends_with_end_of_archive(apk.signature_stream[1]), name
        assert not ends_with_end_of_archive(apk.control_stream[1]), name
        assert ends_with_end_of_archive(apk.data_stream[1]), name


def test_every_file_and_symlink_has_its_sha1(parsed):
    for name, apk in parsed.items():
        for info, content in apk.data:
            if info.isfile():
                expected = hashlib.sha1(content).hexdigest()
            elif info.issym():
                expected = hashlib.sha1(info.linkname.encode()).hexdigest()
            else:
                assert CHECKSUM_PAX_KEY not in info.pax_headers
                continue
            assert info.pax_headers.get(CHECKSUM_PAX_KEY) == expected, f"{name}: {info.name}"


def test_owned_by_root(parsed):
    for name, apk in parsed.items():
        for info, _ in apk.data:
            assert (info.uid, info.gid, info.uname, info.gname) == (0, 0, "root", "root"), \
                f"{name}: {info.name}"


def test_datahash_is_sha256_of_data_stream(parsed):
    for name, apk in parsed.items():
        assert apk.pkginfo["datahash"] == [hashlib.sha256(apk.data_stream[0]).hexdigest()], name


def test_modes_do_not_depend_on_the_builders_umask(parsed, tmp_path):
    """apk narrows a directory that several packages ship (/usr) to the modes in each of
    them: built under umask 027, /usr would become 0750 on the relay, closed to every
    daemon that is not root."""
    subprocess.run([sys.executable, str(ALPINE / "mkapk.py"), "--out", str(tmp_path),
                    "--arch", ARCH, "--python-version", PYTHON_VERSION],
                   check=True, capture_output=True, cwd=REPO,
                   preexec_fn=lambda: os.umask(0o027))
    for path in (tmp_path / ARCH).glob("*.apk"):
        name = path.name.rsplit("-", 2)[0]
        modes = {i.name: i.mode for i, _ in read_apk(path).data}
        assert modes == {i.name: i.mode for i, _ in parsed[name].data}, name
        assert modes["usr" if "usr" in modes else "etc"] == 0o755


def test_pkginfo_fields(parsed):
    version = f"{apkbuild_var('pkgver')}-r{apkbuild_var('pkgrel')}"
    for name, apk in parsed.items():
        info = apk.pkginfo
        for key in ["pkgname", "pkgver", "pkgdesc", "url", "builddate", "packager", "size",
                    "arch", "origin", "license", "datahash"]:
            assert len(info.get(key, [])) == 1, f"{name}: {key}"
        assert info["pkgname"] == [name]
        assert info["pkgver"] == [version]
        assert info["arch"] == ["noarch"]
        assert info["origin"] == ["chatmail-relay"]
        assert info["license"] == ["MIT"]
        assert len(info["pkgdesc"][0]) <= 128
        installed = sum(len(content) for i, content in apk.data if i.isfile())
        assert int(info["size"][0]) == max(installed, 1)


def test_install_scripts_are_in_control_with_bin_sh_dependency(parsed):
    relay = parsed["chatmail-relay"]
    assert set(relay.scripts) == {".pre-install", ".post-install", ".post-upgrade",
                                  ".pre-deinstall", ".trigger"}
    for script, content in relay.scripts.items():
        assert content == (RELAY_APKBUILD_DIR / f"chatmail-relay{script}").read_bytes()
    assert "/bin/sh" in relay.pkginfo["depend"]
    # abuild's form: the APKBUILD's "NAME.trigger=/a:/b" becomes "triggers = /a /b"
    assert relay.pkginfo["triggers"] == ["/usr/sbin /usr/libexec/postfix /usr/lib/dovecot"]
    assert "triggers" not in parsed["chatmail-relay-openrc"].pkginfo
    assert not parsed["py3-chatmaild"].scripts


def test_openrc_subpackage_installs_with_openrc(parsed):
    openrc = parsed["chatmail-relay-openrc"]
    version = openrc.pkginfo["pkgver"][0]
    assert openrc.pkginfo["install_if"] == [f"openrc chatmail-relay={version}"]
    assert {f"/etc/init.d/{s}" for s in RELAY_SERVICES} <= openrc.files
    modes = {"/" + i.name: i.mode for i, _ in openrc.data}
    for service in RELAY_SERVICES:
        assert modes[f"/etc/init.d/{service}"] == 0o755
        assert modes[f"/etc/conf.d/{service}"] == 0o644
    assert not any(f.startswith(("/etc/init.d", "/etc/conf.d"))
                   for f in parsed["chatmail-relay"].files)
    # OpenDKIM with our configuration: an instance of the opendkim package's script
    links = {"/" + i.name: i.linkname for i, _ in openrc.data if i.issym()}
    assert links == {"/etc/init.d/opendkim.chatmail": "opendkim"}
    assert "opendkim.chatmail" in enabled_services()


def test_newemail_service_serves_the_socket_nginx_uses(parsed):
    """/new on Alpine: our fcgiwrap service (Alpine's own makes its socket with umask 022,
    closed to nginx), enabled after install, behind the socket nginx's site names."""
    platform = load_platform("alpine")
    service = platform.fcgiwrap_service
    assert f"/etc/init.d/{service}" in parsed["chatmail-relay-openrc"].files
    variables, depends = run_openrc_harness(ALPINE / f"{service}.initd")
    assert f"fcgiwrap {platform.fcgiwrap_socket} " in variables["command_args"]
    assert variables["command_args"].endswith(f" {platform.libexec_dir}/chatmail-newemail")
    assert "/usr/libexec/chatmail/chatmail-newemail" in parsed["py3-chatmaild"].files
    assert (variables["umask"], variables["command_user"]) == ("007", "fcgiwrap:www-data")
    assert "before nginx" in depends
    assert service in enabled_services() and "fcgiwrap" not in enabled_services()


def test_python_package_provides_and_depends(parsed):
    info = parsed["py3-chatmaild"].pkginfo
    version = info["pkgver"][0]
    # As abuild 3.16 wrote them when it built this APKBUILD: traced entries sorted.
    assert info["provides"] == [f"cmd:chatmail={version}",
                                f"py{PYTHON_VERSION}:chatmaild={version}"]
    assert info["depend"][-1] == f"python3~{PYTHON_VERSION}"


# --- the repository index -----------------------------------------------------------

def test_index_is_signed_and_matches_packages(repo_dir, apks, parsed, public_key):
    import base64
    name, signature, signed, contents = read_index(repo_dir / ARCH / "APKINDEX.tar.gz")
    assert name == f".SIGN.RSA.{public_key.name}"
    assert openssl_verify(public_key, signature, signed)
    assert set(contents) == {"DESCRIPTION", "APKINDEX"}
    stanzas = {s["P"]: s for s in parse_apkindex(contents["APKINDEX"].decode())}
    assert set(stanzas) == set(apks)
    for pkg, stanza in stanzas.items():
        apk = parsed[pkg]
        control_sha1 = hashlib.sha1(apk.control_stream[0]).digest()
        assert stanza["C"] == "Q1" + base64.b64encode(control_sha1).decode()
        assert int(stanza["S"]) == apks[pkg].stat().st_size
        assert stanza["V"] == apk.pkginfo["pkgver"][0]
        assert stanza["A"] == ARCH
        assert stanza["I"] == apk.pkginfo["size"][0]
        assert stanza["T"] == apk.pkginfo["pkgdesc"][0]
        assert stanza["o"] == "chatmail-relay"
        assert stanza.get("D", "").split() == [d for d in apk.pkginfo.get("depend", [])]
        assert stanza.get("p", "").split() == apk.pkginfo.get("provides", [])
    # `apk index` writes the stanzas sorted by package name.
    assert list(stanzas) == sorted(stanzas)


# --- compared with the Debian packaging ---------------------------------------------

def debian_depends(package):
    """Package names in debian/control's Depends of PACKAGE (substvars left out)."""
    text = (DEBIAN / "control").read_text()
    stanza = re.search(rf"^Package: {re.escape(package)}\n(.*?)(?:\n\n|\Z)", text,
                       re.S | re.M).group(1)
    depends = re.search(r"^Depends:(.*?)(?=^\S)", stanza + "\nX", re.S | re.M).group(1)
    names = [re.split(r"[\s(]", d.strip())[0] for d in depends.split(",")]
    return {n for n in names if n and not n.startswith("${")}


@pytest.mark.parametrize("debian_name, alpine_name", [("chatmail-relay", "chatmail-relay"),
                                                      ("python3-chatmaild", "py3-chatmaild")])
def test_dependencies_match_debians(parsed, debian_name, alpine_name):
    expected = set()
    for dep in debian_depends(debian_name):
        assert dep in DEBIAN_TO_ALPINE, f"no Alpine name for Debian's {dep}: add it to the table"
        expected |= set(DEBIAN_TO_ALPINE[dep] or [])
    actual = {re.split(r"[=<>~]", d)[0] if not d.startswith("python3~") else d
              for d in parsed[alpine_name].pkginfo.get("depend", [])}
    assert actual - expected == set(ALPINE_ONLY.get(alpine_name, {})), \
        "Alpine-only dependencies must be explained in ALPINE_ONLY"
    assert expected <= actual


def deb_files(package):
    """Paths of the files and symlinks (not directories) in the host release's .deb."""
    found = sorted(DEBS_DIR.glob(f"{package}_*.deb"))
    if not found:
        pytest.fail(f"no {package} .deb in {DEBS_DIR}: run `make debs` to compare the Alpine "
                    "packages' files with Debian's")
    out = subprocess.run(["dpkg-deb", "--contents", str(found[-1])], capture_output=True,
                         text=True, check=True).stdout
    return {line.split()[5].lstrip(".") for line in out.splitlines()
            if not line.startswith("d")}


def apk_files(apk):
    """Paths of the files and symlinks (not directories) in a parsed .apk."""
    return {"/" + info.name for info, _ in apk.data if info.isfile() or info.issym()}


def without_metadata(paths, site):
    """PATHS with the site-packages directory as /SITE/, and without what only one
    side has by nature: Debian's docs and man page, the installers' metadata."""
    return {p.replace(site, "/SITE/") for p in paths
            if not p.startswith(("/usr/share/doc/", "/usr/share/man/"))
            and ".dist-info/" not in p and ".egg-info/" not in p}


def test_python_files_match_the_deb(parsed):
    deb = without_metadata(deb_files("python3-chatmaild"), "/usr/lib/python3/dist-packages/")
    apk = without_metadata(apk_files(parsed["py3-chatmaild"]),
                           f"/usr/lib/python{PYTHON_VERSION}/site-packages/")
    assert apk - deb == set(), "files only in the .apk"
    assert deb - apk == set(), "files only in the .deb"


SHARED_PLACES = ("/usr/share/chatmail-relay/", "/usr/lib/sysctl.d/")


def test_relay_data_files_match_the_deb(parsed):
    deb = {f for f in deb_files("chatmail-relay") if f.startswith(SHARED_PLACES)}
    apk = {f for f in apk_files(parsed["chatmail-relay"]) if f.startswith(SHARED_PLACES)}
    assert "/usr/lib/sysctl.d/60-chatmail-relay.conf" in deb
    # The runlevel helper of the install scripts and the lists it reads: systemd units are
    # enabled by deb-systemd-helper on Debian.
    data_dir = RELAY_SERVICES_FILE.rpartition("/")[0]
    assert apk - deb == {f"{data_dir}/enable-services",
                         *(f"{data_dir}/{name}" for name in relay_lists())}, \
        "files only in the .apk"
    assert deb - apk == set(), "files only in the .deb"


def test_relay_package_holds_steps_hooks_and_daily_jobs(parsed):
    files = parsed["chatmail-relay"].files
    for step in sorted((REPO / "steps").iterdir()):
        assert f"/usr/share/chatmail-relay/steps/{step.name}" in files
    assert "/usr/share/chatmail-relay/hooks/certbot-deploy" in files
    assert "/usr/share/chatmail-relay/conf/platform.toml" in files
    for job in ["chatmail-expire", "chatmail-fsreport", "chatmail-certbot-renew"]:
        assert f"/etc/periodic/daily/{job}" in files
    modes = {"/" + i.name: i.mode for i, _ in parsed["chatmail-relay"].data}
    assert modes["/usr/share/chatmail-relay/steps/dkim-key"] == 0o755
    assert modes["/usr/share/chatmail-relay/steps/functions.sh"] == 0o644
    assert modes["/usr/share/chatmail-relay/enable-services"] == 0o755
    assert modes["/etc/periodic/daily/chatmail-expire"] == 0o755


def test_services_in_libexec_and_only_chatmail_on_path(parsed):
    files = parsed["py3-chatmaild"].files
    assert "/usr/bin/chatmail" in files
    for daemon in SERVICE_PROGRAMS:
        assert f"/usr/libexec/chatmail/{daemon}" in files
        assert f"/usr/bin/{daemon}" not in files
    scripts = {"/" + i.name: c for i, c in parsed["py3-chatmaild"].data if i.isfile()}
    assert scripts["/usr/libexec/chatmail/doveauth"].startswith(b"#!/usr/bin/python3")


# --- install scripts ----------------------------------------------------------------

def packaged_file(package, path):
    return next(content for info, content in package.data if "/" + info.name == path)


def test_relay_package_lists_the_relay_services_for_its_scripts(parsed):
    """The install scripts and enable-services read conf/services.toml's list from the
    file the build wrote: it stays until apk removes chatmail-relay's files, after
    pre-deinstall, whatever happens to python3 in the same transaction."""
    data_dir = RELAY_SERVICES_FILE.rpartition("/")[0]
    for file, names in relay_lists().items():
        listed = packaged_file(parsed["chatmail-relay"], f"{data_dir}/{file}").decode().split()
        assert listed == names, file
        assert set(names) <= set(enabled_services())
    for script in ["post-upgrade", "pre-deinstall"]:
        text = (RELAY_APKBUILD_DIR / f"chatmail-relay.{script}").read_text()
        assert re.search(r'^RELAY_SERVICES=\$\(cat "\$DATA_DIR"/relay-services\b', text, re.M)
        assert f"DATA_DIR={data_dir}\n" in text
    # a removal stops the other daemons the relay runs under its own init scripts too
    text = (RELAY_APKBUILD_DIR / "chatmail-relay.pre-deinstall").read_text()
    assert re.search(r'^RELAY_INSTANCES=\$\(cat "\$DATA_DIR"/relay-instances\b', text, re.M)
    assert re.search(r'^for service in \$RELAY_SERVICES \$RELAY_INSTANCES;', text, re.M)


def test_openrc_package_ships_the_generated_init_scripts(parsed, openrc_dir):
    openrc = parsed["chatmail-relay-openrc"]
    for service in RELAY_SERVICES:
        for suffix, directory in [(".initd", "init.d"), (".confd", "conf.d")]:
            shipped = packaged_file(openrc, f"/etc/{directory}/{service}")
            assert shipped == (openrc_dir / f"{service}{suffix}").read_bytes(), service


def run_install_script(shell, script, ini_exists, args=(), chatmail_exit=0):
    """Run an install script in SHELL with its INI in the shell's directory and stub
    chatmail/rc-update/rc-service commands that log their arguments (chatmail exits with
    CHATMAIL_EXIT). -> (result, logged calls, INI as the script sees it)"""
    ini = shell.dir / "chatmail.ini"
    if ini_exists:
        ini.write_text("[params]\nmail_domain = chat.example.org\n")
    stubs = shell.dir / "bin"
    stubs.mkdir(exist_ok=True)
    log = shell.dir / "calls.log"
    for command in ["chatmail", "rc-update", "rc-service", "enable-services"]:
        stub = stubs / command
        status = chatmail_exit if command == "chatmail" else 0
        stub.write_text(f'#!/bin/sh\necho "{command} $*" >>{shell.inside(log)}\n'
                        f"exit {status}\n")
        stub.chmod(0o755)
    write_relay_services(stubs)
    text = (RELAY_APKBUILD_DIR / f"chatmail-relay.{script}").read_text()
    text = re.sub(r"^INI=.*$", f"INI={shell.inside(ini)}", text, flags=re.M)
    text = re.sub(r"^DATA_DIR=.*$", f"DATA_DIR={shell.inside(stubs)}", text, flags=re.M)
    copy = shell.dir / script
    copy.write_text(text)
    result = shell.run(["/bin/sh", shell.inside(copy), *args],
                       env={"PATH": f"{shell.inside(stubs)}:/usr/bin:/bin"})
    calls = log.read_text().splitlines() if log.exists() else []
    return result, calls, shell.inside(ini)


def test_post_install_without_ini_says_run_setup_and_succeeds(shell):
    result, calls, _ = run_install_script(shell, "post-install", ini_exists=False)
    assert result.returncode == 0, result.stderr
    assert "chatmail setup YOUR.DOMAIN" in result.stdout
    assert not [c for c in calls if c.startswith("chatmail ")]


def test_post_install_with_ini_runs_chatmail_configure(shell):
    result, calls, ini = run_install_script(shell, "post-install", ini_exists=True)
    assert result.returncode == 0, result.stderr
    # every service into the runlevel first, then configure (which starts them)
    assert calls == ["enable-services --all", f"chatmail --config {ini} configure"]


def test_post_upgrade_reloads_relay_services_like_debian(shell):
    result, calls, ini = run_install_script(shell, "post-upgrade", ini_exists=True,
                                            args=("0.2.0-r0", "0.1.0-r0"))
    assert result.returncode == 0, result.stderr
    reloads = " ".join(f"--reload {s}" for s in RELAY_SERVICES)
    # only services no earlier version enabled (enable-services without --all)
    assert calls == ["enable-services ", f"chatmail --config {ini} configure {reloads}"]


def test_post_install_fails_when_configure_fails(shell):
    result, _, _ = run_install_script(shell, "post-install", ini_exists=True,
                                      chatmail_exit=1)
    assert result.returncode == 1
    assert "apk fix chatmail-relay" in result.stderr


def test_configuration_steps_are_the_shared_pipeline():
    # Both distributions configure through `chatmail configure`; no step is duplicated
    # into the Alpine scripts.
    debian = (DEBIAN / "chatmail-relay.postinst").read_text()
    assert 'chatmail --config "$INI" configure' in debian
    for script in ["post-install", "post-upgrade"]:
        text = (RELAY_APKBUILD_DIR / f"chatmail-relay.{script}").read_text()
        assert 'chatmail --config "$INI" configure' in text
        assert "steps/" not in text


def test_pre_install_creates_vmail_with_busybox_once(alpine_root):
    alpine_root.add_dependency_users(postfix_vmail=False)
    script = alpine_root.host_path("/tmp/pre-install")
    shutil.copy(RELAY_APKBUILD_DIR / "chatmail-relay.pre-install", script)
    first = alpine_root.run("/bin/sh", "/tmp/pre-install")
    assert first.returncode == 0, first.stderr
    passwd = alpine_root.host_path("/etc/passwd").read_text()
    group = alpine_root.host_path("/etc/group").read_text()
    vmail = re.search(r"^vmail:x:(\d+):(\d+):[^:]*:([^:\n]*):([^:\n]*)$", passwd, re.M)
    assert vmail, passwd
    uid, gid, home, login_shell = vmail.groups()
    assert int(uid) < 1000, "a system user"
    assert re.search(rf"^vmail:x:{gid}:", group, re.M)
    assert (home, login_shell) == ("/home/vmail", "/sbin/nologin")
    assert not alpine_root.host_path(home).exists(), "chatmail configure makes the home"
    assert re.search(r"^opendkim:x:\d+:.*\bpostfix\b", group, re.M)
    again = alpine_root.run("/bin/sh", "/tmp/pre-install")
    assert again.returncode == 0, again.stderr
    assert alpine_root.host_path("/etc/passwd").read_text() == passwd
    assert alpine_root.host_path("/etc/group").read_text() == group


def test_pre_install_keeps_the_vmail_that_alpines_postfix_made(alpine_root):
    """Its primary group is postdrop and its home /var/mail/domains: the relay names the
    vmail group wherever it sets one and never uses the home, so our pre-install only
    adds the group (test_steps_busybox runs the steps and daily jobs with this user)."""
    alpine_root.add_dependency_users()
    before = alpine_root.host_path("/etc/passwd").read_text()
    shutil.copy(RELAY_APKBUILD_DIR / "chatmail-relay.pre-install",
                alpine_root.host_path("/tmp/pre-install"))
    result = alpine_root.run("/bin/sh", "/tmp/pre-install")
    assert result.returncode == 0, result.stderr
    assert alpine_root.host_path("/etc/passwd").read_text() == before
    assert re.search(r"^vmail:x:\d+:", alpine_root.host_path("/etc/group").read_text(), re.M)


# --- shell checks -------------------------------------------------------------------

@pytest.mark.parametrize("script", INSTALL_SCRIPTS + PERIODIC_SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_sh_scripts(script):
    assert script.read_text().startswith("#!/bin/sh\n")
    result = subprocess.run(["shellcheck", "--shell=sh", str(script)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", INIT_SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_openrc_scripts(script):
    shellcheck_openrc_script(script)


@pytest.mark.parametrize("service", RELAY_SERVICES)
def test_shellcheck_generated_openrc_scripts(openrc_dir, service):
    shellcheck_openrc_script(openrc_dir / f"{service}.initd")


def shellcheck_openrc_script(script):
    assert script.read_text().startswith("#!/sbin/openrc-run\n")
    assert os.access(script, os.X_OK)
    # openrc-run sources the script in sh and reads its variables (command, supervisor,
    # ...) afterwards: SC2034 "appears unused" is expected for those.
    result = subprocess.run(["shellcheck", "--shell=sh", "--exclude=SC2034", str(script)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0


@pytest.mark.parametrize("directory", APKBUILD_DIRS.values(), ids=APKBUILD_DIRS.keys())
def test_apkbuilds_parse(directory):
    assert subprocess.run(["sh", "-n", str(directory / "APKBUILD")]).returncode == 0


@pytest.mark.parametrize("directory", APKBUILD_DIRS.values(), ids=APKBUILD_DIRS.keys())
def test_nothing_beside_an_apkbuild_that_abuild_would_warn_about(directory):
    """abuild's validation warns about each file beside the APKBUILD that is not a local
    source, install script or trigger script."""
    install = apkbuild_var("install", directory).split()
    triggers = [entry.split("=")[0] for entry in apkbuild_var("triggers", directory).split()]
    local_sources = [s for s in apkbuild_var("source", directory).split() if "://" not in s]
    expected = {"APKBUILD", *install, *triggers, *local_sources}
    assert {path.name for path in directory.iterdir()} - {"src", "pkg", "tmp"} <= expected


@pytest.mark.parametrize("directory", APKBUILD_DIRS.values(), ids=APKBUILD_DIRS.keys())
def test_apkbuilds_pass_the_rules_of_alpines_apkbuild_lint(directory):
    """The rules of atools' apkbuild-lint (run on every aports change) that a run of it
    on our APKBUILDs once found broken."""
    text = (directory / "APKBUILD").read_text()
    assert "`" not in text, "apkbuild-lint: use $() instead of backticks (comments too)"
    assert not re.search(r'^\w+=""$', text, re.M), "apkbuild-lint: variable set to empty"
    pkgname = apkbuild_var("pkgname", directory)
    assert not re.search(r'^builddir="\$srcdir/(\$pkgname|' + pkgname + r')-\$pkgver"$',
                         text, re.M), "apkbuild-lint: builddir is abuild's default"
    assert not re.search(r'^(prepare|build|check|package)\(\) \{\n\tcd "\$builddir"$',
                         text, re.M), "apkbuild-lint: abuild starts each phase there"


def test_unpack_leaves_out_abuilds_own_directories(tmp_path):
    """On Alpine abuild unpacks into src/ beside the APKBUILD, inside the checkout that
    unpack copies: neither that copy nor an earlier build's pkg/ may be copied into it."""
    checkout = tmp_path / "checkout"
    startdir = checkout / "alpine" / "chatmail-relay"
    startdir.mkdir(parents=True)
    shutil.copy(RELAY_APKBUILD_DIR / "APKBUILD", startdir)
    for path in ["conf/x/a.j2", "alpine/doveauth.initd", "alpine/chatmail-relay/pkg/old",
                 "alpine/dovecot-chatmail-instant-idle/src/x/big",
                 "alpine/dovecot-chatmail-instant-idle/tmp/t",
                 "alpine/chatmail-relay/src/leftover", ".git/HEAD", "x/__pycache__/y.pyc"]:
        (checkout / path).parent.mkdir(parents=True, exist_ok=True)
        (checkout / path).write_text("x")
    env = {"PATH": os.environ["PATH"], "startdir": str(startdir),
           "srcdir": str(startdir / "src")}
    builddir = load_mkapk().run_in_apkbuild(
        startdir / "APKBUILD", env, 'mkdir -p "$srcdir"; cd "$srcdir"; unpack; '
        'printf %s "$builddir"', cwd=startdir)
    copied = {str(p.relative_to(builddir)) for p in Path(builddir).rglob("*") if p.is_file()}
    assert copied == {"conf/x/a.j2", "alpine/doveauth.initd", "alpine/chatmail-relay/APKBUILD"}


# --- OpenRC scripts read under a harness (tests/openrc runs them with OpenRC) ----------

# Stand-ins for what openrc-run provides, recording the dependencies declared.
OPENRC_STUBS = """
RC_SVCNAME=$(basename "$1")
for kind in need use want before after provide keyword; do
	eval "$kind() { echo \\"dep $kind \\$*\\"; }"
done
ebegin() { :; }; eend() { :; }; einfo() { :; }; ewarn() { :; }; eerror() { echo "error $*"; }
. "$1"
depend
for var in command command_args command_user supervisor respawn_delay respawn_max umask \
	rc_ulimit no_new_privs; do
	eval "printf 'var %s=%s\\n' $var \\"\\${$var}\\""
done
"""


def run_openrc_harness(script):
    result = subprocess.run(["sh", "-e", "-c", OPENRC_STUBS, "harness", str(script)],
                            capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    variables = dict(line[4:].split("=", 1) for line in result.stdout.splitlines()
                     if line.startswith("var "))
    depends = [line[4:] for line in result.stdout.splitlines() if line.startswith("dep ")]
    return variables, depends


def systemd_unit(service, directory=DEBIAN):
    """The fields of SERVICE's unit in DIRECTORY (the daily jobs' are written by hand)."""
    fields = {}
    for line in (directory / f"{SYSTEMD_PREFIX}{service}.service").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            fields.setdefault(key, []).append(value)
    return fields


@pytest.mark.parametrize("service", RELAY_SERVICES)
def test_openrc_script_matches_systemd_unit(service, parsed, openrc_dir, systemd_dir):
    variables, depends = run_openrc_harness(openrc_dir / f"{service}.initd")
    unit = systemd_unit(service, systemd_dir)
    assert variables["supervisor"] == "supervise-daemon"
    assert variables["command_user"] == f"{unit['User'][0]}:{unit['Group'][0]}"
    assert f"{variables['command']} {variables['command_args']}" == unit["ExecStart"][0]
    assert "/" + variables["command"].lstrip("/") in parsed["py3-chatmaild"].files
    # Restart=always -> unlimited respawns, RestartSec -> respawn_delay.
    assert unit["Restart"] == ["always"]
    assert variables["respawn_max"] == "0"
    assert variables["respawn_delay"] == unit["RestartSec"][0]
    assert variables["umask"].lstrip("0") == unit["UMask"][0].lstrip("0")
    assert variables["rc_ulimit"] == f"-n {unit['LimitNOFILE'][0]}"
    assert variables["no_new_privs"] == "yes"
    # Before=dovecot.service / postfix.service -> before chatmail-dovecot / postfix.
    for before in unit.get("Before", []):
        for target in before.split():
            name = target.removesuffix(".service")
            if name != "postfix@-":
                name = {"dovecot": load_platform("alpine").dovecot_service}.get(name, name)
                assert f"before {name}" in depends
    if "After" in unit:
        assert "after net" in depends


# --- daily jobs ---------------------------------------------------------------------

@pytest.mark.parametrize("job", ["chatmail-expire", "chatmail-fsreport"])
def test_daily_job_runs_what_debians_timer_runs(job):
    unit = systemd_unit(job)
    text = (ALPINE / f"{job}.periodic").read_text()
    ini = re.search(r"^INI=(.*)$", text, re.M).group(1)
    report_dir = re.search(r"^REPORT_DIR=(.*)$", text, re.M)
    command = re.search(r'su -s /bin/sh vmail -c "([^"]*)"', text).group(1)
    command = command.replace("$INI", ini)
    if report_dir:
        command = command.replace("$REPORT_DIR", report_dir.group(1))
    assert command == unit["ExecStart"][0]
    assert unit["User"] == ["vmail"]
    assert "nice -n 10" in text and unit["Nice"] == ["10"]
    assert "umask 077" in text


def test_daily_jobs_do_nothing_before_setup(shell):
    for job in ["chatmail-expire", "chatmail-fsreport"]:
        text = (ALPINE / f"{job}.periodic").read_text()
        missing = shell.inside(shell.dir / "missing.ini")
        copy = shell.dir / job
        copy.write_text(re.sub(r"^INI=.*$", f"INI={missing}", text, flags=re.M))
        result = shell.run(["/bin/sh", shell.inside(copy)])
        assert result.returncode == 0 and not result.stdout and not result.stderr


def test_certbot_renewal_uses_the_shared_deploy_hook():
    # The stored deploy hook (steps/acme-certificate) reloads through `chatmail
    # configure`, which reloads with rc-service on OpenRC (tests/package/
    # test_steps_busybox.py).
    hook = (REPO / "hooks" / "certbot-deploy").read_text()
    assert "--reload postfix --reload dovecot --reload nginx" in hook
    assert "certbot renew" in (ALPINE / "chatmail-certbot-renew.periodic").read_text()


# --- the instant-IDLE plugin ----------------------------------------------------------

def apkbuild_vars_of_plugin():
    return {name: apkbuild_var(name, PLUGIN_APKBUILD_DIR) for name in
            ["pkgname", "pkgver", "pkgrel", "depends", "makedepends", "install_if"]}


def test_plugin_apkbuild_is_for_the_dovecot_release_our_alpine_templates_are_for():
    """Dovecot loads a plugin only into the release it was built for, and Alpine's dovecot
    names no ABI: the plugin depends on that release's every -rN (Alpine's security
    rebuilds), and is built against the same."""
    plugin = apkbuild_vars_of_plugin()
    release = apkbuild_var("_dovecotver", PLUGIN_APKBUILD_DIR)
    assert release.startswith(load_platform("alpine").dovecot_version + ".")
    assert plugin["depends"].split() == [f"dovecot~{release}"]
    assert plugin["makedepends"].split() == [f"dovecot-dev~{release}"]
    assert plugin["install_if"].split() == ["chatmail-relay"]


def test_plugin_apkbuild_has_the_debian_packages_name_and_version():
    plugin = apkbuild_vars_of_plugin()
    changelog = (REPO / "dovecot" / "plugin" / "debian" / "changelog").read_text()
    name, version = re.match(r"(\S+) \(([^)]+)\)", changelog).groups()
    assert (plugin["pkgname"], plugin["pkgver"]) == (name, version)


def test_lua_modules_fit_the_lua_alpines_dovecot_is_built_with():
    """auth.lua loads LuaSocket and lua-cjson into Dovecot's Lua: they must be built for
    the same Lua version, 5.3 in Alpine's Dovecot."""
    depends = apkbuild_var("depends").split()
    assert {"lua5.3-socket", "lua5.3-cjson"} <= set(depends)
    assert not [dep for dep in depends if re.match(r"lua5\.[0-24-9]-", dep)]


def verify_certificate(certificate, *trust):
    return subprocess.run(["openssl", "verify", "-no-CAfile", "-no-CApath", "-no-CAstore",
                           *trust, str(certificate)], capture_output=True, text=True)


def test_postfix_on_alpine_trusts_the_bundle_that_alpine_ships(alpine_root):
    """Postfix verifies other relays' certificates with the platform's ca_file, here from
    Alpine's own minirootfs (ca-certificates-bundle). Its /etc/ssl/certs holds no hash
    links, which only the full ca-certificates package makes, so a CApath there would
    trust nothing and every delivery to another relay would fail."""
    platform = load_platform("alpine")
    assert platform.ca_path == ""
    root_ca = "/usr/share/ca-certificates/mozilla/ISRG_Root_X1.crt"  # Let's Encrypt's
    trusted = verify_certificate(root_ca, "-CAfile", alpine_root.host_path(platform.ca_file))
    assert trusted.returncode == 0, trusted.stdout + trusted.stderr
    untrusted = verify_certificate(root_ca, "-CApath", alpine_root.host_path("/etc/ssl/certs"))
    assert untrusted.returncode != 0
    owner = alpine_root.run("/sbin/apk", "info", "--who-owns", platform.ca_file).stdout
    assert "ca-certificates-bundle" in owner
    assert "ca-certificates-bundle" in apkbuild_var("depends").split()


def test_no_tar_end_blocks_between_streams(apks):
    # The three streams read as a single tar (as apk-tools 2 reads them).
    with tarfile.open(apks["chatmail-relay"], "r:gz") as tar:
        names = tar.getnames()
    assert names[0].startswith(".SIGN.RSA.") and names[1] == ".PKGINFO"
    assert "usr/share/chatmail-relay/steps/dkim-key" in names
