"""apt repositories for the system tests, signed with the same key as dist/repo (made by
repo/build-repo.sh): variants of ours, and a stand-in for Debian's security archive.

    python3 -m tests.system.repos previous-dovecot OUTDIR     (make build-previous)

writes the previous release's Dovecot packages into OUTDIR (previous_release_dovecot)."""

import functools
import os
import platform
import subprocess
import sys
import threading
from pathlib import Path

from .container import REPO

CACHE = Path(os.environ.get("CHATMAIL_TEST_CACHE", "/var/cache/chatmail-relay-test"))
DOVECOT_PACKAGES = ("dovecot-core", "dovecot-imapd", "dovecot-lmtpd")
# Where a container finds its stand-in for Debian's archive (Debian's own Dovecot).
DEBIAN_MOUNT = "/srv/debian-stand-in"
# What the relay needs of Dovecot on each release (Debian 13: the Lua passdb, and
# dovecot-sieve, which Debian 13's dovecot-core recommends).
DEBIAN_DOVECOT = {"bookworm": DOVECOT_PACKAGES,
                  "trixie": (*DOVECOT_PACKAGES, "dovecot-auth-lua", "dovecot-sieve")}
HOST_SUITE = platform.freedesktop_os_release().get("VERSION_CODENAME")
# The version our earlier releases gave their rebuild of Debian's Dovecot (Debian's plus
# this), and the suffix of the previous release's build (make build-previous).
CHATMAIL_DOVECOT_SUFFIX = "+chatmail1"
PREVIOUS_SUFFIX = "~previous"
# Where upstream's Dovecot 2.3.21 build sorts (1:2.3.21+dfsg1-3: above every Debian 12
# version, below Debian 13's), marked as the tests' stand-in for it, and its ABI.
CMDEPLOY_DOVECOT_VERSION = "1:2.3.21+dfsg1-3~chatmail-test"
CMDEPLOY_DOVECOT_ABI = "abiv21"


def build_repo(directory, debs, **release):
    """A signed repository of `debs` in `directory`; `release` may set origin, label and
    suite (default: ours)."""
    env = dict(os.environ, **{f"REPO_{key.upper()}": value for key, value in release.items()})
    subprocess.run([str(REPO / "repo" / "build-repo.sh"), "repo", str(directory),
                    *map(str, debs)], check=True, env=env, capture_output=True)
    return Path(directory)


def package_without_files(directory, name, version):
    """An empty arch-all package, to offer under another package's name."""
    tree = Path(directory) / f"{name}-tree"
    (tree / "DEBIAN").mkdir(parents=True, exist_ok=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: all\n"
        "Maintainer: chatmail-relay tests <relay@chatmail.invalid>\n"
        "Description: stray package offered by a repository\n")
    deb = Path(directory) / f"{name}_{version.replace(':', '%3a')}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(deb)],
                   check=True, capture_output=True)
    return deb


def newest_debian_version(package):
    """The newest version of `package` Debian's archive offers this host."""
    out = subprocess.run(["apt-cache", "madison", package], capture_output=True, text=True,
                         check=True).stdout
    versions = [line.split("|")[1].strip() for line in out.splitlines()
                if "+chatmail" not in line]
    return max(versions, key=VersionKey)


class VersionKey:
    def __init__(self, version):
        self.version = version

    def __lt__(self, other):
        return subprocess.run(["dpkg", "--compare-versions", self.version, "lt",
                               other.version]).returncode == 0


def download_once(name, packages, version, apt_options=()):
    """`packages` at `version` from Debian, downloaded once into the cache folder `name`
    (apt_options: another release's apt lists); their .debs."""
    cache = CACHE / f"{name}-{version.replace(':', '_')}"
    if not (cache / ".complete").exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", *apt_options, "download", "-q",
                        *[f"{package}={version}" for package in packages]],
                       cwd=cache, check=True, capture_output=True)
        (cache / ".complete").touch()
    return sorted(cache.glob("*.deb"))


def debian_dovecot_debs(version):
    """Debian's own dovecot packages of `version`, downloaded once into the cache."""
    return download_once("debian-dovecot", DOVECOT_PACKAGES, version)


def stand_in_sources(name, mount, suite):
    """The shell command that makes a container's apt use the repository published at
    `mount` (signed with our test key) for `suite`."""
    return f"""cat >/etc/apt/sources.list.d/{name}.sources <<EOF
Types: deb
URIs: file://{mount}
Suites: {suite}
Components: main
Signed-By: {mount}/chatmail-archive-keyring.pgp
EOF"""


def debian_security_dovecot(directory, ours):
    """A stand-in for Debian's security archive (its origin, label and suite, so Debian's
    unattended-upgrades configuration accepts it) holding Debian's newest dovecot. When
    Debian has none newer than `ours`, its newest is offered under a version above ours,
    as the next security update would be. Returns (repository, the version offered)."""
    with _one_at_a_time:  # the download and the signature (a container may be booting)
        version = newest_debian_version("dovecot-core")
        debs = debian_dovecot_debs(version)
        newer = subprocess.run(["dpkg", "--compare-versions", version, "gt", ours]
                               ).returncode == 0
        if not newer:
            # V+security1 sorts above our V+chatmail<N>, and above Debian's V
            subprocess.run([str(REPO / "dovecot" / "repack-version.sh"), "+security1",
                            f"{directory}/security-debs", *map(str, debs)], check=True)
            debs = sorted(Path(directory, "security-debs").glob("*.deb"))
            version += "+security1"
        repo = build_repo(Path(directory) / "security", debs, origin="Debian",
                          label="Debian-Security", suite="bookworm-security")
    return repo, version


