import tomllib

import pytest

from chatmaild.admin.platform import PlatformError, detect_platform, load_platform, platform_names
from chatmaild.admin.render import RenderError, render_all, render_component
from tests.conftest import REPO


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    (conf / "demo").mkdir(parents=True)
    (conf / "platform.toml").write_text(
        '[debian12]\nname = "Debian 12"\netc = "/etc"\nvmail_user = "vmail"\n'
        '[alpine]\nname = "Alpine"\netc = "/etc"\nvmail_user = "vmail"\n')
    monkeypatch.setenv("CHATMAIL_DATA_DIR", str(tmp_path))
    return conf


def write_demo(conf, targets, templates):
    (conf / "demo" / "targets.toml").write_text(targets)
    for name, text in templates.items():
        (conf / "demo" / name).write_text(text)


def test_renders_with_config_and_platform(data_dir, config):
    write_demo(data_dir, '''
[[file]]
template = "a.j2"
path = "{etc}/demo/a.conf"
mode = "0640"
group = "{vmail_user}"
reload = ["demo"]

[[file]]
template = "b.j2"
path = "{etc}/demo/b.conf"
when = "config.ipv4_relay"
''', {"a.j2": "domain = {{ config.mail_domain }}\nos = {{ platform.name }}\n",
      "b.j2": "only for IPv4 relays\n"})
    [item] = render_component("demo", config, load_platform("debian12"))
    assert item.path == "/etc/demo/a.conf"
    assert item.content == "domain = chat.example.org\nos = Debian 12\n"
    assert (item.mode, item.owner, item.group, item.reload) == (0o640, "root", "vmail", ["demo"])


def test_undefined_variable_is_an_error(data_dir, config):
    write_demo(data_dir, '[[file]]\ntemplate = "a.j2"\npath = "/x"\n',
               {"a.j2": "{{ config.no_such_setting }}"})
    with pytest.raises(RenderError, match="conf/demo/a.j2"):
        render_component("demo", config, load_platform("debian12"))


def test_unknown_platform_fact_in_path(data_dir, config):
    write_demo(data_dir, '[[file]]\ntemplate = "a.j2"\npath = "{nope}/x"\n', {"a.j2": ""})
    with pytest.raises(RenderError, match="nope"):
        render_component("demo", config, load_platform("debian12"))


def test_two_components_may_not_write_one_path(data_dir, config):
    write_demo(data_dir, '[[file]]\ntemplate = "a.j2"\npath = "/x"\n', {"a.j2": ""})
    (data_dir / "other").mkdir()
    (data_dir / "other" / "targets.toml").write_text('[[file]]\ntemplate = "a.j2"\npath = "/x"\n')
    (data_dir / "other" / "a.j2").write_text("")
    with pytest.raises(RenderError, match="both demo and other"):
        render_all(config, load_platform("debian12"))


def test_platforms(data_dir):
    assert platform_names() == ["alpine", "debian12"]
    with pytest.raises(PlatformError, match="unknown platform 'gentoo'"):
        load_platform("gentoo")


@pytest.mark.parametrize("text,expected", [
    ('ID=debian\nVERSION_ID="12"\n', "debian12"),
    ('ID=debian\nVERSION_ID="13"\n', "debian13"),
    ('ID=alpine\nVERSION_ID=3.22.1\n', "alpine"),
])
def test_detect_platform(tmp_path, text, expected):
    path = tmp_path / "os-release"
    path.write_text(text)
    assert detect_platform(path) == expected


def test_detect_unsupported(tmp_path):
    path = tmp_path / "os-release"
    path.write_text('ID=ubuntu\nVERSION_ID="24.04"\n')
    with pytest.raises(PlatformError, match="unsupported system ubuntu 24.04"):
        detect_platform(path)


def test_real_platform_table_is_complete():
    """Every platform defines the same facts, so no template works on one only."""
    assert platform_names() == ["alpine", "debian12", "debian13"]
    keys = {name: set(vars(load_platform(name))) for name in platform_names()}
    first = keys[platform_names()[0]]
    for name, facts in keys.items():
        assert facts == first, f"{name}: missing {first - facts}, extra {facts - first}"


def test_real_platform_table_writes_each_fact_once():
    """No table repeats a fact it inherits, and [common] holds only what no platform
    changes: a fact to change is in one place."""
    with open(REPO / "conf" / "platform.toml", "rb") as f:
        tables = tomllib.load(f)
    for name, table in tables.items():
        inherited = {**tables["common"], **tables.get(table.get("base"), {})}
        if name == "common":
            continue
        repeated = [key for key, value in table.items()
                    if key in inherited and inherited[key] == value]
        assert not repeated, f"[{name}] repeats what it inherits: {repeated}"
    overridden = [key for key in tables["common"]
                  if any(key in table for name, table in tables.items() if name != "common")]
    assert not overridden, f"[common] facts some platform changes: {overridden}"


def test_platform_inherits_common_then_base(data_dir):
    (data_dir / "platform.toml").write_text(
        '[common]\netc = "/etc"\nuser = "vmail"\n[family]\nuser = "mail"\n'
        '[one]\nname = "One"\nbase = "family"\netc = "/usr/etc"\n[two]\nname = "Two"\n')
    assert platform_names() == ["one", "two"]
    one = load_platform("one")
    assert (one.etc, one.user, one.name) == ("/usr/etc", "mail", "One")
    assert not hasattr(one, "base")
    assert (load_platform("two").etc, load_platform("two").user) == ("/etc", "vmail")
