"""Write rendered configuration files without ever clobbering an admin's edit.

For every file we write, the SHA-256 of what we wrote is recorded in
<state_dir>/generated.json. On the next run a file is replaced only if it still has that
hash (nobody touched it) or is missing. A file someone edited is kept as it is; the new
version goes next to it as <path>.chatmail-new and the run reports it, so neither the
admin's change nor ours is lost silently, and no dpkg conffile prompt ever blocks
unattended upgrades.
"""

import grp
import hashlib
import json
import os
import pwd
from dataclasses import dataclass, field
from pathlib import Path

from ..files import write_atomic

NEW_SUFFIX = ".chatmail-new"


def sha256(data):
    return hashlib.sha256(data).hexdigest()


class GeneratedFiles:
    """The record of which files we generated, and with which content hash."""

    def __init__(self, state_dir):
        self.path = Path(state_dir) / "generated.json"
        try:
            self.hashes = json.loads(self.path.read_text())
        except FileNotFoundError:
            self.hashes = {}
        except ValueError:
            # A damaged record only costs us the right to overwrite: files are kept.
            self.hashes = {}

    def save(self):
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        text = json.dumps(self.hashes, indent=1, sort_keys=True) + "\n"
        write_atomic(self.path, text.encode(), 0o644)
        # The same paths for the package's postrm, which is shell and may run after
        # python3-chatmaild is gone.
        listing = "".join(f"{path}\n" for path in sorted(self.hashes))
        write_atomic(self.path.with_suffix(".list"), listing.encode(), 0o644)

    def forget(self, path):
        self.hashes.pop(str(path), None)


@dataclass
class ApplyResult:
    changed: list = field(default_factory=list)  # paths written
    kept: list = field(default_factory=list)  # paths with an admin's edit, left alone
    removed: list = field(default_factory=list)  # generated files no longer wanted
    orphaned: list = field(default_factory=list)  # ... that were edited, so left alone
    reload: set = field(default_factory=set)  # services whose files changed
    restart: set = field(default_factory=set)  # ... and must restart, not just reload

    def merge(self, other):
        self.changed += other.changed
        self.kept += other.kept
        self.removed += other.removed
        self.orphaned += other.orphaned
        self.reload |= other.reload
        self.restart |= other.restart


def _ids(owner, group):
    return pwd.getpwnam(owner).pw_uid, grp.getgrnam(group).gr_gid


def _ensure_owner_and_mode(path, uid, gid, mode):
    st = os.stat(path)
    if (st.st_uid, st.st_gid) != (uid, gid):
        os.chown(path, uid, gid)
    if st.st_mode & 0o7777 != mode:
        os.chmod(path, mode)


def apply_file(item, record, root="/"):
    """Install one RenderedFile (see chatmaild.admin.render) below `root`."""
    result = ApplyResult()
    target = Path(root) / item.path.lstrip("/")
    new = item.content if isinstance(item.content, bytes) else item.content.encode()
    uid, gid = _ids(item.owner, item.group)
    try:
        current = target.read_bytes()
    except FileNotFoundError:
        current = None
    key = str(item.path)
    if current == new:
        record.hashes[key] = sha256(new)
        _ensure_owner_and_mode(target, uid, gid, item.mode)
        _remove_stale_proposal(target)
        return result
    if current is not None and record.hashes.get(key) != sha256(current):
        proposal = target.with_name(target.name + NEW_SUFFIX)
        write_atomic(proposal, new, item.mode)
        result.kept.append(key)
        return result
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    write_atomic(target, new, item.mode)
    os.chown(target, uid, gid)
    record.hashes[key] = sha256(new)
    _remove_stale_proposal(target)
    result.changed.append(key)
    result.reload.update(item.reload)
    result.restart.update(item.restart)
    return result


def _remove_stale_proposal(target):
    target.with_name(target.name + NEW_SUFFIX).unlink(missing_ok=True)


def apply_files(items, state_dir, root="/"):
    """Install every RenderedFile of kind "file", and remove files we generated earlier
    that the configuration no longer renders (e.g. OpenDKIM's on a relay that became an
    IPv4 relay); returns an ApplyResult."""
    record = GeneratedFiles(Path(root) / str(state_dir).lstrip("/"))
    result = ApplyResult()
    try:
        for item in items:
            if item.kind == "file":
                result.merge(apply_file(item, record, root))
        result.merge(remove_stale(record, {item.path for item in items}, root))
    finally:
        record.save()
    return result


def remove_stale(record, rendered_paths, root="/"):
    """Delete generated files that are no longer rendered, unless someone edited them."""
    result = ApplyResult()
    for key in sorted(set(record.hashes) - set(rendered_paths)):
        target = Path(root) / key.lstrip("/")
        try:
            current = target.read_bytes()
        except FileNotFoundError:
            record.forget(key)
            continue
        if sha256(current) == record.hashes[key]:
            target.unlink()
            _remove_stale_proposal(target)
            record.forget(key)
            result.removed.append(key)
        else:
            result.orphaned.append(key)
    return result


def remove_generated(state_dir, root="/"):
    """Purge: delete every file we generated (edited or not, as dpkg does with conffiles)
    and our proposals next to them; returns the paths removed."""
    record = GeneratedFiles(Path(root) / str(state_dir).lstrip("/"))
    removed = []
    for key in sorted(record.hashes):
        target = Path(root) / key.lstrip("/")
        _remove_stale_proposal(target)
        try:
            target.unlink()
        except FileNotFoundError:
            continue
        removed.append(key)
    record.path.unlink(missing_ok=True)
    record.path.with_suffix(".list").unlink(missing_ok=True)
    return removed


CREATED_LIST = "created.list"


def record_created(state_dir, path):
    """PATH was made at install (a key, a certificate, a secret): purge removes it. Files
    the admin brought are never recorded. (The shell steps write the same list:
    record_created in steps/functions.sh.)"""
    listing = Path(state_dir) / CREATED_LIST
    try:
        known = listing.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        known = []
    if str(path) not in known:
        with open(listing, "a", encoding="utf-8") as f:
            f.write(f"{path}\n")
