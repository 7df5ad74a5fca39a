#!/usr/bin/python3
"""Build chatmail-relay's Alpine packages (.apk, v2 format) and a signed repository on a
host without abuild (Debian, CI), from alpine/chatmail-relay/APKBUILD.

    /usr/bin/python3 alpine/mkapk.py --out dist/alpine [--key KEY.rsa] [--arch x86_64]

The APKBUILD stays the one source of truth: this script sources it in sh, runs its
unpack(), prepare(), build() and package() functions and every split function into
package directories, as abuild does, with small stand-ins for the abuild helpers they call
(amove, default_prepare, default_pyc, default_openrc) and for two Alpine tools that
Debian lacks: `gpep517 build-wheel` (done with `python3 -m build`) and `python3 -m
installer` (installs into Alpine's /usr/lib/python3.X/site-packages, X from
--python-version, without bytecode: Debian's Python cannot compile for Alpine's). A
subpackage whose split function leaves it empty (py3-chatmaild-pyc, for that reason) is
reported and not written.

Each package is written as apk-tools 2 reads it (shared/spec/alpine.md §3): three gzip
streams, the signature (.SIGN.RSA.<key name>, `openssl dgst -sha1 -sign` over the
control stream), the control tar (.PKGINFO and the install scripts) and the data tar with
an APK-TOOLS.checksum.SHA1 PAX header before every file and symlink. .PKGINFO's datahash
is the sha256 of the data stream. Signature and control tars have their end-of-archive
blocks cut, so the three streams read as one tar. Files belong to uid/gid 0, named root.

The repository goes to OUT/<arch>/ (noarch packages too, as abuild does):
*.apk, APKINDEX.tar.gz (DESCRIPTION + APKINDEX, signed the same way), and the public
key OUT/<key name>, which admins copy to /etc/apk/keys/.

Packages of other names already in OUT/<arch>/ (our patched Dovecot, built by abuild on
Alpine from alpine/dovecot/APKBUILD) stay: they are signed again with the repository's
key and indexed with ours. Older versions of our own packages are removed.

Without --key a throw-away RSA key is made once and kept outside the checkout in
/var/cache/chatmail-relay-build/apk-key/ ($CHATMAIL_BUILD_CACHE), so repeated builds
verify with the same public key.
"""

import argparse
import base64
import gzip
import hashlib
import io
import os
import platform
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SCRIPT_TYPES = ["pre-install", "post-install", "pre-upgrade", "post-upgrade",
                "pre-deinstall", "post-deinstall"]
APKBUILD_VARS = ["pkgname", "pkgver", "pkgrel", "pkgdesc", "url", "arch", "license",
                 "depends", "provides", "install_if", "install", "subpackages", "source",
                 "replaces", "triggers"]
CHECKSUM_PAX_KEY = "APK-TOOLS.checksum.SHA1"
DEFAULT_CACHE = "/var/cache/chatmail-relay-build"

# abuild's helpers as far as APKBUILDs call them, in POSIX sh (abuild itself needs
# busybox ash or bash). Kept to what abuild does; see abuild.in for the originals.
ABUILD_HELPERS = r'''
msg() { printf '>>> %s\n' "$*" >&2; }
warning() { printf '>>> WARNING: %s\n' "$*" >&2; }
error() { printf '>>> ERROR: %s\n' "$*" >&2; }
die() { error "$@"; exit 1; }
options_has() { case " $options " in *" $1 "*) return 0 ;; esac; return 1; }

# amove PATH...: move paths (relative to $pkgdir) into $subpkgdir, keeping their place.
amove() {
	[ -n "$subpkgdir" ] || return 1
	_amove_ret=0
	_amove_old=$(pwd)
	cd "$pkgdir" || return 1
	for _amove_f; do
		_amove_f=${_amove_f#/}
		_amove_f=${_amove_f%/}
		if [ ! -e "$_amove_f" ] && [ ! -L "$_amove_f" ]; then
			_amove_ret=1
			continue
		fi
		_amove_d=${_amove_f%/*}
		[ "$_amove_d" = "$_amove_f" ] && _amove_d=.
		mkdir -p "$subpkgdir/$_amove_d"
		mv "$_amove_f" "$subpkgdir/$_amove_d"
		rmdir -p "$_amove_d" 2>/dev/null || :
	done
	cd "$_amove_old" || return 1
	return $_amove_ret
}

default_unpack() { :; }
unpack() { default_unpack; }
default_prepare() {
	for _p in $source; do
		case "${_p##*/}" in
		*.patch) msg "applying ${_p##*/}"; patch -p1 -i "$srcdir/${_p##*/}" ;;
		esac
	done
}
prepare() { default_prepare; }
build() { :; }

default_pyc() {
	depends=
	pkgdesc="Precompiled Python bytecode for ${subpkgname%-pyc}"
	install_if="${subpkgname%-pyc}=$pkgver-r$pkgrel pyc"
	cd "$pkgdir" || return 1
	for _d in $(find usr/lib/python* -type d -name __pycache__ 2>/dev/null); do
		amove "$_d"
	done
}
pyc() { default_pyc; }

default_openrc() {
	depends="$depends_openrc"
	pkgdesc="$pkgdesc (OpenRC init scripts)"
	install_if="openrc ${subpkgname%-openrc}=$pkgver-r$pkgrel"
	amove etc/conf.d etc/init.d || :
}
openrc() { default_openrc; }

# pre_split: what abuild resets before every split function.
pre_split() { provides=""; install_if=""; cd "$pkgdir" || exit 1; }
'''

