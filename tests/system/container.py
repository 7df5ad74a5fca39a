"""A throw-away Debian with a real systemd, booted with systemd-nspawn (see
../shared/spec/testing.md): an overlay on the cached root file system (rootfs.sh), its own
network namespace with only loopback, our signed repository (dist/repo) published at
file:///srv/chatmail-relay, the address chatmail-archive-keyring's .sources file names,
and a stand-in for Debian's archive with Debian's Dovecot (repos.debian_stand_in)."""

import os
import shutil
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


DELTACHAT_VERSION = "2.65.0"
# A documentation-range address inside the container's own network namespace, standing in
# for a server's public address: coturn refuses to run with loopback addresses only.
PUBLIC_ADDRESS = ("ip link add public0 type veth peer name public1 "
                  "&& ip addr add 192.0.2.10/24 dev public0 && ip link set public1 up "
                  "&& ip link set public0 up")


def deltachat_venv():
    """A virtualenv with PyPI's deltachat-rpc-server (the core the apps use) and
    deltachat-rpc-client, made with Debian's python3, so that mounted at the same path it
    runs inside the container too. Cached outside the checkout, keyed by the version."""
    cache = Path(os.environ.get("CHATMAIL_TEST_CACHE", "/var/cache/chatmail-relay-test"))
    venv = cache / f"deltachat-venv-{DELTACHAT_VERSION}"
    done = venv / ".complete"
    if not done.exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet",
                        f"deltachat-rpc-server=={DELTACHAT_VERSION}",
                        f"deltachat-rpc-client=={DELTACHAT_VERSION}"], check=True)
        done.touch()
    return venv


def build_rootfs(suite="bookworm"):
    out = subprocess.run([str(HERE / "rootfs.sh"), suite], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"rootfs.sh failed:\n{out.stderr}")
    return Path(out.stdout.strip().splitlines()[-1])


REPO_MOUNT = "/srv/chatmail-relay"


class Container:
    def __init__(self, name, rootfs, workdir, binds=(), private_network=True,
                 repos=None, netns=None, resolv_conf=None, suite="bookworm"):
        """`binds`: (host path, container path) pairs mounted read-only. `repos`: container
        path -> host directory of an apt repository, published there (a copy, so publish()
        can replace it while the container runs); default: dist/repo at REPO_MOUNT and,
        configured in apt, the stand-in for Debian's archive of `suite` (the rootfs's
        release) with Debian's Dovecot (its version in .dovecot_version).
        private_network=False shares the host's network (for the demo). `netns`: boot in
        the existing network namespace /run/netns/<netns> instead (internet.py), with
        `resolv_conf` (text) as /etc/resolv.conf."""
        self.name = name
        self.binds = list(binds)
        self.suite = suite
        self.repos = None if repos is None else dict(repos)
        self.dovecot_version = None
        self.private_network = private_network
        self.netns = netns
        self.resolv_conf = resolv_conf
        self.rootfs = Path(rootfs)
        self.workdir = Path(workdir)
        self.root = self.workdir / "root"
        self.nspawn = None
        self.leader = None

    # -- lifecycle ------------------------------------------------------------------

    def boot(self, timeout=180):
        for sub in ("upper", "work", "root"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={self.rootfs},upperdir={self.workdir}/upper,"
                        f"workdir={self.workdir}/work", str(self.root)], check=True)
        (self.root / "etc/hostname").write_text(self.name + "\n")
        if self.resolv_conf is not None:
            (self.root / "etc/resolv.conf").unlink(missing_ok=True)
            (self.root / "etc/resolv.conf").write_text(self.resolv_conf)
        debian_stand_in = self.repos is None
        if debian_stand_in:
            self.repos = self._default_repos()
        for inside, source in self.repos.items():
            self.publish(inside, source)
        Path("/run/systemd/nspawn").mkdir(parents=True, exist_ok=True)
        self.log = open(self.workdir / "console.log", "wb")
        self.nspawn = subprocess.Popen(
            ["systemd-nspawn", "-D", str(self.root), "-b", "--register=no", "--keep-unit",
             f"--machine={self.name}",
             *([f"--network-namespace-path=/run/netns/{self.netns}"] if self.netns
               else ["--private-network"] if self.private_network else []),
             *(["--resolv-conf=off"] if self.resolv_conf is not None else []),
             *[f"--bind-ro={self._published(inside)}:{inside}" for inside in self.repos],
             *[f"--bind-ro={host}:{inside}" for host, inside in self.binds]],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.leader = self._wait_for_leader(timeout)
        self._wait_until_running(timeout)
        if self.private_network and not self.netns:
            self.run(PUBLIC_ADDRESS)
        if debian_stand_in:
            from .repos import DEBIAN_MOUNT, stand_in_sources

            self.run(stand_in_sources("debian-stand-in", DEBIAN_MOUNT, self.suite))

    def _default_repos(self):
        from .repos import DEBIAN_MOUNT, debian_stand_in

        debian, self.dovecot_version = debian_stand_in(self.workdir / "debian", self.suite)
        return {REPO_MOUNT: REPO / "dist" / "repo", DEBIAN_MOUNT: debian}

    def _wait_for_leader(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise RuntimeError(f"nspawn exited: {self.console()}")
            children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children")
            pids = children.read_text().split() if children.exists() else []
            # nspawn's first child may be its short-lived helper, which forks the
            # container's init and exits: entering the helper's namespaces fails for good
            for pid in pids:
                if self._command_name(pid) == "systemd":
                    return int(pid)
            time.sleep(0.1)
        raise RuntimeError("the container's init did not start")

    @staticmethod
    def _command_name(pid):
        try:
            return Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:  # gone already
            return None

    def _wait_until_running(self, timeout):
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.run("systemctl is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.3)
        raise RuntimeError(f"systemd did not come up (state {state!r}):\n{self.console()}")

    def _published(self, inside):
        return self.workdir / "published" / inside.strip("/").replace("/", "_")

    def publish(self, inside, source):
        """Make the repository at `source` what the container sees at `inside`, as when a
        repository's publisher uploads a new version."""
        if not (Path(source) / "dists").is_dir():
            raise RuntimeError(f"no apt repository in {source}: run `make build`")
        target = self._published(inside)
        target.mkdir(parents=True, exist_ok=True)
        for old in target.iterdir():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        for item in Path(source).iterdir():
            copy = shutil.copytree if item.is_dir() else shutil.copy2
            copy(item, target / item.name)

    def stop(self):
        if self.nspawn and self.nspawn.poll() is None:
            self.nspawn.terminate()  # nspawn shuts the container down on SIGTERM
            try:
                self.nspawn.wait(30)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait()
        if os.path.ismount(self.root):
            subprocess.run(["umount", "-l", str(self.root)], check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def console(self):
        return (self.workdir / "console.log").read_text(errors="replace")[-3000:]

    # -- commands inside ----------------------------------------------------------

    def run(self, command, check=True, input=None, timeout=600, env=None):
        """Run a shell command inside the container (all its namespaces)."""
        full_env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}
        full_env.update(env or {})
        result = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", "env", "-i",
             *[f"{k}={v}" for k, v in full_env.items()], "sh", "-c", command],
            input=input, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode:
            raise AssertionError(f"`{command}` exited {result.returncode}:\n"
                                 f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        return result

    def python(self, code, check=True, timeout=120):
        """Run Python code inside the container (Debian's python3)."""
        return self.run("python3 -", input=code, check=check, timeout=timeout)
