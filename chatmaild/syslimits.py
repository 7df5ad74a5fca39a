"""Whether the machine has room for one more account (load, memory, disk).

A relay that is overloaded or nearly out of disk space keeps serving existing accounts but
stops creating new ones. The limits come from chatmail.ini (max_load_1m,
min_available_memory, min_free_disk_space).
"""

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

MB = 1024 * 1024


def read_or_none(what, getter):
    """getter(), or None if the value cannot be read: an unreadable value must not block
    registrations, but it should be visible in the log."""
    try:
        return getter()
    except Exception as exc:
        log.warning("ignoring unreadable system limit %s: %s", what, exc)
        return None


# The standard library and /proc, not psutil: importing psutil alone grew doveauth's
# resident memory by about 5 MB (bench/results/footprint.md), for three numbers.

def load_1m():
    return read_or_none("load", lambda: os.getloadavg()[0])


def meminfo_available_kb(path="/proc/meminfo"):
    """MemAvailable (the kernel's estimate of memory available without swapping, what
    psutil reports as available), in kB."""
    for line in Path(path).read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    raise ValueError(f"no MemAvailable in {path}")


def available_memory_mb():
    return read_or_none("memory", lambda: meminfo_available_kb() * 1024 // MB)


def free_disk_mb(path):
    return read_or_none(
        "disk", lambda: free_bytes(existing_ancestor(path)) // MB
    )


def free_bytes(path):
    """What shutil.disk_usage(path).free says: the space unprivileged users may fill.
    Not shutil itself: it imports bz2 and lzma, 0.5 MB of doveauth's memory."""
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def existing_ancestor(path):
    """`path` or its nearest existing parent: before the first account exists, the
    mailboxes directory may not, but the file system it will be created on does."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def find_exceeded_limit(config):
    """A description of the first exceeded limit, or None if all are fine."""
    load = load_1m()
    if load is not None and load > config.max_load_1m:
        return f"load avg {load:.2f} > {config.max_load_1m:.2f}"
    memory = available_memory_mb()
    if memory is not None and memory < config.min_available_memory_mb:
        return f"available memory {memory}MB < {config.min_available_memory_mb}MB"
    disk = free_disk_mb(config.mailboxes_dir)
    if disk is not None and disk < config.min_free_disk_space_mb:
        return f"free disk {disk}MB < {config.min_free_disk_space_mb}MB"
    return None


def has_sufficient_resources(config):
    """True if a new account may be created; logs `registration rejected: ...` if not
    (the text is matched by metrics and tests)."""
    problem = find_exceeded_limit(config)
    if problem is None:
        return True
    log.warning("registration rejected: %s", problem)
    return False