# `gpep517 build-wheel --wheel-dir DIR --output-fd N`: build the wheel with Debian's
# python3-build and report its file name on fd N, as gpep517 does.
GPEP517_SHIM = r'''#!/usr/bin/python3
import os, subprocess, sys
args = sys.argv[1:]
if not args or args[0] != "build-wheel":
    sys.exit("gpep517 stand-in: only build-wheel is supported")
wheel_dir = args[args.index("--wheel-dir") + 1]
out_fd = int(args[args.index("--output-fd") + 1]) if "--output-fd" in args else 1
before = set(os.listdir(wheel_dir)) if os.path.isdir(wheel_dir) else set()
subprocess.run(["/usr/bin/python3", "-m", "build", "--wheel", "--no-isolation",
                "--outdir", wheel_dir, "."], check=True, stdout=sys.stderr)
new = sorted(set(os.listdir(wheel_dir)) - before)
os.write(out_fd, ("\n".join(new) + "\n").encode())
'''

# `python3 ...`: Debian's python3, except `python3 -m installer -d DESTDIR WHEEL...`,
# which installs into Alpine's layout (the target Python version from the environment).
PYTHON3_SHIM = r'''#!/usr/bin/python3
import os, sys
args = sys.argv[1:]
if args[:2] != ["-m", "installer"]:
    os.execv("/usr/bin/python3", ["/usr/bin/python3", *args])
from installer import install
from installer.destinations import SchemeDictionaryDestination
from installer.sources import WheelFile
args = args[2:]
destdir = None
wheels = []
while args:
    arg = args.pop(0)
    if arg in ("-d", "--destdir"):
        destdir = args.pop(0)
    elif arg.startswith("-"):
        pass  # bytecode options: no bytecode is made here
    else:
        wheels.append(arg)
ver = os.environ["MKAPK_PYTHON_VERSION"]
site = f"/usr/lib/python{ver}/site-packages"
scheme = {"purelib": site, "platlib": site, "scripts": "/usr/bin", "data": "/usr",
          "headers": f"/usr/include/python{ver}"}
for wheel in wheels:
    destination = SchemeDictionaryDestination(
        scheme, interpreter="/usr/bin/python3", script_kind="posix", destdir=destdir)
    with WheelFile.open(wheel) as source:
        install(source, destination, additional_metadata={"INSTALLER": b"installer\n"})
'''


@dataclass
class Package:
    """One (sub)package: its metadata as the APKBUILD set it, and its files."""
    name: str
    directory: Path
    pkgver: str
    pkgdesc: str
    url: str
    arch: str
    license: str
    origin: str
    depends: list = field(default_factory=list)
    provides: list = field(default_factory=list)
    install_if: list = field(default_factory=list)
    replaces: list = field(default_factory=list)
    scripts: dict = field(default_factory=dict)  # ".post-install" -> bytes
    triggers: list = field(default_factory=list)  # directories whose changes run .trigger


def say(text):
    print(f"mkapk: {text}", flush=True)


# --- reading and running the APKBUILD ------------------------------------------------

def shell_quote(text):
    return "'" + text.replace("'", "'\\''") + "'"


