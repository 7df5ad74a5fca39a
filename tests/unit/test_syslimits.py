import logging

from chatmaild import syslimits
from chatmaild.syslimits import existing_ancestor, has_sufficient_resources, read_or_none

PERMISSIVE = {"max_load_1m": "99999", "min_available_memory": "0", "min_free_disk_space": "0"}
HUGE = "99999999G"


def test_permissive_limits_allow_creation(make_config, caplog):
    caplog.set_level(logging.INFO)
    assert has_sufficient_resources(make_config(**PERMISSIVE))
    assert "registration rejected" not in caplog.text


def test_each_exceeded_limit_rejects_with_its_reason(make_config, caplog):
    for setting, reason in (
        ({"max_load_1m": "-1"}, "load avg "),
        ({"min_available_memory": HUGE}, "available memory "),
        ({"min_free_disk_space": HUGE}, "free disk "),
    ):
        caplog.clear()
        assert not has_sufficient_resources(make_config(**(PERMISSIVE | setting))), setting
        assert f"registration rejected: {reason}" in caplog.text


def test_default_limits_are_upstreams(config):
    assert (config.max_load_1m, config.min_available_memory_mb, config.min_free_disk_space_mb) == (
        5.0, 200, 1024)


def test_missing_mailboxes_dir_checks_the_file_system_it_will_be_on(make_config, caplog):
    config = make_config(**(PERMISSIVE | {"min_free_disk_space": HUGE}))
    config.mailboxes_dir.rmdir()
    assert not has_sufficient_resources(config)
    assert "registration rejected: free disk" in caplog.text


def test_existing_ancestor(tmp_path):
    assert existing_ancestor(tmp_path) == tmp_path
    assert existing_ancestor(tmp_path / "a" / "b") == tmp_path
    assert existing_ancestor("/nonexistent-dir/x") == existing_ancestor("/")


def test_unreadable_value_is_ignored_with_a_warning(caplog):
    def unreadable():
        raise OSError("no /proc")

    assert read_or_none("load", unreadable) is None
    assert "ignoring unreadable system limit load: no /proc" in caplog.text
    assert read_or_none("load", lambda: 1.5) == 1.5


def test_readers_return_numbers(tmp_path):
    assert syslimits.load_1m() >= 0
    assert syslimits.available_memory_mb() > 0
    assert syslimits.free_disk_mb(tmp_path) > 0
