"""OpenDKIM: our configuration checked by opendkim itself.

validate() runs `opendkim -n` (parse the configuration and open its tables, then exit) on
scratch copies of the rendered configuration file and tables, and checks that the tables
refer to each other. opendkim -n does not read private keys, so a relay whose key is not
made yet (steps/dkim-key makes it) validates too.
"""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

# Where the tools are when PATH lacks the sbin directories (non-root shells on Debian).
SBIN_PATH = "/usr/sbin:/sbin"


def _tool(name):
    path = os.environ.get("PATH", "") + os.pathsep + SBIN_PATH
    return shutil.which(name, path=path) or name


def _table_entries(text):
    """A KeyTable or SigningTable -> [(key, value)], comments and blank lines skipped."""
    entries = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, *value = line.split(None, 1)
            entries.append((key, "".join(value)))
    return entries


def table_problems(key_table, signing_table):
    """Problems opendkim -n does not see: KeyTable values that are not
    domain:selector:keyfile, and SigningTable lines naming no KeyTable key."""
    problems = []
    keys = {}
    for name, value in _table_entries(key_table):
        if len(value.split(":")) != 3 or not all(value.split(":")):
            problems.append(f"KeyTable: {name} {value!r} is not domain:selector:keyfile")
        keys[name] = value
    for pattern, name in _table_entries(signing_table):
        if name not in keys:
            problems.append(f"SigningTable: {pattern} names {name!r}, which is not in the "
                            "KeyTable")
    return problems


def _scratch_copies(files, platform, scratch):
    """Write the configuration and tables to `scratch`, with the configuration's
    references to the tables pointing at the copies; returns the configuration's path."""
    tables = [item for item in files if item.kind == "file"
              and Path(item.path).parent == Path(platform.dkim_key_dir)]
    [conf] = [item for item in files if item.path == platform.opendkim_chatmail_config]
    text = conf.content
    for item in tables:
        copy = scratch / Path(item.path).name
        copy.write_text(item.content)
        text = text.replace(item.path, str(copy))
    conf_copy = scratch / "opendkim.conf"
    conf_copy.write_text(text)
    return conf_copy


def validate(files, platform):
    """opendkim's own check of the rendered configuration (nothing is rendered for IPv4
    relays, which then validate trivially)."""
    if not any(item.path == platform.opendkim_chatmail_config for item in files):
        return []
    rendered = {item.path: item.content for item in files}
    problems = table_problems(rendered.get(f"{platform.dkim_key_dir}/KeyTable", ""),
                              rendered.get(f"{platform.dkim_key_dir}/SigningTable", ""))
    with tempfile.TemporaryDirectory(prefix="chatmail-opendkim-") as tmp:
        scratch = Path(tmp)
        conf_copy = _scratch_copies(files, platform, scratch)
        proc = subprocess.run([_tool("opendkim"), "-n", "-x", str(conf_copy)],
                              capture_output=True, text=True)
        output = (proc.stderr + proc.stdout).strip()
        # Name the rendered files, not the scratch copies.
        output = output.replace(str(conf_copy), platform.opendkim_chatmail_config)
        output = output.replace(str(scratch), platform.dkim_key_dir)
        if proc.returncode != 0 or output:
            problems.append(output or f"opendkim -n failed with exit status {proc.returncode}")
    return problems