def print_vars_snippet(names):
    """sh that prints each variable as NAME NUL VALUE NUL."""
    return "".join(f'printf "%s\\0%s\\0" {n} "${{{n}}}"\n' for n in names)


def parse_nul_pairs(output):
    parts = output.split("\0")
    return dict(zip(parts[0:-1:2], parts[1::2]))


def sourcing(apkbuild):
    """sh that defines abuild's helpers, sources APKBUILD and sets abuild's defaults."""
    return (f"{ABUILD_HELPERS}\n. {shell_quote(str(apkbuild))}\n"
            'builddir=${builddir:-"$srcdir/$pkgname-$pkgver"}\n')


def read_apkbuild_vars(apkbuild, env):
    """The APKBUILD's global variables, as sh sees them after sourcing it."""
    script = sourcing(apkbuild) + print_vars_snippet(APKBUILD_VARS)
    result = subprocess.run(["sh", "-e", "-c", script], env=env, capture_output=True,
                            text=True, check=True)
    values = parse_nul_pairs(result.stdout)
    return {name: values.get(name, "") for name in APKBUILD_VARS}


def maintainer_of(apkbuild):
    for line in apkbuild.read_text().splitlines():
        if line.startswith("# Maintainer:"):
            return line.partition(":")[2].strip()
    return ""


def make_shims(directory):
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in [("gpep517", GPEP517_SHIM), ("python3", PYTHON3_SHIM)]:
        path = directory / name
        path.write_text(text)
        path.chmod(0o755)


def run_in_apkbuild(apkbuild, env, body, cwd):
    """Run sh BODY with the APKBUILD sourced and abuild's helpers defined, like abuild."""
    script = sourcing(apkbuild) + body
    result = subprocess.run(["sh", "-e", "-c", script], env=env, cwd=cwd,
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"mkapk: {body.strip().splitlines()[0]} failed "
                         f"(exit {result.returncode})")
    return result.stdout


def build_main_package(apkbuild, env, srcdir, pkgdir):
    srcdir.mkdir(parents=True)
    say("unpack, prepare, build")
    run_in_apkbuild(apkbuild, env, 'cd "$srcdir"; unpack\ncd "$builddir"; prepare\n'
                    'cd "$builddir"; build\n', cwd=srcdir)
    say("package")
    pkgdir.mkdir(parents=True)
    run_in_apkbuild(apkbuild, env, 'cd "$builddir"; package\n', cwd=srcdir)


def split_spec(entry):
    """subpackages entry name[:function[:arch]] -> (name, function, arch or "")."""
    name, _, rest = entry.partition(":")
    function, _, arch = rest.partition(":")
    return name, function or name.rsplit("-", 1)[-1], arch


def run_split_function(apkbuild, env, entry, pkgbasedir, startdir):
    """Run one split function; return the variables it left for its package."""
    name, function, arch = split_spec(entry)
    say(f"split {name} ({function})")
    sub_env = dict(env, subpkgname=name, subpkgdir=str(pkgbasedir / name))
    out = run_in_apkbuild(apkbuild, sub_env, f"pre_split\n{function}\n"
                          + print_vars_snippet(["pkgdesc", "depends", "provides",
                                                "install_if", "replaces", "arch"]),
                          cwd=startdir)
    values = parse_nul_pairs(out)
    if arch:
        values["arch"] = arch
    elif name.endswith(("-doc", "-openrc", "-pyc")):
        values["arch"] = "noarch"
    return name, values


# --- package contents and metadata ---------------------------------------------------

def package_entries(directory):
    """Every path below DIRECTORY, relative, sorted bytewise as abuild's `sort -z`."""
    paths = [p.relative_to(directory).as_posix() for p in directory.rglob("*")]
    return sorted(paths, key=lambda p: p.encode())


def installed_size(directory, has_scripts):
    seen, size = set(), 0
    for path in directory.rglob("*"):
        st = path.lstat()
        if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            size += st.st_size
    # apk-tools 2 treats size 0 as a virtual package and would run no scripts.
    if size == 0 and (any(directory.iterdir()) or has_scripts):
        size = 1
    return size


def scripts_for(name, install, startdir):
    """The install scripts named NAME.TYPE in the APKBUILD's install variable."""
    scripts = {}
    for script in install.split():
        base, _, kind = script.rpartition(".")
        if base == name and kind in SCRIPT_TYPES:
            scripts["." + kind] = (startdir / script).read_bytes()
    return scripts


