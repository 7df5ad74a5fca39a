"""conf/opendkim rendered for every relay configuration and checked by opendkim itself."""

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from chatmaild.admin.components import opendkim, postconf
from chatmaild.admin.platform import load_platform

pytestmark = pytest.mark.skipif(not shutil.which("opendkim", path="/usr/sbin:/usr/bin"),
                                reason="needs Debian's opendkim package")

CONF = "/etc/opendkim/chatmail.conf"
DROPIN = "/etc/systemd/system/opendkim.service.d/chatmail.conf"
DEBIAN_UNIT = Path("/lib/systemd/system/opendkim.service")


@pytest.fixture
def rendered(relay_config, debian12, render):
    return render("opendkim", relay_config, debian12)


@pytest.fixture
def domain_rendered(make_config, debian12, render):
    return render("opendkim", make_config(), debian12)


def settings(text):
    """opendkim.conf text -> {name: value}."""
    pairs = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, value = line.partition(" ")
            pairs[name] = value.strip()
    return pairs


def service_lines(text):
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_validates_with_opendkim(rendered, debian12):
    assert opendkim.validate(list(rendered.values()), debian12) == []


def test_nothing_for_ipv4_relays(rendered, relay_config):
    if relay_config.ipv4_relay:
        assert rendered == {}
    else:
        assert set(rendered) == {CONF, DROPIN, "/etc/dkimkeys/KeyTable",
                                 "/etc/dkimkeys/SigningTable"}


def test_signs_only_what_postfix_marks_as_originating(domain_rendered):
    conf = settings(domain_rendered[CONF].content)
    assert (conf["MTA"], conf["InternalHosts"]) == ("ORIGINATING", "-")
    assert conf["KeyTable"] == "/etc/dkimkeys/KeyTable"
    assert conf["SigningTable"] == "refile:/etc/dkimkeys/SigningTable"
    assert conf["Canonicalization"] == "relaxed/simple"
    assert conf["SignHeaders"] == "*,+autocrypt,+content-type"
    assert conf["OversignHeaders"].split(",")[0] == "from"
    assert "autocrypt" in conf["OversignHeaders"].split(",")
    assert (conf["Syslog"], conf["SyslogSuccess"]) == ("yes", "yes")


def test_tables_name_the_key_of_the_domain(rendered, relay_config):
    if relay_config.ipv4_relay:
        return
    domain = relay_config.mail_domain
    key_table = rendered["/etc/dkimkeys/KeyTable"]
    signing_table = rendered["/etc/dkimkeys/SigningTable"]
    # The key steps/dkim-key makes, named after the domain.
    assert key_table.content.split() == [f"opendkim._domainkey.{domain}",
                                         f"{domain}:opendkim:/etc/dkimkeys/{domain}.private"]
    assert signing_table.content.split() == [f"*@{domain}", f"opendkim._domainkey.{domain}"]
    for item in (key_table, signing_table):
        assert (item.owner, item.group, item.mode) == ("opendkim", "opendkim", 0o644)


def test_socket_is_where_postfix_looks(domain_rendered, make_config, debian12, render):
    conf = settings(domain_rendered[CONF].content)
    main = render("postfix", make_config(), debian12)["/etc/postfix/main.cf"]
    milter = postconf.parse_main(main.content)[0]["non_smtpd_milters"]
    # Postfix runs chrooted in its queue directory and names the socket relative to it.
    assert milter == "unix:opendkim/opendkim.sock"
    assert conf["Socket"] == "local:/var/spool/postfix/opendkim/opendkim.sock"
    assert (conf["UMask"], conf["UserID"]) == ("007", "opendkim")


def test_dropin_starts_opendkim_with_our_file(domain_rendered):
    lines = service_lines(domain_rendered[DROPIN].content)
    assert lines[0] == "[Service]"
    # The empty ExecStart= drops Debian's command before ours is added.
    assert lines.index("ExecStart=") + 1 == lines.index(f"ExecStart=/usr/sbin/opendkim -x {CONF}")
    assert "Restart=always" in lines
    assert "RuntimeMaxSec=1d" in lines
    # A reload would re-read the file opendkim was started with, Debian's before this.
    assert domain_rendered[DROPIN].restart == ["opendkim"]


