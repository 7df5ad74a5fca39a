"""What our daemons have imported when they start serving: modules they need only later
(at a first write, a first push) or never stay out, so that they idle small
(bench/README.md, "Footprint at rest"). Each daemon's own main() runs in a fresh python3
up to the point where it would serve, and reports its sys.modules there."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The daemon's main(), with serving replaced by printing what has been imported.
DICT_DAEMON = """
import json, sys
from chatmaild import dictproxy
dictproxy.DictServer.serve_forever = lambda *args: print(json.dumps(sorted(sys.modules)))
from chatmaild.{name} import main
sys.exit(main(sys.argv[1:]))
"""
FILTER = """
import json, sys
from chatmaild import filtermail
async def report(*args):
    print(json.dumps(sorted(sys.modules)))
filtermail.serve = report
sys.argv[0] = "filtermail"
sys.exit(filtermail.main())
"""

# Per daemon, what it must not have imported at start, and why it may import it later.
NOT_AT_START = {
    # hmac (and with it OpenSSL's libcrypto) only checks hashes, which Dovecot does;
    # tempfile and shutil at the first account's creation
    "doveauth": {"hmac", "hashlib", "tempfile", "shutil", "typing", "importlib.resources"},
    # lastlogin never writes a file
    "lastlogin": {"tempfile", "shutil", "typing", "importlib.resources"},
    # http.client and ssl at the first push, tempfile at the first token
    "metadata": {"http.client", "ssl", "tempfile", "dataclasses", "uuid", "typing",
                 "importlib.resources"},
    # the filters never write; two arguments need no argparse
    "filtermail": {"tempfile", "argparse"},
}


def loaded_at_start(tmp_path, make_ini, name):
    ini = make_ini()
    (tmp_path / "mail" / "chat.example.org").mkdir(parents=True, exist_ok=True)
    if name == "filtermail":
        code, args = FILTER, [str(ini), "outgoing"]
    else:
        code, args = DICT_DAEMON.format(name=name), [str(tmp_path / f"{name}.sock"), str(ini)]
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                         text=True, cwd=REPO, check=True, timeout=60).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


@pytest.mark.parametrize("name", sorted(NOT_AT_START))
def test_daemon_starts_without_what_it_needs_only_later(tmp_path, make_ini, name):
    loaded = loaded_at_start(tmp_path, make_ini, name)
    assert "chatmaild.config" in loaded  # it did get as far as serving
    assert loaded & NOT_AT_START[name] == set()