def trigger_for(name, triggers, startdir):
    """(directories, script) of NAME's entry "NAME.trigger=/dir:/dir" in the APKBUILD's
    triggers variable; ([], None) without one."""
    for entry in triggers.split():
        script, _, directories = entry.partition("=")
        if script == f"{name}.trigger":
            return directories.split(":"), (startdir / script).read_bytes()
    return [], None


def needs_bin_sh(scripts):
    return any(text.split(b"\n", 1)[0].replace(b" ", b"").startswith(b"#!/bin/sh")
               for text in scripts.values())


def python_site_dirs(directory):
    return sorted((directory / "usr" / "lib").glob("python3*/site-packages"))


def python_auto_dependencies(package):
    """What abuild's tracing finds for Python packages: (depends python3~X.Y, provides
    pyX.Y:<module> for every importable top-level module)."""
    depends, provides = [], []
    for site in python_site_dirs(package.directory):
        pyver = site.parent.name.removeprefix("python")
        depends.append(f"python3~{pyver}")
        for module in site.iterdir():
            if module.is_dir() and (module / "__init__.py").exists():
                provides.append(f"py{pyver}:{module.name}={package.pkgver}")
            elif module.suffix == ".py":
                provides.append(f"py{pyver}:{module.stem}={package.pkgver}")
    return depends, provides


def command_provides(package):
    """abuild's cmd:NAME provides for executables on PATH."""
    return [f"cmd:{path.name}={package.pkgver}"
            for bindir in ["bin", "sbin", "usr/bin", "usr/sbin"]
            for path in (package.directory / bindir).glob("*")
            if path.is_symlink() or (path.is_file() and os.access(path, os.X_OK))]


def add_traced_dependencies(package):
    """Append what abuild's tracing finds after the APKBUILD's own depends and provides,
    each list sorted without repeats (abuild's `sort -u`; musl sorts bytewise)."""
    depends, provides = python_auto_dependencies(package)
    provides += command_provides(package)
    package.depends += sorted(set(depends))
    package.provides += sorted(set(provides))


def pkginfo_text(package, builddate, packager, maintainer, commit, size, datahash):
    lines = ["# Generated by chatmail-relay alpine/mkapk.py",
             f"pkgname = {package.name}",
             f"pkgver = {package.pkgver}",
             f"pkgdesc = {package.pkgdesc}",
             f"url = {package.url}",
             f"builddate = {builddate}",
             f"packager = {packager}",
             f"size = {size}",
             f"arch = {package.arch}",
             f"origin = {package.origin}"]
    if commit:
        lines.append(f"commit = {commit}")
    if maintainer:
        lines.append(f"maintainer = {maintainer}")
    lines.append(f"license = {package.license}")
    lines += [f"replaces = {r}" for r in package.replaces]
    lines += [f"depend = {d}" for d in package.depends if d != package.name]
    lines += [f"provides = {p}" for p in package.provides]
    if package.triggers:
        lines.append("triggers = " + " ".join(package.triggers))
    if package.install_if:
        lines.append("install_if = " + " ".join(package.install_if))
    lines.append(f"datahash = {datahash}")
    return "\n".join(lines) + "\n"


# --- tar and gzip streams --------------------------------------------------------------

def root_tarinfo(name, mtime):
    info = tarfile.TarInfo(name)
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = mtime
    return info