@pytest.mark.skipif(not DEBIAN_UNIT.exists(), reason="needs Debian's opendkim.service")
def test_dropin_fits_debians_unit(domain_rendered):
    """Debian's unit is Type=forking and waits for this pid file, which our file must
    write; its own ExecStart has no options we would lose by replacing it."""
    unit = service_lines(DEBIAN_UNIT.read_text())
    assert "Type=forking" in unit
    assert "PIDFile=/run/opendkim/opendkim.pid" in unit
    assert "ExecStart=/usr/sbin/opendkim" in unit
    assert settings(domain_rendered[CONF].content)["PidFile"] == "/run/opendkim/opendkim.pid"


def test_no_dropin_without_systemd(make_config, render):
    rendered = render("opendkim", make_config(), load_platform("alpine"))
    assert DROPIN not in rendered
    assert CONF in rendered


def test_openrc_instance_reads_our_file(make_config, render):
    """On Alpine the instance opendkim.chatmail of the package's init script (which passes
    command_args on) runs OpenDKIM with our file."""
    rendered = render("opendkim", make_config(), load_platform("alpine"))
    confd = rendered["/etc/conf.d/opendkim.chatmail"]
    assert f'\ncommand_args="-x {CONF}"\n' in confd.content
    assert confd.restart == ["opendkim.chatmail"]
    assert rendered[CONF].reload == ["opendkim.chatmail"]


def test_unknown_setting_is_reported_by_opendkim(domain_rendered, debian12):
    domain_rendered[CONF].content += "SignHeader *\n"
    problems = opendkim.validate(list(domain_rendered.values()), debian12)
    assert len(problems) == 1
    assert problems[0].startswith(f"opendkim: {CONF}: configuration error at line ")
    assert problems[0].endswith(": unrecognized parameter")


def test_bad_value_is_reported_by_opendkim(domain_rendered, debian12):
    conf = domain_rendered[CONF]
    conf.content = conf.content.replace("relaxed/simple", "relaxed/loose")
    problems = opendkim.validate(list(domain_rendered.values()), debian12)
    assert problems == [f'opendkim: {CONF}: unknown canonicalization algorithm "loose"']


def test_missing_trust_anchor_is_reported(domain_rendered, debian12):
    conf = domain_rendered[CONF]
    conf.content = conf.content.replace("/usr/share/dns/root.key", "/nonexistent/root.key")
    problems = opendkim.validate(list(domain_rendered.values()), debian12)
    assert problems == [f"opendkim: {CONF}: /nonexistent/root.key: No such file or directory"]


def test_tables_must_refer_to_each_other(domain_rendered, debian12):
    domain_rendered["/etc/dkimkeys/SigningTable"].content = "*@chat.example.org other\n"
    domain_rendered["/etc/dkimkeys/KeyTable"].content += "broken chat.example.org:opendkim\n"
    problems = opendkim.validate(list(domain_rendered.values()), debian12)
    assert problems == [
        "KeyTable: broken 'chat.example.org:opendkim' is not domain:selector:keyfile",
        "SigningTable: *@chat.example.org names 'other', which is not in the KeyTable"]


# --- signing, end to end ---------------------------------------------------------------------

