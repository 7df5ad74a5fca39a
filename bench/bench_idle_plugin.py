"""IDLE wake-up after an LMTP delivery with the host's stock Dovecot, without and with the
chatmail instant-IDLE plugin (dovecot/plugin/), side by side in one run: two private
Dovecot instances (temporary directory, loopback ports, LMTP on a unix socket, no
systemd), samples interleaved. Measures

- IDLE: a client that IDLEs for a moment (not hibernated): time from the end of each
  LMTP delivery (Dovecot's reply to DATA) to the client's EXISTS;
- hibernated: clients that IDLE longer than imap_hibernate_timeout (set to 2 s here), so
  imap-hibernate holds them; same measurement;
- CPU time (user+system) of the non-hibernated client's imap process over its deliveries;
- each instance's log: no error, warning, panic or fatal line.

Needs root (Dovecot's master), dovecot-core, -imapd, -lmtpd, dovecot-dev (the plugin is
built in the temporary directory) and the user vmail. Installs nothing, touches no host
configuration, stops its Dovecots and removes its files when done.

Usage: bench_idle_plugin.py [--relay] [IDLE_SAMPLES [HIBERNATED_ROUNDS [CLIENTS_PER_ROUND]]]
(defaults 200 25 8). Without --relay: a minimal configuration, with and without TLS
(four instances), results/idle-plugin.md. With --relay: the relay's own Dovecot
configuration (conf/dovecot, run as tests/config/test_dovecot.py runs it, with its
doveauth, chatmail-metadata and lastlogin services), results/idle-plugin-relay.md."""

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_facts, percentile  # noqa: E402
from idle_meter import lmtp_deliver  # noqa: E402
from relay_meter import Imap  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PLUGIN_SRC = REPO / "dovecot" / "plugin"
PLUGIN_SO = "lib20_chatmail_instant_idle_plugin.so"
RESULTS = HERE / "results" / "idle-plugin.md"
RESULTS_RELAY = HERE / "results" / "idle-plugin-relay.md"
RESULTS_RELAY_24 = HERE / "results" / "idle-plugin-relay-dovecot24.md"
HIBERNATE_SECS = 2
PASSWORD = "bench-password"
TIMEOUT = 10  # seconds for any one network step
IDLE_USER = "idlebench"  # 9 characters: the relay's doveauth takes only those


def hib_user(number):
    return f"hibern{number:03d}"
DEADLINE = 20 * 60  # the whole run


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid):
    """Time the process has run on a CPU, from the scheduler (exact, not tick-sampled
    as utime/stime are)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


class Dovecot:
    """One private Dovecot instance: its own base_dir, ports, log, mail, users."""

    def __init__(self, label, plugin_dir=None, tls=False):
        self.label, self.tls = label, tls
        self.root = Path(tempfile.mkdtemp(prefix=f"idlp-{label}-", dir="/tmp"))
        self.root.chmod(0o755)
        self.port = free_port()
        ssl_settings = "ssl = no\n"
        imaps_port = 0
        if tls:  # as the relay: TLS 1.3 on the imaps port, handled by imap-login
            tls_dir = self.root / "tls"
            tls_dir.mkdir()
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                            "-days", "2", "-subj", "/CN=localhost",
                            "-keyout", tls_dir / "key.pem", "-out", tls_dir / "cert.pem"],
                           check=True, capture_output=True)
            ssl_settings = (f"ssl = required\nssl_cert = <{tls_dir}/cert.pem\n"
                            f"ssl_key = <{tls_dir}/key.pem\nssl_min_protocol = TLSv1.3\n")
            imaps_port, self.port = self.port, free_port()
        self.connect_port = imaps_port or self.port
        mail = self.root / "mail"
        mail.mkdir()
        shutil.chown(mail, "vmail", "vmail")
        self.log = self.root / "dovecot.log"
        self.lmtp_path = self.root / "run" / "lmtp"
        self.domain = ""
        plugin = ""
        if plugin_dir:
            plugin = ("mail_plugin_dir = %s\n"
                      "protocol imap {\n  mail_plugins = $mail_plugins chatmail_instant_idle\n}\n"
                      % plugin_dir)
        r = self.root
        (r / "dovecot.conf").write_text(f"""\
