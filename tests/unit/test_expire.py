"""chatmail-expire and chatmail-quota-expire on real maildirs built in a temporary directory."""

import itertools
import os
import subprocess
import sys
import time

import pytest

from chatmaild.expire import (
    MailboxScan,
    daily_expire_main,
    mailbox_path_problem,
    parse_dovecot_filename,
    quota_expire_main,
    select_for_quota,
)

from ..conftest import REPO

DAY = 86400
MB = 1024 * 1024
_unique = itertools.count(100000)


def deliver(mailbox, folder="cur", size=1000, days=0.0, disk_size=None, mtime_days=None):
    """Write a message file named as Dovecot names it, saved `days` ago.

    disk_size: bytes actually written (default: size); mtime_days: the file's mtime if it
    differs from the time in its name (clients set it to the message date on APPEND).
    """
    saved = int(time.time() - days * DAY)
    name = f"{saved}.M{next(_unique)}P4242.relayhost,S={size},W={size + 20}:2,S"
    path = mailbox / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * (size if disk_size is None else disk_size))
    mtime = saved if mtime_days is None else time.time() - mtime_days * DAY
    os.utime(path, (mtime, mtime))
    return path


def make_account(config, localpart, last_login_days=0.0):
    """An address as doveauth and Dovecot leave it: password, flags, indexes, maildir."""
    mailbox = config.mailboxes_dir / f"{localpart}@{config.mail_domain}"
    for sub in ("cur", "new", "tmp"):
        (mailbox / sub).mkdir(parents=True, exist_ok=True)
    password = mailbox / "password"
    password.write_text("{SHA512-CRYPT}$6$salt$hash\n")
    (mailbox / "enforceE2EEincoming").touch()
    (mailbox / "dovecot.index.log").write_bytes(b"i" * 300)
    (mailbox / "maildirsize").write_text("524288000S\n1000 1\n")
    last_login = time.time() - last_login_days * DAY
    os.utime(password, (last_login, last_login))
    return mailbox


def run_expire(config, *args):
    return daily_expire_main([str(config.inipath), *args])


# -- file names and scanning ------------------------------------------------------------


def test_parse_dovecot_filename():
    entry = parse_dovecot_filename("cur/1775324677.M448978P3029757.exam,S=3235,W=3305:2,S")
    assert (entry.timestamp, entry.quota_size) == (1775324677, 3235)
    assert entry.path == "cur/1775324677.M448978P3029757.exam,S=3235,W=3305:2,S"
    new = parse_dovecot_filename("/m/a@b/new/1700000000.M1P2.host,S=17,W=20")
    assert (new.timestamp, new.quota_size) == (1700000000, 17)
    assert parse_dovecot_filename("cur/msg_without_structure") is None
    assert parse_dovecot_filename("cur/1700000000.M1P2.host,S=,W=3") is None
    assert parse_dovecot_filename("cur/1700000000.M1P2.host,S=12x:2,") is None


def test_scan_finds_messages_in_all_folders(config):
    mailbox = make_account(config, "scanme123", last_login_days=3)
    deliver(mailbox, "cur", 500)
    deliver(mailbox, "new", 600)
    deliver(mailbox, "tmp", 700)
    deliver(mailbox, ".Sent/cur", 800)
    deliver(mailbox, ".DeltaChat/new", 900)
    (mailbox / "cur" / "a-directory").mkdir()

    scan = MailboxScan.read(mailbox)

    assert sorted(m.size for m in scan.messages) == [500, 600, 700, 800, 900]
    assert {m.subdir for m in scan.messages} == {"cur", "new", "tmp"}
    assert scan.last_login == pytest.approx(time.time() - 3 * DAY, abs=5)
    extra_names = sorted(os.path.basename(e.path) for e in scan.extrafiles)
    assert extra_names == ["dovecot.index.log", "enforceE2EEincoming", "maildirsize", "password"]


def test_scan_never_follows_symlinks(config, tmp_path):
    outside = tmp_path / "outside"
    secret = deliver(outside, "cur", 4321, days=100)
    mailbox = make_account(config, "symlinks1")
    (mailbox / "cur" / "link-to-file").symlink_to(secret)
    (mailbox / ".Evil").symlink_to(outside)
    (mailbox / "new").rmdir()
    (mailbox / "new").symlink_to(outside / "cur")

    scan = MailboxScan.read(mailbox)

    assert scan.messages == []
    assert all("outside" not in e.path for e in scan.extrafiles)


