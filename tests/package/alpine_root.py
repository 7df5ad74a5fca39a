"""Alpine's own minirootfs (3.20.3, x86_64: busybox, musl, apk-tools 2.14.4), unpacked into
a directory and entered with chroot, so that the real apk-tools reads our packages and
Alpine's /bin/sh (busybox ash) runs our scripts.

The tarball beside this file is Alpine's release file, unchanged (from the branch v3.20 of
alpinelinux/docker-alpine on GitHub). It is kept in the repository because no Alpine
mirror is reachable from the machines that run these tests."""

import hashlib
import subprocess
from pathlib import Path

TARBALL = Path(__file__).with_name("alpine-minirootfs-3.20.3-x86_64.tar.gz")
TARBALL_SHA256 = "d4e6fd67dcf75e40c451560ac7265166c2b72a0f38ddc9aae756a7de3d1efa0c"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class AlpineRoot:
    """A minirootfs at PATH; paths given to run() are the ones seen inside."""

    def __init__(self, path):
        self.path = Path(path)

    def host_path(self, inside):
        return self.path / str(inside).lstrip("/")

    def run(self, *argv, env=None, stdin=None):
        return subprocess.run(["/usr/sbin/chroot", str(self.path), *argv], capture_output=True,
                              text=True, input=stdin, env={"PATH": PATH, **(env or {})})

    def apk(self, *args):
        return self.run("/sbin/apk", "--no-network", "--no-progress", *args)

    def add_dependency_users(self, postfix_vmail=True):
        """The users and groups the pre-install scripts of our dependencies create (apk
        installs dependencies first): opendkim's and postfix's, with busybox. Alpine's
        postfix also makes a vmail user for virtual mailboxes, in group postdrop (its
        postfix.pre-install, as aports keeps it), before ours could."""
        commands = [["addgroup", "-S", "opendkim"],
                    ["adduser", "-S", "-D", "-H", "-G", "opendkim", "opendkim"],
                    ["addgroup", "-S", "postfix"], ["addgroup", "-S", "postdrop"],
                    ["adduser", "-S", "-D", "-H", "-G", "postfix", "postfix"]]
        if postfix_vmail:
            commands.append(["adduser", "-S", "-D", "-H", "-h", "/var/mail/domains",
                             "-s", "/sbin/nologin", "-G", "postdrop", "vmail"])
        for argv in commands:
            result = self.run(*argv)
            assert result.returncode == 0, result.stderr


def unpack_minirootfs(directory):
    data = TARBALL.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    assert digest == TARBALL_SHA256, f"{TARBALL.name} changed: sha256 {digest}"
    Path(directory).mkdir(parents=True)
    subprocess.run(["tar", "-xzf", str(TARBALL), "-C", str(directory)], check=True)
    return AlpineRoot(directory)


class AlpineShell:
    """Runs scripts as Alpine would: /bin/sh is busybox ash, with busybox's commands.
    Files go under .dir (on this machine); inside() names them as the script sees them."""

    def __init__(self, root):
        self.root = root
        self.dir = root.host_path("/tmp/work")
        self.dir.mkdir()

    def inside(self, path):
        return "/" + str(Path(path).relative_to(self.root.path))

    def run(self, argv, env=None):
        return self.root.run(*argv, env=env)


class DebianShell:
    """Runs scripts with this machine's /bin/sh (dash on Debian), files under DIRECTORY."""

    def __init__(self, directory):
        self.dir = directory

    def inside(self, path):
        return str(path)

    def run(self, argv, env=None):
        return subprocess.run(argv, capture_output=True, text=True, env=env)