protocols = imap lmtp
base_dir = {r}/run
state_dir = {r}/state
instance_name = idle-plugin-bench-{label}
log_path = {self.log}
listen = 127.0.0.1
{ssl_settings}disable_plaintext_auth = no
auth_mechanisms = plain
passdb {{
  driver = static
  args = password={PASSWORD}
}}
userdb {{
  driver = static
  args = uid=vmail gid=vmail home={r}/mail/%u
}}
first_valid_uid = 100
mail_location = maildir:~/Maildir
protocol lmtp {{
  mail_fsync = never
}}
imap_hibernate_timeout = {HIBERNATE_SECS}s
log_debug = event=imap_client_hibernated OR event=imap_client_unhibernated
service imap-login {{
  inet_listener imap {{
    port = {self.port}
  }}
  inet_listener imaps {{
    port = {imaps_port}
  }}
}}
service imap {{
  unix_listener imap-master {{
    user = $default_internal_user
  }}
  extra_groups = $default_internal_group
}}
service imap-hibernate {{
  unix_listener imap-hibernate {{
    mode = 0660
    group = $default_internal_group
  }}
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0666
  }}
}}
service stats {{
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
{plugin}""")
        self.process = None

    def start(self):
        conf = self.root / "dovecot.conf"
        check = subprocess.run(["doveconf", "-c", conf, "-n"], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(check.stderr)
        self.process = subprocess.Popen(["dovecot", "-F", "-c", conf],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.accepts() and self.lmtp_path.exists():
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.label}: dovecot exited: {self.log_text()}")
            time.sleep(0.05)
        raise RuntimeError(f"{self.label}: dovecot did not start")

    def accepts(self):
        try:
            socket.create_connection(("127.0.0.1", self.connect_port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_text(self):
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def problems(self):
        return [line for line in self.log_text().splitlines()
                if any(word in line for word in ("Error:", "Warning:", "Panic:", "Fatal:"))]

    def count(self, needle):
        return self.log_text().count(needle)

    def imap_pids(self):
        """pids of this instance's imap processes (children of its master)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if comm == "imap" and ppid == self.process.pid:
                pids.append(int(entry.name))
        return pids

    def address(self, user):
        return f"{user}@{self.domain}" if self.domain else user

    def create_account(self, user):
        """Nothing to do: the static userdb knows every user."""

    def deliver(self, user, number):
        """One message over LMTP; returns time.monotonic() at Dovecot's reply to DATA."""
        return lmtp_deliver(self.address(user), number, self.lmtp_path, TIMEOUT)


class RelayDovecot(Dovecot):
    """The relay's own Dovecot configuration, rendered and run as tests/config's live
    tests run it (TLS 1.3, doveauth, chatmail-metadata and lastlogin behind it, quota,
    zlib, last_login, push notifications), with imap_hibernate_timeout shortened."""

    def __init__(self, label, push, plugin_dir=None, extra=""):
        """extra: more configuration, appended to the instance's (bench/check_*.py)."""
        sys.path.insert(0, str(REPO))
        from tests.config import test_dovecot as live

        class BenchRelay(live.LiveRelay):
            def instance_overrides(self):
                return super().instance_overrides() + (
                    f"imap_hibernate_timeout = {HIBERNATE_SECS}s\n"
                    "log_debug = event=imap_client_hibernated OR "
                    "event=imap_client_unhibernated\n") + extra

        live.ensure_vmail_user()
        self.label, self.tls = label, True
        self.relay = BenchRelay({"mail_domain": "chat.example.org"}, push)
        self.root = self.relay.root
        self.log = self.root / "dovecot.log"
        self.lmtp_path = Path(self.relay.path("/var/spool/postfix/private/dovecot-lmtp"))
        self.domain = self.relay.domain
        self.connect_port = self.relay.imaps_port
        self.process = None
        if plugin_dir:
            # the relay's imap plugins plus ours, from a directory with all of them
            for module in Path("/usr/lib/dovecot/modules").glob("*.so"):
                (Path(plugin_dir) / module.name).symlink_to(module)
            conf = Path(self.relay.path(live.MAIN))
            if self.relay.platform.dovecot_version == "2.4":  # a boolean list adds
                stanza = ("protocol imap {\n  mail_plugins {\n"
                          "    chatmail_instant_idle = yes\n  }\n}\n")
            else:
                plugins = subprocess.run(
                    ["doveconf", "-c", conf, "-f", "protocol=imap", "-h", "mail_plugins"],
                    capture_output=True, text=True, check=True).stdout.strip()
                stanza = (f"protocol imap {{\n"
                          f"  mail_plugins = {plugins} chatmail_instant_idle\n}}\n")
            with conf.open("a") as out:
                out.write(f"mail_plugin_dir = {plugin_dir}\n{stanza}")

    def start(self):
        self.relay.start()
        self.process = self.relay.dovecot

    def stop(self):
        if getattr(self.relay, "dovecot", None) is not None:
            self.relay.stop()

    def create_account(self, user):
        """doveauth creates an account at its first login."""
        imap_client(self, user).close()


def build_plugin(target, source=PLUGIN_SRC):
    """The instant-IDLE plugin built from `source` (default dovecot/plugin/) against the
    host's dovecot-dev, as the file `target`; returns `target` (the bench/check_*.py
    experiments build it too)."""
    subprocess.run(["make", "-s", "-C", source, f"PLUGIN={target}"], check=True)
    return target


def imap_client(dovecot, user):
    """relay_meter's IMAP client (LOGIN, SELECT INBOX, IDLE/DONE, waits for EXISTS) on
    `dovecot`'s port, with TLS when it has TLS; client.user is `user`."""
    client = Imap(dovecot.address(user), PASSWORD, dovecot.connect_port, dovecot.tls, TIMEOUT)
    client.user = user
    return client


def wakeup(dovecot, client, number):
    delivered = dovecot.deliver(client.user, number)
    return client.exists_at() - delivered


def measure_idle(instances, samples, started):
    """Interleaved: each sample once per instance, the order shuffled per sample."""
    for d in instances:
        d.create_account(IDLE_USER)
    clients = {d.label: imap_client(d, IDLE_USER) for d in instances}
    for d in instances:  # warm-up: the first delivery creates the maildir files
        clients[d.label].idle()
        wakeup(d, clients[d.label], 0)
        clients[d.label].done()
    pids = {d.label: d.imap_pids() for d in instances}
    cpu_before = {label: sum(map(cpu_seconds, p)) for label, p in pids.items()}
    times = {d.label: [] for d in instances}
    for number in range(1, samples + 1):
        if time.monotonic() - started > DEADLINE:
            raise RuntimeError("deadline")
        for d in random.sample(instances, len(instances)):
            client = clients[d.label]
            client.idle()
            times[d.label].append(wakeup(d, client, number))
            client.done()
    cpu = {label: sum(map(cpu_seconds, p)) - cpu_before[label] for label, p in pids.items()}
    for client in clients.values():
        client.close()
    return times, cpu, {label: len(p) for label, p in pids.items()}


def measure_hibernated(instances, rounds, per_round, started):
    """Per round: every client IDLEs, all wait past imap_hibernate_timeout, then each
    gets one delivery (instances interleaved) and ends its IDLE."""
    for d in instances:  # create the maildirs' files outside the measurement, and
        for i in range(per_round):  # before SELECT (else IDLE reports them at once)
            d.create_account(hib_user(i))
            d.deliver(hib_user(i), 0)
    clients = {d.label: [imap_client(d, hib_user(i)) for i in range(per_round)]
               for d in instances}
    times = {d.label: [] for d in instances}
    hibernated = {d.label: 0 for d in instances}
    for number in range(1, rounds + 1):
        if time.monotonic() - started > DEADLINE:
            raise RuntimeError("deadline")
        before = {d.label: d.count("Successfully hibernated") for d in instances}
        for d in instances:
            for client in clients[d.label]:
                client.idle()
        time.sleep(HIBERNATE_SECS + 1.5)
        for d in instances:
            hibernated[d.label] += d.count("Successfully hibernated") - before[d.label]
        for i in range(per_round):
            for d in random.sample(instances, len(instances)):
                client = clients[d.label][i]
                times[d.label].append(wakeup(d, client, number))
        for d in instances:
            for client in clients[d.label]:
                client.done()
    for d in instances:
        for client in clients[d.label]:
            client.close()
    return times, hibernated


def ms(seconds):
    return f"{seconds * 1000:.1f} ms"


def summary(values):
    return (f"{len(values)} | {ms(percentile(values, 0.5))} | {ms(percentile(values, 0.95))}"
            f" | {ms(min(values))} | {ms(max(values))}")


def dovecot_version():
    version = subprocess.run(["dovecot", "--version"], capture_output=True,
                             text=True).stdout.strip()
    package = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "dovecot-core"],
                             capture_output=True, text=True).stdout.strip()
    return version, package


