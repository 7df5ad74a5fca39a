"""`chatmail dkim rotate` and `status`: keys made by the real opendkim-genkey, their
records looked up in a real DNS server (NSD), OpenDKIM's tables rendered from the list
of keys."""

import os
import pwd
import re
import shutil
import stat
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from chatmaild.admin import dkimrotate
from chatmaild.admin import dns as relay_dns
from chatmaild.admin import dnscheck, dnsrecords
from chatmaild.admin.cli import main
from chatmaild.admin.dkimrotate import DomainKeys, Rotation, RotationError
from chatmaild.admin.host import Host
from chatmaild.admin.platform import load_platform
from chatmaild.admin.render import render_component

from .nsd import nsd  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(not shutil.which("opendkim-genkey", path="/usr/sbin:/usr/bin"),
                                reason="needs opendkim-genkey (apt install opendkim-tools)")

DOMAIN = "chat.example.org"
REPO = Path(__file__).resolve().parents[2]
DAY = 86400
START = 1_796_000_000  # 2026-11-30 00:53:20 UTC


@pytest.fixture
def platform(tmp_path, config):
    """Debian 12's facts with the key directory and the state directory in tmp_path; the
    install key <domain>.private made as steps/dkim-key makes it."""
    facts = vars(load_platform("debian12")).copy()
    facts.update(dkim_key_dir=str(tmp_path / "dkimkeys"), state_dir=str(tmp_path / "state"))
    for name in ("dkimkeys", "state"):
        (tmp_path / name).mkdir()
    platform = SimpleNamespace(**facts)
    install_key = tmp_path / "dkimkeys" / f"{DOMAIN}.private"
    dkimrotate.make_key(Host(), platform, dkimrotate.install_key(config, platform))
    assert install_key.exists()
    return platform


@pytest.fixture
def zone(nsd):
    """zone(records) -> a resolver factory asking an NSD that serves the domain with
    these zone lines."""
    def serve(records=""):
        server = nsd(DOMAIN, records)
        return lambda: dnscheck.Resolver(DOMAIN + ".", ["127.0.0.1"], server.port)
    return serve


class Clock:
    def __init__(self, now=START):
        self.now = now

    def __call__(self):
        return self.now


def rotation(config, platform, resolver, **options):
    lines = []
    run = Rotation(config, platform, Host(), resolver, out=lines.append, **options)
    run.lines = lines
    return run


def tables(config, platform):
    rendered = {item.path: item.content for item in render_component("opendkim", config,
                                                                       platform)}
    return (rendered[f"{platform.dkim_key_dir}/KeyTable"].split(),
            rendered[f"{platform.dkim_key_dir}/SigningTable"].split())


def pending_record(run):
    """The zone line the rotation asked to publish."""
    return next(line for line in run.lines if "._domainkey." in line and " TXT " in line)


def test_until_the_first_rotation_nothing_changes(config, platform, tmp_path):
    keys = DomainKeys.load(config, platform, Host())
    assert keys.active == dkimrotate.DkimKey(DOMAIN, "opendkim", "active", 0,
                                             f"{platform.dkim_key_dir}/{DOMAIN}.private")
    assert (keys.pending, keys.retired) == (None, ())
    assert tables(config, platform) == (
        [f"opendkim._domainkey.{DOMAIN}",
         f"{DOMAIN}:opendkim:{platform.dkim_key_dir}/{DOMAIN}.private"],
        [f"*@{DOMAIN}", f"opendkim._domainkey.{DOMAIN}"])
    assert not (tmp_path / "state" / "dkim-keys").exists()


