"""chatmail-fsreport on a constructed mailboxes directory with known sizes and logins."""

import os
import re
import stat
import subprocess
import sys
import time

import pytest

from chatmaild.fsreport import Report, human_size, main

from ..conftest import REPO

DAY = 86400
KIB = 1024
MIB = 1024 * KIB


def write_file(path, size, days=0.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    mtime = time.time() - days * DAY
    os.utime(path, (mtime, mtime))
    return path


def make_mailbox(config, localpart, last_login_days=None, messages=()):
    """messages: (subdir path, size) pairs. Extra files are 100 bytes per mailbox."""
    mailbox = config.mailboxes_dir / f"{localpart}@{config.mail_domain}"
    mailbox.mkdir(parents=True)
    write_file(mailbox / "dovecot.index", 90)
    if last_login_days is not None:
        write_file(mailbox / "password", 10, days=last_login_days)
    else:
        write_file(mailbox / "maildirsize", 10)
    for number, (subdir, size) in enumerate(messages):
        write_file(mailbox / subdir / f"{1700000000 + number}.M{number}P1.host,S={size}", size)
    return mailbox


@pytest.fixture
def mailboxes(config):
    make_mailbox(config, "user1abcd", last_login_days=0.5, messages=[
        ("cur", 500), ("cur", 200 * KIB), ("new", 600), ("new", 2 * MIB), ("tmp", 100),
    ])
    make_mailbox(config, "user2abcd", last_login_days=35, messages=[
        ("cur", 1 * MIB), (".Sent/cur", 600 * KIB),
    ])
    make_mailbox(config, "ci-abcdefg", last_login_days=0, messages=[("new", 10 * MIB)])
    make_mailbox(config, "nopasswd1", messages=[("cur", 1000)])
    pending = config.mailboxes_dir / "pending_notifications"
    write_file(pending / "queued-token", 5000)
    return config


ALL_MESSAGES = 500 + 200 * KIB + 600 + 2 * MIB + 100 + MIB + 600 * KIB + 10 * MIB + 1000
EXTRA = 4 * 100


def parse_prometheus(text):
    """{(name, labels): value}, checking every line against the exposition format."""
    samples = {}
    declared = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if match := re.fullmatch(r"# TYPE (\w+) gauge", line):
            declared.add(match.group(1))
            continue
        match = re.fullmatch(r'(\w+)\{(\w+="[^"]*")\} (\d+)', line)
        assert match, f"not a sample line: {line!r}"
        name, labels, value = match.groups()
        assert name in declared, f"{name} without # TYPE"
        samples[name, labels] = int(value)
    return samples


def test_prometheus_textfile_numbers(mailboxes, tmp_path, capsys):
    textdir = tmp_path / "node-exporter"
    textdir.mkdir()

    assert main([str(mailboxes.inipath), "--textfile", str(textdir)]) == 0

    prom = textdir / "fsreport.prom"
    assert stat.S_IMODE(prom.stat().st_mode) == 0o644
    assert os.listdir(textdir) == ["fsreport.prom"]  # no temporary file left
    assert capsys.readouterr().out == ""  # the textfile replaces the summary
    samples = parse_prometheus(prom.read_text())
    assert samples["chatmail_storage_bytes", 'kind="messages"'] == ALL_MESSAGES
    assert samples["chatmail_storage_bytes", 'kind="extra"'] == EXTRA
    assert samples["chatmail_storage_bytes", 'kind="total"'] == ALL_MESSAGES + EXTRA
    assert samples["chatmail_accounts", 'kind="all"'] == 3
    assert samples["chatmail_accounts", 'kind="ci"'] == 1
    assert samples["chatmail_accounts", 'kind="user"'] == 2
    active = {days: samples["chatmail_accounts_active", f'days="{days}"']
              for days in (1, 10, 30, 40, 80, 100, 150)}
    assert active == {1: 1, 10: 1, 30: 1, 40: 2, 80: 2, 100: 2, 150: 2}
    # Sizes by threshold over the accounts with a login (not nopasswd1).
    in_accounts = [500, 200 * KIB, 600, 2 * MIB, 100, MIB, 600 * KIB, 10 * MIB]
    for threshold in (0, 100 * KIB, MIB // 2, MIB, 2 * MIB, 5 * MIB, 10 * MIB):
        larger = [size for size in in_accounts if size >= threshold]
        assert samples["chatmail_messages_bytes", f'min_size="{threshold}"'] == sum(larger)
        assert samples["chatmail_messages_count", f'min_size="{threshold}"'] == len(larger)


def test_textfile_to_a_file_path_replaces_it(mailboxes, tmp_path):
    target = tmp_path / "metrics.prom"
    target.write_text("stale\n")
    main([str(mailboxes.inipath), "--textfile", str(target)])
    assert "stale" not in target.read_text()
    assert "chatmail_accounts{kind=\"all\"} 3" in target.read_text()


def test_legacy_metrics(mailboxes, tmp_path):
    legacy = tmp_path / "metrics"
    main([str(mailboxes.inipath), "--legacy-metrics", str(legacy)])
    lines = legacy.read_text().splitlines()
    assert "accounts 3" in lines and "ci_accounts 1" in lines and "nonci_accounts 2" in lines


def test_summary(mailboxes, capsys):
    assert main([str(mailboxes.inipath)]) == 0
    out = capsys.readouterr().out
    assert f"Messages total size    : {human_size(ALL_MESSAGES)}" in out
    assert f"Mailbox data total size: {human_size(ALL_MESSAGES + EXTRA)}" in out
    assert "larger than  0.00K:" in out and ", 8 msgs" in out
    assert "all:     3\nnon-ci:  2\nci:      1\n" in out
    assert "last   1 days: 1 (50.00%)" in out
    assert "last  40 days: 2 (100.00%)" in out


def test_mdir_and_min_login_age_select_messages(mailboxes, capsys):
    main([str(mailboxes.inipath), "--mdir", "cur", "--min-login-age", "30", "--textfile",
          str(mailboxes.inipath.parent / "x.prom")])
    samples = parse_prometheus((mailboxes.inipath.parent / "x.prom").read_text())
    # Only user2abcd logged in 30+ days ago; its cur/ folders hold 1 MiB and 600 KiB.
    assert samples["chatmail_messages_bytes", 'min_size="0"'] == MIB + 600 * KIB
    assert samples["chatmail_messages_count", 'min_size="0"'] == 2
    assert samples["chatmail_messages_count", f'min_size="{MIB}"'] == 1
    # Storage and account totals are not filtered.
    assert samples["chatmail_storage_bytes", 'kind="messages"'] == ALL_MESSAGES

    main([str(mailboxes.inipath), "--mdir", "new", "--min-login-age", "30"])
    out = capsys.readouterr().out
    assert "### Message storage for 30 days old logins" in out
    assert "[new] larger than  0.00K:  0.00K (0.00%), 0 msgs" in out


def test_days_moves_the_reference_date(mailboxes, tmp_path):
    out = tmp_path / "shifted.prom"
    main([str(mailboxes.inipath), "--days", "30", "--textfile", str(out)])
    samples = parse_prometheus(out.read_text())
    # Seen from 30 days ago, user2abcd's login 35 days ago was within the last 10 days
    # (user1abcd's later login counts as recent, too).
    assert samples["chatmail_accounts_active", 'days="10"'] == 2
    assert samples["chatmail_accounts_active", 'days="1"'] == 1


def test_maxnum(mailboxes, tmp_path):
    out = tmp_path / "two.prom"
    main([str(mailboxes.inipath), "--maxnum", "2", "--textfile", str(out)])
    # Sorted by name, the first two mailboxes are ci-abcdefg and nopasswd1.
    samples = parse_prometheus(out.read_text())
    assert samples["chatmail_accounts", 'kind="all"'] == 1
    assert samples["chatmail_storage_bytes", 'kind="messages"'] == 10 * MIB + 1000


def test_empty_relay(config, capsys):
    assert main([str(config.inipath)]) == 0
    out = capsys.readouterr().out
    assert "Extra files :  0.00K (100.00%)" in out
    assert "last   1 days: 0 100%" in out
    assert Report(now=time.time()).prometheus_text().count("# TYPE") == 5


def test_mdir_choices_are_checked(config, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(config.inipath), "--mdir", "Sent"])
    assert exc.value.code == 2


def test_unwritable_textfile_is_an_error(mailboxes, tmp_path, capsys):
    assert main([str(mailboxes.inipath), "--textfile", str(tmp_path / "no" / "dir" / "f")]) == 1
    assert "cannot write metrics" in capsys.readouterr().err


def test_runs_as_a_script(mailboxes):
    result = subprocess.run(
        [sys.executable, "-m", "chatmaild.fsreport", str(mailboxes.inipath)],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "## Login stats" in result.stdout


def test_human_size():
    assert human_size(500) == " 0.50K"
    assert human_size(123456) == "  123K"
    assert human_size(2 * 1000 * 1000) == "    2M"
    assert human_size(3500 * 1000 * 1000) == " 3.50G"