# -- the daily expiry ---------------------------------------------------------------------


@pytest.fixture
def populated(config, tmp_path):
    """A mailboxes dir with one of each case the rules distinguish."""
    active = make_account(config, "active123", last_login_days=1)
    paths = {
        "old_cur": deliver(active, "cur", days=21),
        "old_new": deliver(active, "new", days=21),
        "old_tmp": deliver(active, "tmp", days=21),
        "old_sent": deliver(active, ".Sent/cur", days=21),
        "large_cur": deliver(active, "cur", 300000, days=8),
        "large_new_stays": deliver(active, "new", 300000, days=8),
        "large_young_stays": deliver(active, "cur", 300000, days=1),
        "small_stays": deliver(active, "cur", 2000, days=19),
        "fresh_stays": deliver(active, "new", 2000),
    }
    # A day old by its name, but older than 20 days by mtime: the age rules go by mtime.
    paths["old_mtime"] = deliver(active, "cur", days=1, mtime_days=25)
    inactive = make_account(config, "inactive1", last_login_days=91)
    deliver(inactive, "cur", days=2)
    nearly_inactive = make_account(config, "nearlyin1", last_login_days=89)
    empty_without_password = config.mailboxes_dir / "half12345@chat.example.org"
    empty_without_password.mkdir()
    full_without_password = config.mailboxes_dir / "halffull1@chat.example.org"
    deliver(full_without_password, "cur", days=30)
    pending = config.mailboxes_dir / "pending_notifications"
    pending.mkdir()
    queued = pending / "abcdef"
    queued.write_text("tok")
    os.utime(queued, (0, 0))
    outside = tmp_path / "outside"
    outside_message = deliver(outside, "cur", days=100)
    outside_password = outside / "password"
    outside_password.write_text("x")
    os.utime(outside_password, (0, 0))
    (config.mailboxes_dir / "linked123@chat.example.org").symlink_to(outside)
    (active / "cur" / "link").symlink_to(outside_message)
    return dict(
        paths, active=active, inactive=inactive, nearly_inactive=nearly_inactive,
        empty_without_password=empty_without_password,
        full_without_password=full_without_password, queued=queued,
        outside_message=outside_message, outside=outside,
    )


def all_files(directory):
    return sorted(str(p) for p in directory.rglob("*"))


def test_dry_run_changes_nothing(config, populated, capsys):
    before = all_files(config.mailboxes_dir.parent)

    assert run_expire(config) == 0

    assert all_files(config.mailboxes_dir.parent) == before
    out = capsys.readouterr().out
    assert out.startswith("Dry run, nothing removed (use --remove): would remove "
                          "2 out of 5 mailboxes and 6 out of ")


def test_remove_applies_each_rule(config, populated, capsys):
    p = populated

    assert run_expire(config, "--remove") == 0

    for gone in ("old_cur", "old_new", "old_tmp", "old_sent", "large_cur", "old_mtime"):
        assert not p[gone].exists(), gone
    for kept in ("large_new_stays", "large_young_stays", "small_stays", "fresh_stays"):
        assert p[kept].exists(), kept
    assert not (p["active"] / "maildirsize").exists()
    assert (p["active"] / "password").exists()
    assert (p["active"] / "dovecot.index.log").exists()
    assert not p["inactive"].exists()
    assert (p["nearly_inactive"] / "maildirsize").exists()
    assert not p["empty_without_password"].exists()
    assert p["full_without_password"].exists()
    assert p["queued"].exists()
    assert p["outside_message"].exists() and (p["outside"] / "password").exists()
    assert (p["active"] / "cur" / "link").is_symlink()
    out, err = capsys.readouterr()
    # 10 message files in the active mailbox (the link is none), none in the nearly
    # inactive one; 6 removed.
    assert out.startswith("Removed 2 out of 5 mailboxes and 6 out of 10 files in existing")
    assert "doesn't have last_login but isn't empty" in err
    assert "linked123@chat.example.org: not a directory" in err