def test_a_new_key_waits_for_its_record_then_the_relay_switches(config, platform, zone):
    clock = Clock()
    run = rotation(config, platform, zone(""), now=clock)
    assert run.rotate() is False
    selector = "dkim20261130"
    new_key = f"{platform.dkim_key_dir}/{DOMAIN}.{selector}.private"
    made = os.stat(new_key)
    assert (stat.S_IMODE(made.st_mode), made.st_uid) == (0o600, pwd.getpwnam("opendkim").pw_uid)
    record = pending_record(run)
    assert record.startswith(f"{selector}._domainkey.{DOMAIN}.")
    assert f'"v=DKIM1;k=rsa;p={dnsrecords.dkim_public_key(new_key)[:200]}' in record
    assert "DNS does not serve the new record yet" in "\n".join(run.lines)
    # the relay goes on signing with the install key
    assert tables(config, platform)[1] == [f"*@{DOMAIN}", f"opendkim._domainkey.{DOMAIN}"]
    keys = DomainKeys.load(config, platform, Host())
    assert (keys.active.selector, keys.pending.selector, keys.pending.since) == (
        "opendkim", selector, START)

    clock.now += 3600
    published = zone(record)
    run = rotation(config, platform, published, now=clock)
    assert run.rotate() is True
    assert tables(config, platform) == (
        [f"{selector}._domainkey.{DOMAIN}", f"{DOMAIN}:{selector}:{new_key}"],
        [f"*@{DOMAIN}", f"{selector}._domainkey.{DOMAIN}"])
    keys = DomainKeys.load(config, platform, Host())
    assert (keys.active.selector, keys.active.since, keys.pending) == (selector, START + 3600,
                                                                     None)
    [old] = keys.retired
    assert (old.selector, old.path, old.removable_after) == (
        "opendkim", f"{platform.dkim_key_dir}/{DOMAIN}.private", START + 3600 + 7 * DAY)
    assert "Keep the record opendkim._domainkey.chat.example.org. until 2026-12-07T01:53:20Z," in (
        run.lines[-1])


def test_the_configure_step_switches_only_once_dns_serves_the_record(config, platform, zone):
    run = rotation(config, platform, zone(""), now=Clock())
    run.rotate()
    record = pending_record(run)
    assert rotation(config, platform, zone(""), now=Clock()).complete() is False
    assert DomainKeys.load(config, platform, Host()).pending is not None
    # a record with another key does not count
    other = re.sub(r"p=[A-Za-z0-9+/]{20}", "p=AAAAAAAAAAAAAAAAAAAA", record)
    assert rotation(config, platform, zone(other), now=Clock()).complete() is False
    assert rotation(config, platform, zone(record), now=Clock()).complete() is True
    assert DomainKeys.load(config, platform, Host()).active.selector == "dkim20261130"


def test_nothing_pending_asks_no_dns(config, platform):
    def no_dns():
        raise AssertionError("DNS asked without a pending rotation")
    assert rotation(config, platform, no_dns).complete() is False


def test_now_switches_at_once_and_a_second_rotation_the_same_day_gets_its_own_selector(
        config, platform):
    no_dns = None
    clock = Clock()
    assert rotation(config, platform, no_dns, now=clock).rotate(now_switch=True) is True
    clock.now += 60
    assert rotation(config, platform, no_dns, now=clock).rotate(now_switch=True) is True
    keys = DomainKeys.load(config, platform, Host())
    assert keys.active.selector == "dkim20261130-2"
    assert [key.selector for key in keys.retired] == ["opendkim", "dkim20261130"]
    assert tables(config, platform)[1] == [f"*@{DOMAIN}",
                                           f"dkim20261130-2._domainkey.{DOMAIN}"]


def test_dry_run_changes_nothing(config, platform, tmp_path):
    before = sorted(p.name for p in (tmp_path / "dkimkeys").iterdir())
    run = rotation(config, platform, None, dry_run=True, now=Clock())
    assert run.rotate(now_switch=True) is False
    assert run.lines == [f"Would make a new DKIM key with selector dkim20261130 "
                         f"({platform.dkim_key_dir}/{DOMAIN}.dkim20261130.private); "
                         "nothing changed (--dry-run)."]
    assert sorted(p.name for p in (tmp_path / "dkimkeys").iterdir()) == before
    assert not (tmp_path / "state" / "dkim-keys").exists()


