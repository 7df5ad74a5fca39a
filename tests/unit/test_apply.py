import os

from chatmaild.admin.apply import NEW_SUFFIX, GeneratedFiles, apply_files, remove_generated
from chatmaild.admin.render import RenderedFile

STATE = "/var/lib/chatmail-relay"


def item(path, content, **kw):
    return RenderedFile(component="demo", path=path, content=content, **kw)


def test_creates_then_leaves_unchanged(tmp_path):
    first = apply_files([item("/etc/demo/a.conf", "one\n", mode=0o640, reload=["demo"])],
                        STATE, root=tmp_path)
    target = tmp_path / "etc/demo/a.conf"
    assert target.read_text() == "one\n"
    assert target.stat().st_mode & 0o777 == 0o640
    assert first.changed == ["/etc/demo/a.conf"] and first.reload == {"demo"}
    again = apply_files([item("/etc/demo/a.conf", "one\n", mode=0o640, reload=["demo"])],
                        STATE, root=tmp_path)
    assert again.changed == [] and again.reload == set()


def test_updates_a_file_nobody_edited(tmp_path):
    apply_files([item("/etc/a.conf", "one\n")], STATE, root=tmp_path)
    result = apply_files([item("/etc/a.conf", "two\n", reload=["x"])], STATE, root=tmp_path)
    assert (tmp_path / "etc/a.conf").read_text() == "two\n"
    assert result.changed == ["/etc/a.conf"] and result.reload == {"x"}


def test_keeps_an_admins_edit_and_proposes_ours(tmp_path):
    apply_files([item("/etc/a.conf", "one\n")], STATE, root=tmp_path)
    (tmp_path / "etc/a.conf").write_text("one\n# my tweak\n")
    result = apply_files([item("/etc/a.conf", "two\n", reload=["x"])], STATE, root=tmp_path)
    assert (tmp_path / "etc/a.conf").read_text() == "one\n# my tweak\n"
    assert (tmp_path / ("etc/a.conf" + NEW_SUFFIX)).read_text() == "two\n"
    assert result.kept == ["/etc/a.conf"] and result.changed == [] and not result.reload


def test_does_not_overwrite_a_file_it_did_not_write(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/a.conf").write_text("the admin's own\n")
    result = apply_files([item("/etc/a.conf", "ours\n")], STATE, root=tmp_path)
    assert (tmp_path / "etc/a.conf").read_text() == "the admin's own\n"
    assert result.kept == ["/etc/a.conf"]


def test_proposal_goes_away_once_merged(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/a.conf").write_text("the admin's own\n")
    apply_files([item("/etc/a.conf", "ours\n")], STATE, root=tmp_path)
    (tmp_path / "etc/a.conf").write_text("ours\n")  # the admin took our version
    apply_files([item("/etc/a.conf", "ours\n")], STATE, root=tmp_path)
    assert not (tmp_path / ("etc/a.conf" + NEW_SUFFIX)).exists()
    # ...and from now on it is ours to update
    apply_files([item("/etc/a.conf", "ours v2\n")], STATE, root=tmp_path)
    assert (tmp_path / "etc/a.conf").read_text() == "ours v2\n"


def test_damaged_record_never_overwrites(tmp_path):
    apply_files([item("/etc/a.conf", "one\n")], STATE, root=tmp_path)
    (tmp_path / STATE.lstrip("/") / "generated.json").write_text("{broken")
    result = apply_files([item("/etc/a.conf", "two\n")], STATE, root=tmp_path)
    assert (tmp_path / "etc/a.conf").read_text() == "one\n" and result.kept


def test_purge_removes_what_we_generated_only(tmp_path):
    apply_files([item("/etc/a.conf", "one\n"), item("/etc/b.conf", "b\n")], STATE, root=tmp_path)
    (tmp_path / "etc/other.conf").write_text("not ours\n")
    (tmp_path / "etc/b.conf").write_text("edited\n")
    removed = remove_generated(STATE, root=tmp_path)
    assert removed == ["/etc/a.conf", "/etc/b.conf"]
    assert sorted(os.listdir(tmp_path / "etc")) == ["other.conf"]
    assert GeneratedFiles(tmp_path / STATE.lstrip("/")).hashes == {}


def test_plain_list_of_generated_files_for_the_postrm(tmp_path):
    apply_files([item("/etc/b.conf", "b\n"), item("/etc/a.conf", "a\n")], STATE, root=tmp_path)
    listing = tmp_path / STATE.lstrip("/") / "generated.list"
    assert listing.read_text() == "/etc/a.conf\n/etc/b.conf\n"
    remove_generated(STATE, root=tmp_path)
    assert not listing.exists()


def test_files_no_longer_rendered_are_removed_unless_edited(tmp_path):
    apply_files([item("/etc/a.conf", "a\n"), item("/etc/b.conf", "b\n"),
                 item("/etc/c.conf", "c\n")], STATE, root=tmp_path)
    (tmp_path / "etc/c.conf").write_text("c, edited\n")
    result = apply_files([item("/etc/a.conf", "a\n")], STATE, root=tmp_path)
    assert result.removed == ["/etc/b.conf"] and result.orphaned == ["/etc/c.conf"]
    assert not (tmp_path / "etc/b.conf").exists()
    assert (tmp_path / "etc/c.conf").read_text() == "c, edited\n"
    # an edited leftover stays recorded as ours, so purge still removes it
    assert "/etc/c.conf" in GeneratedFiles(tmp_path / STATE.lstrip("/")).hashes
