"""nginx: check our two files together with the admin's whole nginx configuration.

We add files to /etc/nginx and never replace nginx.conf, so whether nginx still starts
depends on everything else in there too: a second `stream {}` block, another
`default_server` on 127.0.0.1:8443, a syntax error. validate() copies the configuration
directory to a scratch directory, puts our rendered files in, points the includes of
nginx.conf and of our files at the copy and runs `nginx -T` on it, so nothing in /etc is
touched and the result is what nginx would say after installation.

Two conflicts nginx -T lets pass: a site that listens on port 443 itself (the stream
multiplexer needs port 443 for all addresses, so nginx would fail to start: bind: address
in use), which validate() looks for in nginx's dump; and another server for one of the
relay's names on the same port, which nginx only warns about and then ignores.
"""

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
CERTIFICATE_DIRECTIVE = re.compile(r"^(\s*ssl_certificate(?:_key)?\s+)([^;\s]+)(;)", re.M)
DUMP_FILE_HEADER = re.compile(r"^# configuration file (.+):$", re.M)
LISTEN_DIRECTIVE = re.compile(r"(?:^|[;{}])\s*listen\s+([^;]*);")
COMMENT = re.compile(r"#[^\n]*")
LOG_LINE = re.compile(r"^\S+ \S+ \[(\w+)\] \d+#\d+: (.*)$")
HTTPS_PORT = "443"
# nginx starts anyway and silently serves the name from the first server only: either the
# relay's pages or the admin's site would be gone.
NAME_CONFLICT_HINT = (" (two servers answer to this name on this port and nginx would use "
                      "only the first: remove the relay's names from the other server)")


def validate(files, platform, stand_in_certificates=False):
    """Problems nginx would have with our `files` installed in platform.nginx_config_dir
    (empty list: none).

    With `stand_in_certificates`, every certificate our files name is replaced by a
    scratch self-signed one, for checking the configuration where there is none (tests);
    otherwise a missing certificate is a problem.
    """
    config_dir = Path(platform.nginx_config_dir)
    problems = missing_prerequisites(platform, config_dir)
    problems += [f"{item.path} is not below {config_dir}; nginx would not read it"
                 for item in files if not Path(item.path).is_relative_to(config_dir)]
    if problems:
        return problems
    with tempfile.TemporaryDirectory(prefix="chatmail-nginx-") as scratch:
        scratch = Path(scratch)
        copy = scratch / "nginx"
        shutil.copytree(config_dir, copy, symlinks=True)
        point_includes_at(copy / "nginx.conf", config_dir, copy)
        stand_in = make_stand_in_certificate(scratch) if stand_in_certificates else None
        ours = set()
        for item in files:
            target, certificate_problems = place_file(item, config_dir, copy, stand_in, scratch)
            problems += certificate_problems
            ours.add(target)
        dump, errors, warnings = run_nginx_dump(copy / "nginx.conf")
        problems += [in_real_paths(line, copy, config_dir) for line in errors]
        problems += [in_real_paths(line, copy, config_dir) + NAME_CONFLICT_HINT
                     for line in warnings if "conflicting server name" in line]
        if not errors and any(listens_on_https_port(item.content) for item in files):
            problems += foreign_https_listeners(dump, ours, copy, config_dir)
    return unique(problems)


def unique(problems):
    return list(dict.fromkeys(problems))


def missing_prerequisites(platform, config_dir):
    problems = []
    if nginx_binary() is None:
        problems.append("nginx is not installed")
    if not (config_dir / "nginx.conf").is_file():
        problems.append(f"{config_dir}/nginx.conf does not exist")
    if not Path(platform.nginx_stream_module).is_file():
        problems.append(
            f"nginx's stream module {platform.nginx_stream_module} is not installed "
            "(Debian: libnginx-mod-stream, Alpine: nginx-mod-stream); port 443 needs it")
    return problems


def nginx_binary():
    return shutil.which("nginx", path=os.environ.get("PATH", "") + ":" + SYSTEM_PATH)


def point_includes_at(path, config_dir, copy):
    """Make absolute paths into the configuration directory name the copy instead."""
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace(f"{config_dir}/", f"{copy}/"), encoding="utf-8")