def test_dry_run_of_a_pending_rotation_does_not_switch(config, platform, zone):
    run = rotation(config, platform, zone(""), now=Clock())
    run.rotate()
    record = pending_record(run)
    run = rotation(config, platform, zone(record), dry_run=True, now=Clock())
    assert run.rotate() is False
    assert "Would switch signing from opendkim to dkim20261130" in run.lines[-1]
    assert DomainKeys.load(config, platform, Host()).active.selector == "opendkim"


def test_refused_without_a_key_or_for_an_ipv4_relay(config, make_config, platform):
    os.unlink(f"{platform.dkim_key_dir}/{DOMAIN}.private")
    with pytest.raises(RotationError, match="does not exist; run 'chatmail configure'"):
        rotation(config, platform, None).rotate()
    with pytest.raises(RotationError, match="IPv4 address"):
        rotation(make_config("203.0.113.5"), platform, None).rotate()


def test_keys_of_another_domain_are_kept(config, make_config, platform):
    other = make_config("old.example.org")
    shutil.copy(f"{platform.dkim_key_dir}/{DOMAIN}.private",
                f"{platform.dkim_key_dir}/old.example.org.private")
    rotation(other, platform, None, now=Clock()).rotate(now_switch=True)
    rotation(config, platform, None, now=Clock()).rotate(now_switch=True)
    listed = dkimrotate.read_key_lines(dkimrotate.keys_file(platform, Host()))
    assert sorted((key.domain, key.selector, key.state) for key in listed) == [
        (DOMAIN, "dkim20261130", "active"), (DOMAIN, "opendkim", "retired"),
        ("old.example.org", "dkim20261130", "active"), ("old.example.org", "opendkim",
                                                       "retired")]


def test_status_and_dns_say_when_the_old_record_may_go(config, platform, zone, capsys):
    clock = Clock()
    run = rotation(config, platform, zone(""), now=clock)
    run.rotate()
    keys = DomainKeys.load(config, platform, Host())
    assert dkimrotate.status_lines(keys, START)[1] == (
        "pending: selector dkim20261130 since 2026-11-30T00:53:20Z, waiting for its DNS "
        f"record dkim20261130._domainkey.{DOMAIN}.")
    facts = relay_dns.gather_facts(config, ipv4=["203.0.113.5"], dkim_key=keys.active.path,
                                   dkim_keys=keys)
    records = {record.name: record for record in dnsrecords.relay_records(config, facts)}
    # both records are required while the rotation is pending
    assert records[f"opendkim._domainkey.{DOMAIN}."].required
    assert records[f"dkim20261130._domainkey.{DOMAIN}."].required

    run.rotate(now_switch=True)
    keys = DomainKeys.load(config, platform, Host())
    week_later = keys.active.since + 7 * DAY
    assert dkimrotate.status_lines(keys, week_later - 1)[1] == (
        f"retired: selector opendkim: keep its record opendkim._domainkey.{DOMAIN}. until "
        "2026-12-07T00:53:20Z")
    assert dkimrotate.status_lines(keys, week_later)[1].endswith(
        "is no longer needed since 2026-12-07T00:53:20Z: remove it")
    facts = relay_dns.gather_facts(config, ipv4=["203.0.113.5"], dkim_key=keys.active.path,
                                   dkim_keys=keys)
    records = dnsrecords.relay_records(config, facts)
    assert [r.name for r in records if r.kind == "dkim"] == [
        f"dkim20261130._domainkey.{DOMAIN}."]
    notes = dnsrecords.retired_dkim_notes(keys.retired, week_later)
    assert notes == ["", f"; No longer needed, remove it: opendkim._domainkey.{DOMAIN}. TXT "
                         "(the key it names was replaced; since 2026-12-07 00:53 UTC)"]


def test_help_and_status_commands(config, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["dkim", "rotate", "--help"])
    assert exited.value.code == 0
    assert "--now" in capsys.readouterr().out