def test_second_run_removes_nothing(config, populated, capsys):
    run_expire(config, "--remove")
    capsys.readouterr()
    run_expire(config, "--remove", "-v")
    out, err = capsys.readouterr()
    assert out.startswith("Removed 0 out of 3 mailboxes and 0 out of 4 files")
    assert "removing" not in err


def test_verbose_names_every_removal(config, populated, capsys):
    run_expire(config, "--remove", "-v")
    err = capsys.readouterr().err
    for gone in ("old_cur", "old_sent", "large_cur"):
        assert f"{populated[gone]}" in err
    assert f"removing {populated['inactive']}" in err
    assert f"removing {populated['active'] / 'maildirsize'}" in err
    assert "checking mailbox" in err


def test_untouched_mailbox_keeps_maildirsize(config):
    mailbox = make_account(config, "quiet1234")
    deliver(mailbox, "cur", days=2)
    run_expire(config, "--remove")
    assert (mailbox / "maildirsize").exists()


def test_days_option_shifts_the_reference_date(config, capsys):
    mailbox = make_account(config, "shifted12")
    message = deliver(mailbox, "cur", days=21)
    run_expire(config, "--remove", "--days", "5")
    assert message.exists()
    run_expire(config, "--remove")
    assert not message.exists()


def test_maxnum_limits_the_mailboxes(config, capsys):
    for i in range(3):
        make_account(config, f"inactive{i}", last_login_days=100)
    (config.mailboxes_dir / "pending_notifications").mkdir()
    run_expire(config, "--remove", "--maxnum", "2")
    remaining = [p.name for p in config.mailboxes_dir.iterdir()]
    assert sorted(remaining) == ["inactive2@chat.example.org", "pending_notifications"]


def test_config_settings_are_used(make_config):
    config = make_config(delete_mails_after="3", delete_inactive_users_after="10")
    mailbox = make_account(config, "settings1", last_login_days=2)
    message = deliver(mailbox, "new", days=4)
    gone_account = make_account(config, "settings2", last_login_days=11)
    run_expire(config, "--remove")
    assert not message.exists()
    assert not gone_account.exists()


def test_missing_mailboxes_dir(make_config, capsys):
    config = make_config()
    config.mailboxes_dir.rmdir()
    assert run_expire(config, "--remove") == 0
    out, err = capsys.readouterr()
    assert "no mailboxes found at" in err
    assert out.startswith("Removed 0 out of 0 mailboxes")


def test_broken_ini_is_reported_without_traceback(tmp_path, capsys):
    ini = tmp_path / "chatmail.ini"
    ini.write_text("[params]\nmail_domain = chat.example.org\nmax_mailbox_size = lots\n")
    assert daily_expire_main([str(ini)]) == 1
    err = capsys.readouterr().err
    assert "max_mailbox_size" in err and "Traceback" not in err