STANDALONE = (
    "two private instances side by side (own base_dir, loopback ports, LMTP on a unix "
    "socket, Maildir, static passdb/userdb): `stock`, and `plugin` with "
    "`mail_plugins = $mail_plugins chatmail_instant_idle` for imap "
    "(dovecot/plugin/, built against the host's dovecot-dev); IMAP without TLS, and "
    "`-tls`: TLS 1.3 on the imaps port as on the relay (imap-login terminates TLS and "
    "relays the session to the imap process)")
RELAY = (
    "the relay's own configuration (conf/dovecot, rendered for `chat.example.org` and run "
    "as tests/config/test_dovecot.py runs it: TLS 1.3, doveauth, chatmail-metadata and "
    "lastlogin as services, quota, zlib, last_login, push notifications), twice side by "
    "side: `relay-stock`, and `relay-plugin` with `chatmail_instant_idle` added to the "
    "imap plugins")


def write_results(command, setup, facts, version, args, idle, cpu, hib, hibernated,
                  problems, unhibernated):
    samples, rounds, per_round = args
    lines = [
        "# IDLE wake-up: Debian's Dovecot with and without the instant-IDLE plugin",
        "",
        f"Measured by `{command}` on {facts['date']}.",
        "",
        f"- machine: {facts['nproc']} CPUs ({facts['cpu']}), {facts['memory']}, "
        f"Linux {facts['kernel']}, {facts['os']}",
        f"- dovecot: {version[0]}, Debian package `{version[1]}` (Debian's build, unmodified), "
        + setup,
        "- wake-up: from Dovecot's reply to the LMTP DATA to the `* n EXISTS` the IDLE-ing "
        "client reads (0 when the EXISTS came first); samples of all instances "
        "interleaved, in random order",
        f"- IDLE: one client per instance, a new IDLE before each of {samples} deliveries",
        f"- hibernated: `imap_hibernate_timeout = {HIBERNATE_SECS}s`, clients IDLE "
        f"{HIBERNATE_SECS + 1.5:g} s before the delivery; {per_round} clients per instance "
        f"and round, {rounds} rounds",
        "",
        "| dovecot | client | samples | median | p95 | min | max |",
        "|---|---|---|---|---|---|---|",
    ]
    for label in idle:
        lines.append(f"| {label} | IDLE | {summary(idle[label])} |")
    for label in hib:
        lines.append(f"| {label} | hibernated | {summary(hib[label])} |")
    lines += ["", f"| dovecot | CPU time of the IDLE client's imap process, {samples} "
              "IDLE/delivery/DONE cycles | "
              "hibernations logged | unhibernations logged | "
              "log lines with Error/Warning/Panic/Fatal |",
              "|---|---|---|---|---|"]
    for label in idle:
        lines.append(f"| {label} | {cpu[label] * 1000:.0f} ms | {hibernated[label]} | "
                     f"{unhibernated[label]} | {len(problems[label])} |")
    for label, found in problems.items():
        for line in found[:10]:
            lines.append(f"\n{label}: `{line}`")
    return "\n".join(lines) + "\n"


