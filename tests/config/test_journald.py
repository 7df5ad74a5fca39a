"""conf/journald: the relay's logs stay in memory for three days, through a drop-in that
systemd really reads."""

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

from chatmaild.admin.platform import load_platform

DROPIN = "/etc/systemd/journald.conf.d/chatmail.conf"


@pytest.mark.parametrize("platform", ["debian12", "debian13"])
def test_volatile_journal_for_three_days(render, relay_config, platform):
    files = render("journald", relay_config, load_platform(platform))
    assert list(files) == [DROPIN]
    item = files[DROPIN]
    assert (item.mode, item.owner, item.group) == (0o644, "root", "root")
    assert item.reload == ["systemd-journald"]
    parser = configparser.ConfigParser()
    parser.optionxform = str
    parser.read_string(item.content)
    assert dict(parser["Journal"]) == {"Storage": "volatile", "MaxRetentionSec": "3d"}


def test_nothing_without_systemd(render, relay_config):
    assert render("journald", relay_config, load_platform("alpine")) == {}


def test_systemd_reads_the_dropin(render, relay_config, tmp_path):
    """systemd-analyze cat-config lists the files journald reads, in its order."""
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("needs systemd-analyze (apt install systemd)")
    item = render("journald", relay_config, load_platform("debian12"))[DROPIN]
    path = tmp_path / DROPIN.lstrip("/")
    path.parent.mkdir(parents=True)
    path.write_text(item.content)
    result = subprocess.run([analyze, "cat-config", f"--root={tmp_path}", "--no-pager",
                             "systemd/journald.conf"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"# {path}" in result.stdout
    assert "Storage=volatile" in result.stdout and Path(path).exists()