def data_tar(directory, mtime):
    """The data tar: every path, with the SHA1 PAX header apk-tools checks on install
    before each regular file and symlink (of the link target, for symlinks)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in package_entries(directory):
            path = directory / name
            st = path.lstat()
            info = root_tarinfo(name, mtime)
            info.mode = stat.S_IMODE(st.st_mode)
            content = None
            if stat.S_ISLNK(st.st_mode):
                info.type = tarfile.SYMTYPE
                info.linkname = os.readlink(path)
                info.pax_headers = {CHECKSUM_PAX_KEY:
                                    hashlib.sha1(info.linkname.encode()).hexdigest()}
            elif stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
            elif stat.S_ISREG(st.st_mode):
                content = path.read_bytes()
                info.size = len(content)
                info.pax_headers = {CHECKSUM_PAX_KEY: hashlib.sha1(content).hexdigest()}
            else:
                raise SystemExit(f"mkapk: {path}: not a file, directory or symlink")
            tar.addfile(info, io.BytesIO(content) if content is not None else None)
    return buffer.getvalue()


def cut_tar(members, mtime, numeric_owner=False):
    """A tar of (name, bytes, mode) without its end-of-archive blocks (abuild-tar --cut),
    so that it can be followed by the next stream."""
    buffer = io.BytesIO()
    tar = tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT)
    for name, content, mode in members:
        info = root_tarinfo(name, mtime)
        if numeric_owner:
            info.uname = info.gname = ""
        info.mode = mode
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    # Everything added is in the buffer already; close() would only add the end blocks.
    return buffer.getvalue()


def gzip_stream(data):
    """gzip -n -9: no name, no time stamp."""
    return gzip.compress(data, compresslevel=9, mtime=0)


# --- keys and signatures -------------------------------------------------------------

def ensure_key(key_arg, cache_dir):
    """(private key path, public key path); the public key's file name is the key name
    apk looks for in /etc/apk/keys."""
    if key_arg:
        private = Path(key_arg)
        public = Path(str(private) + ".pub")
        if not public.exists():
            raise SystemExit(f"mkapk: {public} missing (the public key of {private})")
        return private, public
    cache_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(cache_dir.glob("*.rsa"))
    if existing:
        return existing[0], Path(str(existing[0]) + ".pub")
    # abuild-keygen's naming: <name>-<hex time>.rsa
    private = cache_dir / f"chatmail-relay-{int(time.time()):08x}.rsa"
    say(f"making a throw-away RSA signing key {private}")
    subprocess.run(["openssl", "genrsa", "-out", str(private), "4096"], check=True,
                   capture_output=True)
    private.chmod(0o600)
    subprocess.run(["openssl", "rsa", "-in", str(private), "-pubout",
                    "-out", str(private) + ".pub"], check=True, capture_output=True)
    return private, Path(str(private) + ".pub")


def signature_stream(signed_bytes, private, public, mtime):
    """The gzip stream holding .SIGN.RSA.<key name>: an RSA/SHA1 signature."""
    with tempfile.NamedTemporaryFile() as data:
        data.write(signed_bytes)
        data.flush()
        signature = subprocess.run(["openssl", "dgst", "-sha1", "-sign", str(private),
                                    data.name], check=True, capture_output=True).stdout
    member = (f".SIGN.RSA.{public.name}", signature, 0o644)
    return gzip_stream(cut_tar([member], mtime, numeric_owner=True))


# --- writing packages and the index --------------------------------------------------

@dataclass
class BuiltApk:
    package: Package
    path: Path
    control_stream: bytes
    installed_size: int
    builddate: int
    maintainer: str
    commit: str


def write_apk(package, outdir, key, mtime, packager, maintainer, commit):
    private, public = key
    data_stream = gzip_stream(data_tar(package.directory, mtime))
    size = installed_size(package.directory, bool(package.scripts))
    pkginfo = pkginfo_text(package, mtime, packager, maintainer, commit, size,
                           hashlib.sha256(data_stream).hexdigest())
    members = [(".PKGINFO", pkginfo.encode(), 0o644)]
    members += [(name, package.scripts[name], 0o755) for name in sorted(package.scripts)]
    control_stream = gzip_stream(cut_tar(members, mtime))
    apk = outdir / f"{package.name}-{package.pkgver}.apk"
    apk.write_bytes(signature_stream(control_stream, private, public, mtime)
                    + control_stream + data_stream)
    say(f"wrote {apk} ({size} bytes installed)")
    return BuiltApk(package, apk, control_stream, size, mtime, maintainer, commit)


def index_entry(built, arch):
    package = built.package
    checksum = "Q1" + base64.b64encode(hashlib.sha1(built.control_stream).digest()).decode()
    lines = [f"C:{checksum}", f"P:{package.name}", f"V:{package.pkgver}", f"A:{arch}",
             f"S:{built.path.stat().st_size}", f"I:{built.installed_size}",
             f"T:{package.pkgdesc}", f"U:{package.url}", f"L:{package.license}",
             f"o:{package.origin}"]
    if built.maintainer:
        lines.append(f"m:{built.maintainer}")
    lines.append(f"t:{built.builddate}")
    if built.commit:
        lines.append(f"c:{built.commit}")
    depends = [d for d in package.depends if d != package.name]
    if depends:
        lines.append("D:" + " ".join(depends))
    if package.provides:
        lines.append("p:" + " ".join(package.provides))
    if package.install_if:
        lines.append("i:" + " ".join(package.install_if))
    return "\n".join(lines) + "\n\n"


def write_index(builts, outdir, arch, key, mtime, description):
    """OUT/<arch>/APKINDEX.tar.gz as `apk index --rewrite-arch` + abuild-sign make it."""
    text = "".join(index_entry(b, arch) for b in sorted(builts, key=lambda b: b.package.name))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in [("DESCRIPTION", description.encode()),
                              ("APKINDEX", text.encode())]:
            info = root_tarinfo(name, mtime)
            info.mode = 0o644
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    index_stream = gzip_stream(buffer.getvalue())
    path = outdir / "APKINDEX.tar.gz"
    path.write_bytes(signature_stream(index_stream, *key, mtime) + index_stream)
    say(f"wrote {path} ({len(builts)} packages)")
    return path


# --- packages built elsewhere -----------------------------------------------------------

def gzip_members(data):
    """The compressed bytes of each gzip member of DATA, which follow one another."""
    members = []
    while data:
        decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
        decompressor.decompress(data)
        if not decompressor.eof:
            raise ValueError("truncated gzip stream")
        used = len(data) - len(decompressor.unused_data)
        members.append(data[:used])
        data = decompressor.unused_data
    return members


def read_pkginfo(control_stream):
    """{key: [values]} of the .PKGINFO in an apk's control stream."""
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(control_stream)), mode="r:") as tar:
        text = tar.extractfile(".PKGINFO").read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and " = " in line:
            key, _, value = line.partition(" = ")
            values.setdefault(key, []).append(value)
    return values


