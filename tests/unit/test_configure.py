import os
import sys
import types

import pytest

from chatmaild.admin.configure import (
    STEPS,
    ConfigureFailed,
    InvalidConfiguration,
    apply_configuration,
    configure,
    platform_service,
    relay_settings,
)
from chatmaild.admin.host import Host
from chatmaild.admin.platform import load_platform
from chatmaild.admin.reloads import ConfigureState
from tests.conftest import REPO

SHELL_STEPS = ["dkim-key", "tls-certificate", "acme-certificate"]


def write_shell_steps(data_dir, bodies):
    """data_dir/steps/NAME for each NAME: BODY of bodies."""
    folder = data_dir / "steps"
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in bodies.items():
        path = folder / name
        path.write_text("#!/bin/sh\nset -e\n" + body)
        path.chmod(0o755)


def test_shell_steps_run_in_order_with_their_settings_in_the_environment(tmp_path, config,
                                                                        capsys):
    log = tmp_path / "log"
    write_shell_steps(tmp_path, {
        "dkim-key": f'echo "dkim $CHATMAIL_MAIL_DOMAIN $PLATFORM_DKIM_KEY_DIR" >> {log}\n',
        "tls-certificate": f'echo "tls $CHATMAIL_TLS_CERT_MODE $CHATMAIL_DATA_DIR" >> {log}\n',
        "acme-certificate": f'echo "acme [$CHATMAIL_NO_RELOAD]" >> {log}\n',
    })
    configure(config, load_platform("debian12"), Host(data_dir=tmp_path), no_reload=True,
              steps=SHELL_STEPS)
    assert log.read_text().splitlines() == [
        "dkim chat.example.org /etc/dkimkeys", f"tls acme {tmp_path}", "acme [1]"]
    assert capsys.readouterr().out.splitlines() == [
        f"chatmail configure: {name}" for name in SHELL_STEPS]


def test_a_failing_step_stops_the_run(tmp_path, config):
    write_shell_steps(tmp_path, {"dkim-key": "exit 7\n",
                                 "tls-certificate": f"touch {tmp_path}/ran\n"})
    with pytest.raises(ConfigureFailed, match="^dkim-key: .*exit status 7") as failed:
        configure(config, load_platform("debian12"), Host(data_dir=tmp_path),
                  steps=["dkim-key", "tls-certificate"])
    assert "nothing after this step was done" in str(failed.value)
    assert not (tmp_path / "ran").exists()


def test_unknown_step_names_are_refused(config):
    with pytest.raises(ValueError, match="no such steps: dkim"):
        configure(config, load_platform("debian12"), steps=["dkim"])


@pytest.mark.parametrize("platform_name, dovecot", [("debian12", "dovecot"),
                                                    ("alpine", "chatmail-dovecot")])
def test_reload_names_the_service_that_runs_the_daemon_here(platform_name, dovecot):
    """certbot's deploy hook asks for `--reload dovecot` on every system."""
    platform = load_platform(platform_name)
    assert [platform_service(platform, name) for name in ["postfix", "dovecot", "nginx"]] \
        == ["postfix", dovecot, "nginx"]


def test_relay_settings_for_an_ipv4_relay(make_config):
    env = relay_settings(make_config("203.0.113.5"))
    assert env["CHATMAIL_MAIL_DOMAIN"] == "203.0.113.5"
    assert env["CHATMAIL_IPV4_RELAY"] == "203.0.113.5"
    assert env["CHATMAIL_TLS_CERT_MODE"] == "self"


def test_the_shell_steps_are_the_packaged_ones_and_executable():
    folder = REPO / "steps"
    shell = sorted(p.name for p in folder.iterdir() if p.name != "functions.sh")
    assert shell == sorted(SHELL_STEPS)
    assert set(SHELL_STEPS) < set(STEPS)
    for name in shell:
        step = folder / name
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


def test_apply_configuration_writes_and_says_what_to_reload(demo_data_dir, config, capsys):
    result = apply_configuration(config, load_platform("debian12"))
    assert (demo_data_dir / "etc/demo.conf").read_text() == "limit = 31457280\n"
    assert (result.reload, result.restart) == ({"demo"}, set())
    assert "updated" in capsys.readouterr().out
    # Nothing changed: nothing to reload.
    assert apply_configuration(config, load_platform("debian12")).reload == set()


def test_invalid_configuration_changes_nothing(demo_data_dir, make_config, monkeypatch):
    def validate(files, platform):
        return [f"{f.path}: bad limit" for f in files if "limit = 1\n" == f.content]

    monkeypatch.setitem(sys.modules, "chatmaild.admin.components.demo",
                        types.SimpleNamespace(validate=validate))
    apply_configuration(make_config(), load_platform("debian12"))
    bad = make_config(max_message_size="1")
    with pytest.raises(InvalidConfiguration, match="bad limit"):
        apply_configuration(bad, load_platform("debian12"))
    assert (demo_data_dir / "etc/demo.conf").read_text() == "limit = 31457280\n"


def test_a_changed_unit_dropin_asks_for_a_restart(demo_data_dir, config):
    (demo_data_dir / "data/conf/demo/targets.toml").write_text(
        '[[file]]\ntemplate = "a.j2"\npath = "{etc}/demo.conf"\nrestart = ["demo"]\n')
    result = apply_configuration(config, load_platform("debian12"))
    assert (result.reload, result.restart) == (set(), {"demo"})


def test_state_of_older_versions_is_taken_over(tmp_path):
    """Versions before one pipeline kept the pending restarts and chatmail.ini's hash in
    two files of their own."""
    (tmp_path / "pending-restarts").write_text("dovecot\npostfix\n")
    (tmp_path / "chatmail.ini.sha256").write_text("abc\n")
    state = ConfigureState.load(tmp_path)
    assert (state.ini_sha256, state.pending_restarts) == ("abc", {"dovecot", "postfix"})
    state.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configure-state.json"]
    assert ConfigureState.load(tmp_path) == state