def place_file(item, config_dir, copy, stand_in, scratch):
    """Write one rendered file into the copy; returns (its path there, problems with the
    certificates it names)."""
    target = copy / Path(item.path).relative_to(config_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    # The copy may hold a symlink to a real file (sites-enabled style): never write through.
    target.unlink(missing_ok=True)
    content = item.content.replace(f"{config_dir}/", f"{copy}/")
    content, problems = substitute_certificates(content, item.path, stand_in, scratch)
    target.write_text(content, encoding="utf-8")
    return target, problems


def substitute_certificates(content, source, stand_in, scratch):
    """Point certificate directives at the stand-in pair; without one, report missing
    files and still check the rest with a stand-in, so that every problem shows at once."""
    problems = []

    def replace(match):
        prefix, path, end = match.groups()
        if stand_in is None:
            if Path(path).exists():
                return match.group(0)
            problems.append(f"{path} does not exist (named in {source})")
        pair = stand_in or make_stand_in_certificate(scratch)
        return prefix + str(pair[1] if prefix.strip().endswith("_key") else pair[0]) + end

    return CERTIFICATE_DIRECTIVE.sub(replace, content), problems


def make_stand_in_certificate(directory):
    """A throw-away self-signed (certificate, key) pair in `directory`, made once."""
    cert, key = Path(directory) / "stand-in.pem", Path(directory) / "stand-in.key"
    if not cert.exists():
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-days", "2", "-subj", "/CN=chatmail-relay-check",
             "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True)
    return cert, key


def run_nginx_dump(main_config):
    """(nginx -T's dump of the whole configuration, [error lines], [warning lines]);
    errors mean nginx would refuse the configuration."""
    result = subprocess.run(
        [nginx_binary(), "-T", "-q", "-c", str(main_config)],
        capture_output=True, text=True, errors="replace")
    lines = [without_timestamp(line) for line in result.stderr.splitlines()
             if line.strip() and "test failed" not in line]
    warnings = [line for line in lines if line.startswith("warning: ")]
    if result.returncode == 0:
        return result.stdout, [], warnings
    errors = [line for line in lines if line not in warnings]
    errors = errors or [f"nginx -T failed with exit code {result.returncode}"]
    return result.stdout, errors, warnings


def without_timestamp(line):
    """'2026/01/02 03:04:05 [emerg] 12#12: text' -> 'error: text'."""
    match = LOG_LINE.match(line.removeprefix("nginx: "))
    if not match:
        return line.removeprefix("nginx: ")
    level, text = match.groups()
    return f"{'warning' if level in ('warn', 'notice', 'info') else 'error'}: {text}"


def in_real_paths(text, copy, config_dir):
    return text.replace(str(copy), str(config_dir))


def listen_arguments(text):
    """The arguments of every listen directive in nginx configuration `text`."""
    return [match.group(1).split() for match in LISTEN_DIRECTIVE.finditer(COMMENT.sub("", text))]


def takes_tcp_port(arguments, port):
    """True if a listen directive binds TCP `port` (any address: with ours on the wildcard
    address, a specific one cannot be bound either). QUIC listens on UDP."""
    if not arguments or {"quic", "udp"} & set(arguments[1:]):
        return False
    address = arguments[0]
    if address.startswith("unix:"):
        return False
    return address == port or (":" in address and address.rsplit(":", 1)[1] == port)


def listens_on_https_port(content):
    return any(takes_tcp_port(arguments, HTTPS_PORT) for arguments in listen_arguments(content))


def dumped_files(dump):
    """{path: content} of the files in an `nginx -T` dump."""
    parts = DUMP_FILE_HEADER.split(dump)
    return {Path(parts[i]): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def foreign_https_listeners(dump, ours, copy, config_dir):
    problems = []
    for path, content in dumped_files(dump).items():
        if path in ours:
            continue
        for arguments in listen_arguments(content):
            if takes_tcp_port(arguments, HTTPS_PORT):
                problems.append(
                    f"{in_real_paths(str(path), copy, config_dir)}: 'listen "
                    f"{' '.join(arguments)}' takes port 443, which the chatmail relay's "
                    "multiplexer needs for HTTPS, IMAP and SMTP. Let HTTPS sites listen on "
                    "'127.0.0.1:8443 ssl' instead (nginx picks them by server_name).")
    return problems