def adopt_apk(path, key, mtime):
    """A package that abuild built (signed with its builder's key), signed again with the
    repository's key, as an index entry."""
    try:
        _, control_stream, data_stream = gzip_members(path.read_bytes())
        info = read_pkginfo(control_stream)
    except (ValueError, KeyError, tarfile.TarError, zlib.error, OSError) as error:
        raise SystemExit(f"mkapk: {path} is not an apk v2 package ({error}): remove it")
    first = {name: values[0] for name, values in info.items()}
    package = Package(name=first["pkgname"], directory=path, pkgver=first["pkgver"],
                      pkgdesc=first.get("pkgdesc", ""), url=first.get("url", ""),
                      arch=first.get("arch", ""), license=first.get("license", ""),
                      origin=first.get("origin", first["pkgname"]),
                      depends=info.get("depend", []), provides=info.get("provides", []),
                      install_if=info.get("install_if", []))
    path.write_bytes(signature_stream(control_stream, *key, mtime) + control_stream
                     + data_stream)
    say(f"signed {path} again with the repository's key")
    return BuiltApk(package, path, control_stream, int(first.get("size", 0)),
                    int(first.get("builddate", mtime)), first.get("maintainer", ""),
                    first.get("commit", ""))


def package_name_of(apk_path):
    """NAME of NAME-VERSION-rREL.apk."""
    return apk_path.name.removesuffix(".apk").rsplit("-", 2)[0]


# --- putting it together ---------------------------------------------------------------

def alpine_arch():
    machine = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def source_date_epoch():
    """SOURCE_DATE_EPOCH, else the last commit's time (as abuild), else now."""
    if os.environ.get("SOURCE_DATE_EPOCH"):
        return int(os.environ["SOURCE_DATE_EPOCH"])
    result = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%ct"],
                            capture_output=True, text=True)
    return int(result.stdout.strip()) if result.returncode == 0 and result.stdout.strip() \
        else int(time.time())


def git_commit():
    result = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"],
                            capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else ""


def build_environment(startdir, workdir, shims, arch, python_version, mtime):
    srcdir = workdir / "src"
    pkgbasedir = workdir / "pkg"
    env = {
        "PATH": f"{shims}:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": os.environ.get("HOME", "/root"),
        "LC_ALL": "C",
        "startdir": str(startdir),
        "srcdir": str(srcdir),
        "pkgbasedir": str(pkgbasedir),
        "CARCH": arch, "CBUILD": f"{arch}-alpine-linux-musl",
        "CHOST": f"{arch}-alpine-linux-musl",
        "SOURCE_DATE_EPOCH": str(mtime),
        "MKAPK_PYTHON_VERSION": python_version,
    }
    return env, srcdir, pkgbasedir


