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

Each package and the index are written as apk-tools 2 reads them by alpine/apkformat.py.

The repository goes to OUT/<arch>/ (noarch packages too, as abuild does):
*.apk, APKINDEX.tar.gz (DESCRIPTION + APKINDEX, signed the same way), and the public
key OUT/<key name>, which admins copy to /etc/apk/keys/.

Packages of other names already in OUT/<arch>/ (the instant-IDLE plugin, built by abuild
on Alpine from alpine/dovecot-chatmail-instant-idle/APKBUILD) stay: they are signed again
with the repository's key and indexed with ours. Older versions of our own packages are
removed.

Without --key a throw-away RSA key is made once and kept outside the checkout in
/var/cache/chatmail-relay-build/apk-key/ ($CHATMAIL_BUILD_CACHE), so repeated builds
verify with the same public key.
"""

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# beside this script (run as a script, its directory is on sys.path)
from apkformat import (
    Package,
    adopt_apk,
    ensure_key,
    package_name_of,
    say,
    write_apk,
    write_index,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SCRIPT_TYPES = ["pre-install", "post-install", "pre-upgrade", "post-upgrade",
                "pre-deinstall", "post-deinstall"]
APKBUILD_VARS = ["pkgname", "pkgver", "pkgrel", "pkgdesc", "url", "arch", "license",
                 "depends", "provides", "install_if", "install", "subpackages", "source",
                 "replaces", "triggers"]
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
