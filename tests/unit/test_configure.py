import os
import stat

import pytest

from chatmaild.admin.configure import (
    StepFailed,
    apply_configuration,
    list_steps,
    relay_settings,
    run_steps,
)
from chatmaild.admin.platform import load_platform


def write_step(folder, name, body):
    path = folder / name
    path.write_text("#!/bin/sh\nset -e\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_steps_run_in_order_with_settings_in_the_environment(tmp_path, config):
    steps = tmp_path / "steps"
    steps.mkdir()
    log = tmp_path / "log"
    write_step(steps, "20-second", f'echo "second $CHATMAIL_MAIL_DOMAIN" >> {log}\n')
    write_step(steps, "10-first", f'echo "first $PLATFORM_VMAIL_USER $CHATMAIL_TLS_CERT_MODE" >> {log}\n'
               f'echo "$CHATMAIL_INI" >> {log}\n')
    write_step(steps, "README", "exit 1\n")  # not a step name: ignored
    write_step(steps, "15-reload-list", f'test -f "$CHATMAIL_RELOAD_LIST"\necho listed >> {log}\n')
    run_steps(config, load_platform("debian12"), folder=steps, out=open(os.devnull, "w"))
    assert log.read_text().splitlines() == [
        "first vmail acme", str(config.inipath), "listed", "second chat.example.org"]


@pytest.mark.parametrize("platform_name, dovecot", [("debian12", "dovecot"),
                                                    ("alpine", "chatmail-dovecot")])
def test_reload_names_the_service_that_runs_the_daemon_here(tmp_path, config,
                                                           platform_name, dovecot):
    """certbot's deploy hook asks for `--reload dovecot` on every system."""
    steps = tmp_path / "steps"
    steps.mkdir()
    listed = tmp_path / "listed"
    write_step(steps, "10-list", f'cp "$CHATMAIL_RELOAD_LIST" {listed}\n')
    run_steps(config, load_platform(platform_name), reload=["postfix", "dovecot", "nginx"],
              folder=steps, out=open(os.devnull, "w"))
    assert listed.read_text().split() == ["postfix", dovecot, "nginx"]


def test_a_failing_step_stops_the_run(tmp_path, config):
    steps = tmp_path / "steps"
    steps.mkdir()
    write_step(steps, "10-fails", "exit 7\n")
    write_step(steps, "20-never", f"touch {tmp_path}/ran\n")
    with pytest.raises(StepFailed, match="10-fails failed \\(exit status 7\\)"):
        run_steps(config, load_platform("debian12"), folder=steps, out=open(os.devnull, "w"))
    assert not (tmp_path / "ran").exists()


def test_relay_settings_for_an_ipv4_relay(make_config):
    env = relay_settings(make_config("203.0.113.5"))
    assert env["CHATMAIL_MAIL_DOMAIN"] == "203.0.113.5"
    assert env["CHATMAIL_MAIL_DOMAIN_FULL"] == "[203.0.113.5]"
    assert env["CHATMAIL_IPV4_RELAY"] == "203.0.113.5"
    assert env["CHATMAIL_TLS_CERT_MODE"] == "self"


def test_real_steps_are_named_and_executable():
    steps = list_steps()
    assert steps, "postinst.d/ has no steps"
    for step in steps:
        assert os.access(step, os.X_OK), f"{step} is not executable"
        assert step.read_text().startswith("#!/bin/sh\n"), f"{step}: POSIX sh expected"


@pytest.fixture
def demo_data_dir(tmp_path, monkeypatch):
    """A conf/ with one component whose validate() rejects a marker value."""
    conf = tmp_path / "data" / "conf"
    (conf / "demo").mkdir(parents=True)
    (conf / "platform.toml").write_text(
        f'[debian12]\nname = "x"\nstate_dir = "{tmp_path}/state"\netc = "{tmp_path}/etc"\n')
    (conf / "demo" / "targets.toml").write_text(
        '[[file]]\ntemplate = "a.j2"\npath = "{etc}/demo.conf"\nreload = ["demo"]\n')
    (conf / "demo" / "a.j2").write_text("limit = {{ config.max_message_size }}\n")
    monkeypatch.setenv("CHATMAIL_DATA_DIR", str(tmp_path / "data"))
    return tmp_path


def test_apply_configuration_writes_and_lists_services(demo_data_dir, config, capsys):
    reload_list = demo_data_dir / "reload"
    assert apply_configuration(config, load_platform("debian12"), reload_list) == 0
    assert (demo_data_dir / "etc/demo.conf").read_text() == "limit = 31457280\n"
    assert reload_list.read_text() == "demo\n"
    assert "updated" in capsys.readouterr().out


def test_invalid_configuration_changes_nothing(demo_data_dir, make_config, monkeypatch, capsys):
    import types
    import sys

    def validate(files, platform):
        return [f"{f.path}: bad limit" for f in files if "limit = 1\n" == f.content]

    monkeypatch.setitem(sys.modules, "chatmaild.admin.components.demo",
                        types.SimpleNamespace(validate=validate))
    good = make_config()
    assert apply_configuration(good, load_platform("debian12")) == 0
    bad = make_config(max_message_size="1")
    assert apply_configuration(bad, load_platform("debian12")) == 1
    assert (demo_data_dir / "etc/demo.conf").read_text() == "limit = 31457280\n"
    assert "bad limit" in capsys.readouterr().err


def test_restart_list_for_changed_unit_dropins(demo_data_dir, config):
    (demo_data_dir / "data/conf/demo/targets.toml").write_text(
        '[[file]]\ntemplate = "a.j2"\npath = "{etc}/demo.conf"\nrestart = ["demo"]\n')
    reload_list = demo_data_dir / "reload"
    apply_configuration(config, load_platform("debian12"), reload_list)
    assert reload_list.read_text() == ""
    assert (demo_data_dir / "state/pending-restarts").read_text() == "demo\n"