def make_packages(apkbuild, workdir, arch, python_version, mtime):
    """Run the APKBUILD; return its packages (main first) with their directories."""
    startdir = apkbuild.parent
    shims = workdir / "shims"
    make_shims(shims)
    env, srcdir, pkgbasedir = build_environment(startdir, workdir, shims, arch,
                                                python_version, mtime)
    top = read_apkbuild_vars(apkbuild, env)
    pkgname = top["pkgname"]
    env["pkgdir"] = str(pkgbasedir / pkgname)
    build_main_package(apkbuild, env, srcdir, pkgbasedir / pkgname)
    full_version = f"{top['pkgver']}-r{top['pkgrel']}"

    def package(name, values):
        scripts = scripts_for(name, top["install"], startdir)
        triggers, trigger = trigger_for(name, top["triggers"], startdir)
        if trigger:
            scripts[".trigger"] = trigger
        depends = values["depends"].split()
        if scripts and needs_bin_sh(scripts) and "/bin/sh" not in depends:
            depends.append("/bin/sh")
        return Package(name=name, directory=pkgbasedir / name, pkgver=full_version,
                       pkgdesc=values["pkgdesc"], url=top["url"],
                       arch=values["arch"] or top["arch"], license=top["license"],
                       origin=pkgname, depends=depends, provides=values["provides"].split(),
                       install_if=values["install_if"].split(),
                       replaces=values["replaces"].split(), scripts=scripts,
                       triggers=triggers)

    subs = [run_split_function(apkbuild, env, entry, pkgbasedir, startdir)
            for entry in top["subpackages"].split()]
    packages = [package(pkgname, top)] + [package(name, values) for name, values in subs]
    kept = []
    for pkg in packages:
        if not pkg.directory.is_dir():
            say(f"{pkg.name}: its split function left it empty, not built")
            continue
        add_traced_dependencies(pkg)
        kept.append(pkg)
    return kept


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--apkbuild", default=str(HERE / "chatmail-relay" / "APKBUILD"))
    parser.add_argument("--out", default=str(REPO / "dist" / "alpine"),
                        help="repository directory (default: dist/alpine)")
    parser.add_argument("--key", help="RSA private key (PEM); KEY.pub must be next to it")
    parser.add_argument("--arch", default=alpine_arch())
    parser.add_argument("--python-version", default="3.12",
                        help="Alpine's Python (3.12 in Alpine 3.20 to 3.23, 3.14 in 3.24)")
    parser.add_argument("--packager", default="chatmail-relay build <chatmail-relay@lists.chatmail.invalid>")
    parser.add_argument("--description", default="chatmail-relay")
    parser.add_argument("--keep-workdir", action="store_true")
    args = parser.parse_args(argv)
    # abuild builds under umask 022; the modes of what package() creates go into the
    # packages, and apk narrows a directory shared with other packages (/usr) to them.
    os.umask(0o022)

    apkbuild = Path(args.apkbuild).resolve()
    outdir = Path(args.out).resolve() / args.arch
    cache = Path(os.environ.get("CHATMAIL_BUILD_CACHE", DEFAULT_CACHE)) / "apk-key"
    key = ensure_key(args.key, cache)
    mtime = source_date_epoch()
    workdir = Path(tempfile.mkdtemp(prefix="mkapk-"))
    try:
        packages = make_packages(apkbuild, workdir, args.arch, args.python_version, mtime)
        outdir.mkdir(parents=True, exist_ok=True)
        ours = {p.name for p in packages}
        others = []
        for old in sorted(outdir.glob("*.apk")):
            if package_name_of(old) in ours:
                old.unlink()
            else:
                others.append(adopt_apk(old, key, mtime))
        maintainer, commit = maintainer_of(apkbuild), git_commit()
        builts = [write_apk(p, outdir, key, mtime, args.packager, maintainer, commit)
                  for p in packages]
        write_index(builts + others, outdir, args.arch, key, mtime, args.description)
        shutil.copy2(key[1], outdir.parent / key[1].name)
        say(f"public key {outdir.parent / key[1].name}")
    finally:
        if args.keep_workdir:
            say(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