def test_runs_as_a_script(config):
    mailbox = make_account(config, "script123", last_login_days=100)
    result = subprocess.run(
        [sys.executable, "-m", "chatmaild.expire", str(config.inipath), "--remove", "-v"],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Removed 1 out of 1 mailboxes")
    assert not mailbox.exists()


# -- trimming to the quota ------------------------------------------------------------------


def test_daily_trims_to_70_percent_oldest_first(make_config, capsys):
    config = make_config(max_mailbox_size="1M")  # target: 0.7 MiB = 734003 bytes
    mailbox = make_account(config, "fullbox12")
    # S= sizes count, not the bytes on disk; the name's time orders, not the mtime.
    oldest = deliver(mailbox, "cur", 300000, days=4, disk_size=10, mtime_days=1)
    older = deliver(mailbox, ".Sent/cur", 300000, days=3, disk_size=10, mtime_days=2)
    newer = deliver(mailbox, "new", 300000, days=2, disk_size=10, mtime_days=4)
    fresh = deliver(mailbox, "new", 300000, days=0.1, disk_size=10)
    unnamed = mailbox / "cur" / "not-a-dovecot-name"
    unnamed.write_bytes(b"x" * 10)

    run_expire(config, "--remove", "-v")

    assert not oldest.exists() and not older.exists()
    assert newer.exists() and fresh.exists() and unnamed.exists()
    assert not (mailbox / "maildirsize").exists()
    err = capsys.readouterr().err
    assert "quota-expire: removed 2 message(s) from fullbox12@chat.example.org" in err


def test_dry_run_does_not_trim(make_config, capsys):
    config = make_config(max_mailbox_size="1M")
    mailbox = make_account(config, "fullbox34")
    messages = [deliver(mailbox, "cur", 500000, days=d, disk_size=10) for d in (3, 2)]
    run_expire(config, "-v")
    assert all(m.exists() for m in messages)
    err = capsys.readouterr().err
    assert "quota-expire: would remove 1 message(s)" in err
    assert "quota-expire: removed" not in err


def test_select_for_quota_protects_the_last_day(tmp_path):
    mailbox = tmp_path / "box@example.org"
    deliver(mailbox, "cur", 2 * MB, days=0.9)
    deliver(mailbox, "new", 2 * MB, days=0.5)
    deliver(mailbox, "tmp", 2 * MB, days=5)  # still being written: never chosen
    scan = MailboxScan.read(mailbox)
    assert select_for_quota(scan.messages, 0, time.time() - DAY) == []


def test_quota_expire_main(config, capsys):
    mailbox = make_account(config, "quota1234")
    old = deliver(mailbox, "cur", 2 * MB, days=5, disk_size=100)
    middle = deliver(mailbox, "new", MB, days=3, disk_size=100)
    young = deliver(mailbox, "cur", 3 * MB, days=0.5, disk_size=100)

    assert quota_expire_main(["3", str(mailbox)]) == 0

    assert not old.exists() and not middle.exists() and young.exists()
    assert not (mailbox / "maildirsize").exists()
    err = capsys.readouterr().err
    assert err == "quota-expire: removed 2 message(s) from quota1234@chat.example.org\n"


def test_quota_expire_below_target_keeps_everything(config, capsys):
    mailbox = make_account(config, "quota5678")
    message = deliver(mailbox, "cur", MB, days=5)
    assert quota_expire_main(["2", str(mailbox)]) == 0
    assert message.exists() and (mailbox / "maildirsize").exists()
    assert capsys.readouterr().err == ""


def test_quota_expire_for_an_ipv4_relay(make_config, capsys):
    config = make_config("192.0.2.7")
    mailbox = make_account(config, "ipv4quota")
    assert mailbox.name == "ipv4quota@[192.0.2.7]"
    deliver(mailbox, "cur", 2 * MB, days=5)
    assert quota_expire_main(["1", str(mailbox)]) == 0
    assert "removed 1 message(s) from ipv4quota@[192.0.2.7]" in capsys.readouterr().err


def test_quota_expire_refuses_what_is_not_a_mailbox(config, tmp_path, capsys):
    elsewhere = tmp_path / "somewhere" / "x@chat.example.org"
    deliver(elsewhere, "cur", 2 * MB, days=5)
    link = config.mailboxes_dir / "link1234@chat.example.org"
    link.symlink_to(elsewhere)
    plain_dir = config.mailboxes_dir / "pending_notifications"
    deliver(plain_dir, "cur", 2 * MB, days=5)
    for path in (config.mailboxes_dir, plain_dir, elsewhere, link, tmp_path / "no@such"):
        assert quota_expire_main(["0", str(path)]) == 1
        assert "quota-expire: refusing" in capsys.readouterr().err
    assert len(list(elsewhere.rglob("*,S=*"))) == 1
    assert len(list(plain_dir.rglob("*,S=*"))) == 1


def test_mailbox_path_problem_accepts_relative_paths(config, monkeypatch):
    mailbox = make_account(config, "relative1")
    monkeypatch.chdir(config.mailboxes_dir)
    assert mailbox_path_problem(mailbox.name) is None
    assert mailbox_path_problem(f"../{config.mail_domain}/{mailbox.name}") is None
    assert mailbox_path_problem(".") is not None


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads unreadable directories")
def test_unreadable_mailbox_is_skipped(config, capsys):
    locked = make_account(config, "locked123", last_login_days=100)
    other = make_account(config, "other1234", last_login_days=100)
    locked.chmod(0)
    try:
        run_expire(config, "--remove")
    finally:
        locked.chmod(0o700)
    assert locked.exists() and not other.exists()
    assert "cannot read it" in capsys.readouterr().err
