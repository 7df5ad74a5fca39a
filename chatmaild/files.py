"""Small file primitives shared by the services: atomic writes and locked JSON files."""

import fcntl
import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


@contextmanager
def file_lock(path, timeout):
    """Hold an exclusive flock(2) on `path` (created if missing) for the block: the lock
    filelock's FileLock takes on Unix, so the two exclude each other; TimeoutError after
    `timeout` seconds. Closing the descriptor releases it. Not the filelock library: on
    Debian 13 importing it imports asyncio, about 8 MB of memory in every daemon that
    takes a lock (bench/results/footprint.md)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{path} still locked after {timeout} s") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)


def write_atomic(path, data, mode=0o600, gid=-1, replace=True):
    """Write bytes so that readers see either no file, the old or the new content, never
    a part. With replace=False an existing file is kept and FileExistsError raised, also
    when another process created it meanwhile (link() does not overwrite)."""
    # Imported at the first write (about 3 ms, once): lastlogin and the filters never
    # write, and tempfile (with shutil, bz2, lzma) is 0.6 MB of each daemon's memory
    # (bench/README.md, footprint).
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chown(tmp, -1, gid)
        os.chmod(tmp, mode)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


class JsonFile:
    """A dict kept in a JSON file, modified under a lock file next to it."""

    def __init__(self, path, timeout=5.0):
        self.path = Path(path)
        self.timeout = timeout

    def read(self):
        try:
            with open(self.path, "rb") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (ValueError, OSError):
            log.error("corrupt or unreadable %s, treating as empty", self.path)
            return {}
        return data if isinstance(data, dict) else {}

    @contextmanager
    def modify(self):
        """Yield the dict; it is written back atomically when the block ends normally."""
        with file_lock(str(self.path) + ".lock", timeout=self.timeout):
            data = self.read()
            yield data
            write_atomic(self.path, json.dumps(data).encode())