class MilterClient:
    """The MTA side of the milter protocol (version 6), as Postfix speaks it: enough to hand
    one message to OpenDKIM and collect the headers it adds."""

    def __init__(self, socket_path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(str(socket_path))
        # Offer no protocol flags, so the filter answers every command.
        self.send(b"O", (6).to_bytes(4, "big") + (0x1FF).to_bytes(4, "big") + bytes(4))
        assert self.receive()[0] == b"O"

    def send(self, command, data=b""):
        self.sock.sendall((len(data) + 1).to_bytes(4, "big") + command + data)

    def receive(self):
        length = int.from_bytes(self._read(4), "big")
        packet = self._read(length)
        return packet[:1], packet[1:]

    def _read(self, size):
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            assert chunk, "the milter closed the connection"
            data += chunk
        return data

    def command(self, command, *fields):
        self.send(command, b"".join(field.encode() + b"\0" for field in fields))
        return self.receive()

    def message(self, daemon_name, sender, headers, body):
        """Pass one message; returns (the final reply code, its data, [(header, value)
        added])."""
        # Postfix sends {daemon_name} with the connect macros (milter_macro_daemon_name).
        self.send(b"D", b"C" + b"j\0relay.test\0{daemon_name}\0" + daemon_name.encode() + b"\0")
        self.send(b"C", b"localhost\0" + b"4" + (10025).to_bytes(2, "big") + b"127.0.0.1\0")
        replies = [self.receive()]
        replies.append(self.command(b"H", "localhost"))
        replies.append(self.command(b"M", f"<{sender}>"))
        replies.append(self.command(b"R", "<bob@example.net>"))
        for name, value in headers:
            replies.append(self.command(b"L", name, value))
        replies.append(self.command(b"N"))
        self.send(b"B", body.encode())
        replies.append(self.receive())
        assert all(code == b"c" for code, _ in replies), replies
        self.send(b"E")
        added = []
        while True:
            code, data = self.receive()
            if code in (b"h", b"i"):
                fields = (data[4:] if code == b"i" else data).split(b"\0")
                added.append((fields[0].decode(), fields[1].decode()))
            else:
                return code, data.rstrip(b"\0").decode(), added

    def close(self):
        self.send(b"Q")
        self.sock.close()


def accepts_connections(socket_path):
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(socket_path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
    return True


@pytest.fixture
def running_opendkim(domain_rendered, tmp_path):
    """opendkim started with our rendered file and a fresh key (start_opendkim)."""
    subprocess.run(["/usr/sbin/opendkim-genkey", "-D", str(tmp_path), "-d", "chat.example.org",
                    "-s", "opendkim"], check=True)
    (tmp_path / "opendkim.private").rename(tmp_path / "chat.example.org.private")
    yield from start_opendkim(domain_rendered, tmp_path)


def start_opendkim(rendered, directory):
    """Yields the socket of opendkim started with the RENDERED files (path: RenderedFile),
    their paths moved into DIRECTORY, where the keys are (and as the current user:
    DIRECTORY is not opendkim's); kills it afterwards."""
    text = rendered[CONF].content
    for name in ("KeyTable", "SigningTable"):
        content = rendered[f"/etc/dkimkeys/{name}"].content
        (directory / name).write_text(content.replace("/etc/dkimkeys", str(directory)))
    text = text.replace("/etc/dkimkeys", str(directory))
    text = text.replace("/var/spool/postfix/opendkim", str(directory))
    text = text.replace("/run/opendkim", str(directory))
    text = "\n".join(line for line in text.splitlines() if not line.startswith("UserID"))
    # The scratch key lies below the world-writable /tmp, which OpenDKIM would not trust.
    text += "\nRequireSafeKeys no\n"
    conf = directory / "opendkim.conf"
    conf.write_text(text)
    proc = subprocess.Popen(["/usr/sbin/opendkim", "-f", "-x", str(conf)],
                            stderr=subprocess.PIPE, text=True)
    socket_path = directory / "opendkim.sock"
    deadline = time.monotonic() + 10
    while not accepts_connections(socket_path):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "opendkim does not listen on its socket"
        time.sleep(0.02)
    yield socket_path
    # SIGTERM would make opendkim wait five seconds for its threads; nothing of this
    # scratch instance needs a clean exit.
    proc.kill()
    proc.wait(10)


HEADERS = [("From", "alice@chat.example.org"), ("To", "bob@example.net"),
           ("Subject", "[...]"), ("Date", "Mon, 1 Jan 2024 00:00:00 +0000"),
           ("Message-ID", "<1@chat.example.org>"), ("Autocrypt", "addr=alice@chat.example.org")]


def signature_tags(socket_path):
    """The tags of the DKIM-Signature opendkim at SOCKET_PATH adds to an outgoing message."""
    client = MilterClient(socket_path)
    code, _, added = client.message("ORIGINATING", "alice@chat.example.org", HEADERS,
                                    "encrypted\r\n")
    client.close()
    assert code in (b"a", b"c")
    [(name, signature)] = added
    assert name == "DKIM-Signature"
    return dict(tag.split("=", 1) for tag in "".join(signature.split()).split(";") if tag)


def test_originating_mail_is_signed(running_opendkim):
    tags = signature_tags(running_opendkim)
    assert (tags["d"], tags["s"], tags["c"]) == ("chat.example.org", "opendkim", "relaxed/simple")
    signed = tags["h"].lower().split(":")
    # Oversigned: From and Autocrypt appear once more than in the message.
    assert signed.count("from") == 2 and signed.count("autocrypt") == 2


def test_mail_from_loopback_without_originating_is_not_signed(running_opendkim):
    """Incoming mail is reinjected from 127.0.0.1 too: `InternalHosts -` keeps OpenDKIM
    from signing it just for its address. It verifies instead, and rejects unsigned mail
    (upstream's On-NoSignature): so the milter belongs on the outgoing reinjection only."""
    client = MilterClient(running_opendkim)
    code, reply, added = client.message("reinject_incoming", "carol@example.net",
                                        [("From", "carol@example.net")] + HEADERS[1:],
                                        "hello\r\n")
    client.close()
    assert added == []
    assert (code, reply.split()[0]) == (b"y", "550")
