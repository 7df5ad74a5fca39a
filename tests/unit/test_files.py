"""chatmaild.files: the lock file primitive."""

import threading
import time

import pytest

from chatmaild.files import JsonFile, file_lock


def test_file_lock_excludes_a_second_holder_until_released(tmp_path):
    path = tmp_path / "x.lock"
    order = []

    def second():
        with file_lock(path, timeout=5):
            order.append("second")

    with file_lock(path, timeout=5):
        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(0.1)
        order.append("first done")
    waiter.join(5)
    assert order == ["first done", "second"]


def test_file_lock_times_out(tmp_path):
    path = tmp_path / "x.lock"
    with file_lock(path, timeout=5):
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            with file_lock(path, timeout=0.2):
                pass
        assert 0.2 <= time.monotonic() - started < 2


def test_file_lock_and_the_filelock_library_exclude_each_other(tmp_path):
    """Both take flock(2) on the lock file: during an upgrade an old daemon still using
    filelock and a new one using file_lock do not write a JSON file at the same time."""
    filelock = pytest.importorskip("filelock")
    path = tmp_path / "x.lock"
    with filelock.FileLock(str(path), timeout=5):
        with pytest.raises(TimeoutError):
            with file_lock(path, timeout=0.1):
                pass
    with file_lock(path, timeout=5):
        with pytest.raises(filelock.Timeout):
            filelock.FileLock(str(path), timeout=0.1).acquire()


def test_json_file_modify_under_the_lock(tmp_path):
    store = JsonFile(tmp_path / "data.json")
    with store.modify() as data:
        data["a"] = 1
    assert store.read() == {"a": 1}
