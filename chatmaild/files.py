"""Small file primitives shared by the services: atomic writes and locked JSON files."""

import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import filelock

log = logging.getLogger(__name__)


def write_atomic(path, data, mode=0o600):
    """Write bytes so that readers see either the old or the new content, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


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
        with filelock.FileLock(str(self.path) + ".lock", timeout=self.timeout):
            data = self.read()
            yield data
            write_atomic(self.path, json.dumps(data).encode())
