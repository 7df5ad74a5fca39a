"""The signed apt repository `make build` writes to dist/repo, a suite for each Debian
release, and the keyring package that points apt at it: apt itself must accept it
(signature, indexes) with only the published key."""

import gzip
import hashlib
import subprocess

import pytest

from tests.conftest import REPO, host_suite
from tests.package.test_deb import contents, deb_named

DIST_REPO = REPO / "dist" / "repo"
SUITES = ["bookworm", "trixie"]
OURS = ("chatmail-relay", "python3-chatmaild", "chatmail-archive-keyring",
        "dovecot-chatmail-instant-idle")


@pytest.fixture(scope="module")
def repo():
    if not (DIST_REPO / "dists").is_dir():
        pytest.fail("no repository in dist/repo: run `make build` first")
    return DIST_REPO


def release_fields(repo, suite):
    text = (repo / "dists" / suite / "Release").read_text()
    return {line.split(":", 1)[0]: line.split(":", 1)[1].strip()
            for line in text.splitlines() if line and not line.startswith(" ")}


def test_one_suite_per_debian_release(repo):
    assert sorted(path.name for path in (repo / "dists").iterdir()) == sorted(SUITES)
    assert sorted(path.name for path in repo.glob("chatmail-relay-*.sources")) == \
        sorted(f"chatmail-relay-{suite}.sources" for suite in SUITES)


@pytest.mark.parametrize("suite", SUITES)
def test_release_names_our_origin_and_suite(repo, suite):
    fields = release_fields(repo, suite)
    assert fields["Origin"] == fields["Label"] == "chatmail-relay"
    assert fields["Suite"] == fields["Codename"] == suite
    assert fields["Components"] == "main"


@pytest.mark.parametrize("suite", SUITES)
def test_inrelease_is_signed_by_the_published_key(repo, suite):
    key = repo / "chatmail-archive-keyring.pgp"
    for signed in (["InRelease"], ["Release.gpg", "Release"]):
        result = subprocess.run(["gpgv", "--keyring", str(key),
                                 *[str(repo / "dists" / suite / name) for name in signed]],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("suite", SUITES)
def test_release_hashes_match_the_indexes(repo, suite):
    text = (repo / "dists" / suite / "Release").read_text()
    sha256 = text.split("SHA256:\n", 1)[1]
    checked = 0
    for line in sha256.splitlines():
        if not line.startswith(" "):
            break
        digest, size, name = line.split()
        data = (repo / "dists" / suite / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest and len(data) == int(size), name
        checked += 1
    assert checked >= 2  # Packages and Packages.gz


def suite_packages(repo, suite):
    """{package: version} of SUITE's index; each names a file that is there."""
    [index] = repo.glob(f"dists/{suite}/main/binary-*/Packages.gz")
    stanzas = gzip.decompress(index.read_bytes()).decode().split("\n\n")
    versions = {}
    for stanza in filter(None, stanzas):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line)
        versions[fields["Package"]] = fields["Version"]
        assert (repo / fields["Filename"]).is_file()
        assert fields["Filename"].startswith(f"pool/{suite}/")
    return versions


@pytest.mark.parametrize("suite", SUITES)
def test_each_suite_has_ours_built_there_and_no_dovecot(repo, suite):
    """Dovecot comes from Debian: the instant-IDLE plugin, built for that release's
    Dovecot ABI, replaced our rebuild of it."""
    versions = suite_packages(repo, suite)
    assert set(versions) == set(OURS), versions
    release = {"bookworm": "+deb12", "trixie": "+deb13"}[suite]
    assert versions["dovecot-chatmail-instant-idle"].endswith(release)


@pytest.mark.parametrize("suite", SUITES)
def test_each_suites_keyring_names_its_suite(repo, suite):
    """chatmail-archive-keyring writes the .sources file of the release it was built for."""
    [deb] = repo.glob(f"pool/{suite}/main/chatmail-archive-keyring_*.deb")
    shipped = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True,
                             check=True).stdout
    sources = subprocess.run(
        ["tar", "-xOf", "-", "./usr/share/chatmail-archive-keyring/chatmail-relay.sources"],
        input=shipped, capture_output=True, check=True).stdout.decode()
    assert f"Suites: {suite}\n" in sources
    assert sources == (repo / f"chatmail-relay-{suite}.sources").read_text()


def test_apt_accepts_the_repository(repo, tmp_path):
    """apt update with the published .sources file of this machine's release (its URL
    pointed at dist/repo) and the published key, in an apt configuration of its own."""
    sources = (repo / f"chatmail-relay-{host_suite()}.sources").read_text()
    assert "Signed-By: /usr/share/keyrings/chatmail-archive-keyring.pgp" in sources
    sources = sources.replace("/usr/share/keyrings/chatmail-archive-keyring.pgp",
                              str(repo / "chatmail-archive-keyring.pgp"))
    sources = "\n".join(f"URIs: file://{repo}" if line.startswith("URIs:") else line
                        for line in sources.splitlines())
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "chatmail-relay.sources").write_text(sources + "\n")
    (tmp_path / "lists" / "partial").mkdir(parents=True)
    options = ["-o", f"Dir::Etc::SourceList={tmp_path}/none",
               "-o", f"Dir::Etc::SourceParts={tmp_path}/sources.list.d",
               "-o", f"Dir::State::Lists={tmp_path}/lists",
               "-o", f"Dir::Cache={tmp_path}/cache", "-o", "Debug::NoLocking=1",
               "-o", "APT::Sandbox::User=root"]
    update = subprocess.run(["apt-get", *options, "update"], capture_output=True, text=True)
    assert update.returncode == 0 and "W:" not in update.stdout + update.stderr, \
        update.stdout + update.stderr
    policy = subprocess.run(["apt-cache", *options, "policy", "chatmail-relay"],
                            capture_output=True, text=True, check=True).stdout
    assert f"file:{repo} {host_suite()}/main" in policy, policy


def test_keyring_package_carries_the_repository_key_and_apt_configuration(repo):
    deb = deb_named("chatmail-archive-keyring")
    files = contents(deb)
    assert "/usr/share/keyrings/chatmail-archive-keyring.pgp" in files
    assert "/etc/apt/apt.conf.d/51chatmail-relay-unattended-upgrades" in files
    assert "/usr/share/chatmail-archive-keyring/chatmail-relay.pref" in files
    assert "/usr/share/chatmail-archive-keyring/chatmail-relay.sources" in files
    shipped = subprocess.run(
        ["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    extracted = subprocess.run(
        ["tar", "-xOf", "-", "./usr/share/keyrings/chatmail-archive-keyring.pgp"],
        input=shipped, capture_output=True, check=True).stdout
    assert extracted == (repo / "chatmail-archive-keyring.pgp").read_bytes()