def main():
    relay = sys.argv[1:2] == ["--relay"]
    args = [int(a) for a in sys.argv[1 + relay:4 + relay]]
    samples, rounds, per_round = args + [200, 25, 8][len(args):]
    if os.geteuid() != 0:
        sys.exit("needs root")
    for needed in ("/usr/lib/dovecot/dovecot-config", "/usr/lib/dovecot/imap",
                   "/usr/lib/dovecot/lmtp"):
        if not os.path.exists(needed):
            sys.exit(f"needs {needed} (dovecot-dev, dovecot-imapd, dovecot-lmtpd)")
    # Each IDLE-ing imap process holds an inotify instance, each hibernated client too
    # (imap-hibernate keeps the one extracted for it), all of user vmail; a wake-up has
    # both for a moment. Past the limit Dovecot disables inotify in that process, and
    # the client neither hibernates nor gets instant IDLE.
    limit = int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
    if 4 * 2 * per_round + 16 > limit:
        sys.exit(f"{per_round} clients per round need more than "
                 f"fs.inotify.max_user_instances={limit}: use fewer")
    started = time.monotonic()
    build = Path(tempfile.mkdtemp(prefix="idlp-build-", dir="/tmp"))
    instances = []
    push = None
    try:
        build.chmod(0o755)
        build_plugin(build / PLUGIN_SO)
        if relay:
            sys.path.insert(0, str(REPO))
            from tests.unit.push_server import PushServer
            push = PushServer()
            instances = [RelayDovecot("relay-stock", push),
                         RelayDovecot("relay-plugin", push, plugin_dir=build)]
        else:
            instances = [Dovecot("stock"), Dovecot("plugin", plugin_dir=build),
                         Dovecot("stock-tls", tls=True),
                         Dovecot("plugin-tls", plugin_dir=build, tls=True)]
        for d in instances:
            d.start()
        idle, cpu, _ = measure_idle(instances, samples, started)
        hib, hibernated = measure_hibernated(instances, rounds, per_round, started)
        time.sleep(0.5)
        problems = {d.label: d.problems() for d in instances}
        unhibernated = {d.label: d.count("Unhibernated because") for d in instances}
    finally:
        for d in instances:
            d.stop()
        if push:
            push.close()
        keep = os.environ.get("KEEP_BENCH_DIRS")
        for path in [build] + [d.root for d in instances]:
            if keep:
                print("kept", path)
            else:
                shutil.rmtree(path, ignore_errors=True)
    command = " ".join(["bench/bench_idle_plugin.py"] + ["--relay"] * relay
                       + [str(samples), str(rounds), str(per_round)])
    version = dovecot_version()
    text = write_results(command, RELAY if relay else STANDALONE, machine_facts(),
                         version, (samples, rounds, per_round), idle, cpu, hib,
                         hibernated, problems, unhibernated)
    results = RESULTS
    if relay:  # Dovecot 2.4 (Debian 13, under tests/chroot.sh) gets its own file
        results = RESULTS_RELAY_24 if version[0].startswith("2.4") else RESULTS_RELAY
    results.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