def test_chatmail_status_shows_the_selector_and_a_pending_rotation(config, platform, zone):
    from chatmaild.admin.status import WARN, check_dkim

    [selector] = check_dkim(config, platform, Host())
    assert selector.detail == f"opendkim ({platform.dkim_key_dir}/{DOMAIN}.private)"
    rotation(config, platform, zone(""), now=Clock()).rotate()
    selector, pending = check_dkim(config, platform, Host())
    assert selector.detail.startswith("opendkim ")
    assert pending.level == WARN
    assert pending.detail == ("new key dkim20261130 waits since 2026-11-30T00:53:20Z for its "
                              f"DNS record dkim20261130._domainkey.{DOMAIN}.")


def switched_a_week_ago(config, platform, clock):
    """The install key replaced (--now) at clock's time, then 7 days pass: (the replaced
    key's path, the new selector)."""
    assert rotation(config, platform, None, now=clock).rotate(now_switch=True) is True
    keys = DomainKeys.load(config, platform, Host())
    clock.now = keys.retired[0].removable_after
    return keys.retired[0].path, keys.active.selector


def test_daily_deletes_a_retired_key_once_its_grace_period_is_over(config, platform):
    clock = Clock()
    old_key, selector = switched_a_week_ago(config, platform, clock)
    clock.now -= 1
    early = rotation(config, platform, None, now=clock)
    assert early.daily() is False
    assert os.path.exists(old_key) and early.lines == []
    clock.now += 1
    dry = rotation(config, platform, None, now=clock, dry_run=True)
    dry.daily()
    assert os.path.exists(old_key) and "nothing changed (--dry-run)" in dry.lines[0]
    run = rotation(config, platform, None, now=clock)
    assert run.daily() is False
    assert not os.path.exists(old_key)
    assert run.lines == [f"Deleted the retired DKIM key {old_key} (selector opendkim): its "
                         "grace period ended 2026-12-07T00:53:20Z. Remove its record "
                         f"opendkim._domainkey.{DOMAIN}. if it is still published."]
    # the new key signs on; the replaced one stays listed, so status still names its record
    keys = DomainKeys.load(config, platform, Host())
    assert os.path.exists(keys.active.path) and keys.active.selector == selector
    assert dkimrotate.status_lines(keys, clock.now)[1].endswith(": remove it")
    assert rotation(config, platform, None, now=clock).prune() == []


def test_daily_switches_once_dns_serves_the_pending_record(config, platform, zone):
    run = rotation(config, platform, zone(""), now=Clock())
    run.rotate()
    record = pending_record(run)
    assert rotation(config, platform, zone(""), now=Clock()).daily() is False
    assert rotation(config, platform, zone(record), now=Clock()).daily() is True
    keys = DomainKeys.load(config, platform, Host())
    assert (keys.active.selector, [key.selector for key in keys.retired]) == (
        "dkim20261130", ["opendkim"])
    # the install key stays through its grace period
    assert os.path.exists(keys.retired[0].path)


def run_dkim_key_step(config, platform):
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CHATMAIL_DATA_DIR": str(REPO),
           "CHATMAIL_MAIL_DOMAIN": DOMAIN, "CHATMAIL_IPV4_RELAY": "",
           "PLATFORM_DKIM_KEY_DIR": platform.dkim_key_dir,
           "PLATFORM_STATE_DIR": platform.state_dir,
           "PLATFORM_OPENDKIM_USER": platform.opendkim_user}
    return subprocess.run([str(REPO / "steps" / "dkim-key")], env=env, check=True,
                          capture_output=True, text=True).stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="the step gives the key to opendkim")
def test_the_install_key_deleted_after_a_rotation_is_not_made_again(config, platform):
    clock = Clock()
    old_key, _ = switched_a_week_ago(config, platform, clock)
    rotation(config, platform, None, now=clock).daily()
    assert run_dkim_key_step(config, platform) == ""
    assert not os.path.exists(old_key)
    # without a rotation the step makes the key, as on a new relay
    os.unlink(dkimrotate.keys_file(platform, Host()))
    assert "making a DKIM key" in run_dkim_key_step(config, platform)
    assert os.path.exists(old_key)


def test_daily_command_answers_help(config, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["dkim", "daily", "--help"])
    assert exited.value.code == 0
    assert "never starts a rotation" in capsys.readouterr().out