def release_apt_options(suite):
    """apt options that make apt-get on this host see Debian's archive of `suite` (and its
    security suite) through apt lists of our own, updated now; the host's apt
    configuration stays untouched."""
    apt_dir = CACHE / f"apt-{suite}"
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    (apt_dir / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (apt_dir / "sources.list").write_text(
        f"deb [signed-by={keyring}] http://deb.debian.org/debian {suite} main\n"
        f"deb [signed-by={keyring}] http://deb.debian.org/debian-security {suite}-security main\n")
    options = [f"-oDir::Etc::SourceList={apt_dir}/sources.list",
               "-oDir::Etc::SourceParts=/dev/null", f"-oDir::State::Lists={apt_dir}/lists",
               f"-oDir::Cache={apt_dir}/cache", "-oDir::State::status=/dev/null"]
    subprocess.run(["apt-get", *options, "update", "-qq"], check=True, capture_output=True)
    return options


def debian_release_dovecot(suite, packages):
    """Debian's own `packages` (newest in `suite` and its security suite) for another
    Debian release than this host's, downloaded once into the cache through apt lists of
    our own (the host's apt configuration stays untouched)."""
    options = release_apt_options(suite)
    policy = subprocess.run(["apt-cache", *options, "policy", packages[0]], check=True,
                            capture_output=True, text=True).stdout
    version = policy.split("Candidate:")[1].split()[0]
    return version, download_once(f"debian-dovecot-{suite}", packages, version, options)


# Containers boot in threads (conftest.started_together): one download into the shared
# cache, and one signature with the shared gpg home, at a time.
_one_at_a_time = threading.Lock()


@functools.cache
def debian_dovecot_of(suite):
    """(version, .debs) of Debian's newest Dovecot for `suite`, looked up once a run."""
    packages = DEBIAN_DOVECOT[suite]
    if suite == HOST_SUITE:
        version = newest_debian_version(packages[0])
        return version, debian_dovecot_debs(version)
    return debian_release_dovecot(suite, packages)


def debian_stand_in(directory, suite):
    """A stand-in for Debian's archive of `suite` (its origin, label and suite) holding
    Debian's own newest Dovecot, the one a fresh server installs with the relay: the
    containers reach no archive. Returns (repository, Dovecot's version)."""
    with _one_at_a_time:
        version, debs = debian_dovecot_of(suite)
        repo = build_repo(directory, debs, origin="Debian", label="Debian", suite=suite)
    return repo, version


def cmdeploy_dovecot(outdir):
    """Stand-ins for the Dovecot .debs upstream's cmdeploy downloads and installs with
    dpkg (chatmail/relay, cmdeploy/src/cmdeploy/dovecot/deployer.py): its build of
    Debian's packaging of Dovecot 2.3.21 (github.com/chatmail/dovecot), version
    1:2.3.21+dfsg1-3, which provides dovecot-abi-2.3.abiv21, not Debian 12's abiv19 that
    our plugin depends on. apt's choices (keep it, refuse the plugin, downgrade on
    request) depend on those control fields only, so Debian 12's own packages stand in,
    repacked under CMDEPLOY_DOVECOT_VERSION and that ABI. Returns the .debs in outdir."""
    with _one_at_a_time:
        _, debs = debian_dovecot_of("bookworm")
    subprocess.run([str(REPO / "dovecot" / "repack-version.sh"), "-a", CMDEPLOY_DOVECOT_ABI,
                    CMDEPLOY_DOVECOT_VERSION, str(outdir), *map(str, debs)], check=True)
    return sorted(Path(outdir).glob("*.deb"))


def previous_release_dovecot(outdir):
    """The Dovecot packages of the previous release's repository (make build-previous):
    it shipped our rebuild of Debian 12's Dovecot with the instant-IDLE patch, versioned
    Debian's plus "+chatmail1". What an upgrade does with them (apt's choice between
    them, Debian's security update and the plugin; `chatmail status` naming the build)
    depends on their names and versions, not on the patch inside, so Debian's own newest
    packages stand in for that build under its version (and "~previous"), instead of a
    30-minute rebuild."""
    _, debs = debian_dovecot_of("bookworm")
    subprocess.run([str(REPO / "dovecot" / "repack-version.sh"),
                    CHATMAIL_DOVECOT_SUFFIX + PREVIOUS_SUFFIX, str(outdir), *map(str, debs)],
                   check=True)


def main(argv):
    if len(argv) != 2 or argv[0] != "previous-dovecot":
        print("usage: python3 -m tests.system.repos previous-dovecot OUTDIR", file=sys.stderr)
        return 2
    previous_release_dovecot(argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
