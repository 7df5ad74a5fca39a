"""Remove old messages and inactive addresses: chatmail-expire and chatmail-quota-expire.

chatmail-expire (daily timer) applies these rules to every `<mailboxes_dir>/*@*` directory;
anything else in mailboxes_dir (pending_notifications, ...) is never touched:

* an address whose `password` is older than delete_inactive_users_after days (the password's
  mtime is the day of its last login) is removed with all its mail;
* a directory without `password` (an account creation that never finished) is removed only
  if it is empty;
* message files in any maildir folder's cur/, new/ and tmp/ older than delete_mails_after
  days are removed, and files over 200000 bytes in cur/ older than delete_large_after days;
* then the mailbox is trimmed to 70 % of max_mailbox_size, oldest first (see
  `select_for_quota`);
* `maildirsize` is removed when anything was, so that Dovecot recounts the quota.

chatmail-quota-expire is Dovecot's quota_warning script: it does only the trimming step for
one mailbox, down to the megabytes it is given.

Symbolic links are never followed: a link inside a mailbox is neither read nor removed, and
a mailbox that is a link is skipped, so nothing outside mailboxes_dir can be deleted.
"""

import os
import re
import shutil
import sys
import time
from argparse import ArgumentParser
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .config import DEFAULT_INI_PATH, ConfigError, read_config

DAY = 86400
LARGE_MESSAGE_BYTES = 200000
QUOTA_CLEANUP_FACTOR = 0.7
# Messages younger than this stay even over quota: a mailbox that fills up within a day
# means something is wrong, and the quota-full error tells the owner's devices about it.
PROTECTED_SECONDS = DAY
MAILDIR_SUBDIRS = ("cur", "new", "tmp")

# Dovecot names a delivered message "<unix time>.<unique part>,S=<size>,W=<size>:2,<flags>",
# e.g. "1775324677.M448978P3029757.host,S=3235,W=3305:2,S". S= is the size quota counts.
DOVECOT_NAME_RE = re.compile(r"(\d+)\.[^/]*?,S=(\d+)(?=[,:]|$)")


@dataclass(frozen=True)
class FileEntry:
    path: str
    mtime: float
    size: int


@dataclass(frozen=True)
class MessageFile(FileEntry):
    subdir: str  # "cur", "new" or "tmp"

    @property
    def name(self):
        return os.path.basename(self.path)


@dataclass(frozen=True)
class QuotaEntry:
    """A message as Dovecot's file name describes it: saved at `timestamp`, `quota_size` B."""

    timestamp: int
    quota_size: int
    path: str


def parse_dovecot_filename(name):
    """QuotaEntry of a Dovecot maildir file name, or None if it is not one."""
    match = DOVECOT_NAME_RE.match(os.path.basename(name))
    if not match:
        return None
    return QuotaEntry(int(match.group(1)), int(match.group(2)), name)


def print_info(message):
    print(message, file=sys.stderr, flush=True)


def scandir_if_exists(path):
    """Entries of a directory, sorted by name; empty if it vanished meanwhile."""
    try:
        with os.scandir(path) as entries:
            return sorted(entries, key=lambda entry: entry.name)
    except (FileNotFoundError, NotADirectoryError):
        return []


def regular_file_entry(dir_entry):
    """FileEntry of a regular file (not a link), or None."""
    try:
        if not dir_entry.is_file(follow_symlinks=False):
            return None
        st = dir_entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return None
    return FileEntry(dir_entry.path, st.st_mtime, st.st_size)


@dataclass
class MailboxScan:
    """What one mailbox directory holds, read without following any symbolic link."""

    path: str
    last_login: float = None  # mtime of `password`, None without one
    messages: list = field(default_factory=list)  # MessageFile in */cur|new|tmp
    extrafiles: list = field(default_factory=list)  # FileEntry of everything else
    is_empty: bool = True

    @property
    def name(self):
        return os.path.basename(self.path)

    @classmethod
    def read(cls, path):
        scan = cls(str(path))
        scan._scan_folder(scan.path)
        scan.is_empty = not scandir_if_exists(scan.path)
        password = os.path.join(scan.path, "password")
        try:
            st = os.lstat(password)
        except FileNotFoundError:
            pass
        else:
            scan.last_login = st.st_mtime
        return scan

    def _scan_folder(self, folder):
        # Maildir++ keeps INBOX in the mailbox root and other folders (.Sent, .DeltaChat)
        # below it, each with cur/new/tmp; everything else is index or account state.
        for entry in scandir_if_exists(folder):
            if entry.is_symlink():
                continue
            if entry.name in MAILDIR_SUBDIRS and entry.is_dir(follow_symlinks=False):
                self._scan_messages(entry.path, entry.name)
            elif entry.is_dir(follow_symlinks=False):
                self._scan_folder(entry.path)
            else:
                file_entry = regular_file_entry(entry)
                if file_entry is not None:
                    self.extrafiles.append(file_entry)

    def _scan_messages(self, subdir_path, subdir):
        for entry in scandir_if_exists(subdir_path):
            file_entry = regular_file_entry(entry)
            if file_entry is not None:
                self.messages.append(
                    MessageFile(file_entry.path, file_entry.mtime, file_entry.size, subdir)
                )


def iter_mailboxes(mailboxes_dir, maxnum=None):
    """Yield a MailboxScan for each `*@*` directory in mailboxes_dir (at most maxnum)."""
    mailboxes_dir = str(mailboxes_dir)
    if not os.path.isdir(mailboxes_dir):
        print_info(f"no mailboxes found at: {mailboxes_dir}")
        return
    count = 0
    for entry in scandir_if_exists(mailboxes_dir):
        if maxnum is not None and count >= maxnum:
            return
        if "@" not in entry.name:
            continue
        if entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
            print_info(f"skipping {entry.path}: not a directory (links are not followed)")
            continue
        count += 1
        try:
            scan = MailboxScan.read(entry.path)
        except OSError as exc:  # e.g. permissions; the other mailboxes still get done
            print_info(f"skipping {entry.path}: cannot read it: {exc}")
            continue
        yield scan


def select_for_quota(messages, target_bytes, protect_after):
    """The messages to remove, oldest first, to bring the mailbox down to target_bytes.

    Sizes and ages come from Dovecot's file names, as its quota counts them. Only
    delivered messages (cur/, new/) count; none saved after `protect_after` is chosen.
    """
    entries = []
    for message in messages:
        if message.subdir == "tmp":
            continue
        entry = parse_dovecot_filename(message.path)
        if entry is not None:
            entries.append(entry)
    total = sum(entry.quota_size for entry in entries)
    selected = []
    for entry in sorted(entries, key=lambda e: (e.timestamp, e.path)):
        if total <= target_bytes or entry.timestamp > protect_after:
            break
        selected.append(entry)
        total -= entry.quota_size
    return selected


def unlink_quietly(path):
    """Remove a file; True if it was there (Dovecot may have expunged it meanwhile)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def format_day(timestamp):
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d")


class Expiry:
    """Applies the expiry rules to mailboxes; counts what it removed (or would remove)."""

    def __init__(self, config, now, remove=False, verbose=False):
        self.config = config
        self.now = now
        self.remove = remove
        self.verbose = verbose
        self.cutoff_inactive = now - int(config.delete_inactive_users_after) * DAY
        self.cutoff_mails = now - int(config.delete_mails_after) * DAY
        self.cutoff_large = now - int(config.delete_large_after) * DAY
        self.target_bytes = config.max_mailbox_size_mb * 1024 * 1024 * QUOTA_CLEANUP_FACTOR
        # The 24-hour protection counts from the real clock, also under --days.
        self.protect_after = time.time() - PROTECTED_SECONDS
        self.all_mailboxes = self.removed_mailboxes = 0
        self.all_files = self.removed_files = 0
        self.errors = 0
        self.started = time.monotonic()

    @property
    def verb(self):
        return "removing" if self.remove else "would remove"

    def process_mailbox(self, scan):
        self.all_mailboxes += 1
        try:
            if scan.last_login is None:
                self.remove_mailbox_if_empty(scan)
            elif scan.last_login < self.cutoff_inactive:
                self.remove_mailbox(scan)
            else:
                self.expire_messages(scan)
        except OSError as exc:
            self.errors += 1
            print_info(f"error while expiring {scan.path}: {exc}")

    def remove_mailbox_if_empty(self, scan):
        if not scan.is_empty:
            print_info(f"Skipped deleting {scan.path}, doesn't have last_login but isn't empty")
            return
        if self.verbose:
            print_info(f"{self.verb} empty {scan.path}")
        if self.remove:
            try:
                os.rmdir(scan.path)
            except OSError:  # an account creation filled it meanwhile
                print_info(f"Skipped deleting {scan.path}, it is no longer empty")
                return
        self.removed_mailboxes += 1

    def remove_mailbox(self, scan):
        if self.verbose:
            print_info(f"{self.verb} {scan.path} (last login {format_day(scan.last_login)})")
        if self.remove:
            shutil.rmtree(scan.path)
        self.removed_mailboxes += 1

    def is_expired(self, message):
        if message.mtime < self.cutoff_mails:
            return True
        # Large messages go sooner, but only once a device has seen them (cur/).
        return (
            message.subdir == "cur"
            and message.size > LARGE_MESSAGE_BYTES
            and message.mtime < self.cutoff_large
        )

    def expire_messages(self, scan):
        if self.verbose:
            print_info(f"checking mailbox {format_day(scan.last_login)} {scan.name}")
        self.all_files += len(scan.messages)
        expired = [message for message in scan.messages if self.is_expired(message)]
        for message in expired:
            self.remove_file(message.path, message.mtime)
        expired_paths = {message.path for message in expired}
        remaining = [m for m in scan.messages if m.path not in expired_paths]
        over_quota = select_for_quota(remaining, self.target_bytes, self.protect_after)
        for entry in over_quota:
            self.remove_file(entry.path, entry.timestamp)
        if over_quota and self.verbose:
            # With --remove, mtail counts this line like the one of chatmail-quota-expire.
            print_info(f"quota-expire: {'removed' if self.remove else 'would remove'} "
                       f"{len(over_quota)} message(s) from {scan.name}")
        if expired or over_quota:
            self.remove_maildirsize(scan.path)

    def remove_file(self, path, mtime=None):
        if self.verbose:
            day = f"{format_day(mtime)} " if mtime is not None else ""
            print_info(f"{self.verb} {day}{path}")
        if self.remove and not unlink_quietly(path):
            print_info(f"file not found/vanished {path}")
        self.removed_files += 1

    def remove_maildirsize(self, mailbox_path):
        path = os.path.join(mailbox_path, "maildirsize")
        if self.verbose:
            print_info(f"{self.verb} {path}")
        if self.remove:
            unlink_quietly(path)

    def summary(self):
        counts = (
            f"{self.removed_mailboxes} out of {self.all_mailboxes} mailboxes "
            f"and {self.removed_files} out of {self.all_files} files in existing mailboxes "
            f"in {time.monotonic() - self.started:2.2f} seconds"
        )
        if self.remove:
            return f"Removed {counts}"
        return f"Dry run, nothing removed (use --remove): would remove {counts}"


def add_ini_and_days_arguments(parser):
    """The arguments chatmail-expire and chatmail-fsreport share with upstream's."""
    parser.add_argument(
        "chatmail_ini", nargs="?", default=DEFAULT_INI_PATH,
        help=f"path of chatmail.ini (default: {DEFAULT_INI_PATH})",
    )
    parser.add_argument(
        "--days", type=int, default=0,
        help="assume the date to be DAYS days older than now",
    )


def daily_expire_main(argv=None):
    """Remove expired messages and inactive addresses as chatmail.ini says (dry run
    unless --remove is given)."""
    parser = ArgumentParser(prog="chatmail-expire", description=daily_expire_main.__doc__)
    add_ini_and_days_arguments(parser)
    parser.add_argument(
        "--maxnum", type=int, default=None,
        help="look at no more than MAXNUM mailboxes",
    )
    parser.add_argument(
        "-v", dest="verbose", action="store_true",
        help="print every removed file and mailbox",
    )
    parser.add_argument(
        "--remove", action="store_true",
        help="really remove the expired files and mailboxes (default: only count them)",
    )
    args = parser.parse_args(argv)
    try:
        config = read_config(args.chatmail_ini)
    except ConfigError as exc:
        print_info(f"chatmail-expire: {exc}")
        return 1
    now = time.time() - DAY * args.days
    expiry = Expiry(config, now=now, remove=args.remove, verbose=args.verbose)
    for scan in iter_mailboxes(config.mailboxes_dir, maxnum=args.maxnum):
        expiry.process_mailbox(scan)
    print(expiry.summary(), flush=True)
    return 1 if expiry.errors else 0


def mailbox_path_problem(path):
    """Why `path` is not a mailbox Dovecot's quota warning may trim, or None if it is.

    A mailbox is `<mailboxes_dir>/<local>@<domain>`, a real directory, and mailboxes_dir
    is named after the domain (`/home/vmail/mail/<D>`; for an IPv4 relay the address
    has `[a.b.c.d]`, the directory `a.b.c.d`).
    """
    path = Path(os.path.abspath(path))
    local, at, domain = path.name.rpartition("@")
    if not (local and at and domain):
        return "its name is not an address"
    if path.is_symlink() or not path.is_dir():
        return "it is not a directory"
    if path.parent.name != domain.strip("[]"):
        return f"it is not in a mailboxes directory of {domain} (.../{domain.strip('[]')}/)"
    return None


def trim_mailbox(mailbox_path, target_bytes):
    """Remove the oldest messages down to target_bytes; returns how many were removed."""
    scan = MailboxScan.read(mailbox_path)
    protect_after = time.time() - PROTECTED_SECONDS
    removed = 0
    for entry in select_for_quota(scan.messages, target_bytes, protect_after):
        removed += unlink_quietly(entry.path)
    if removed:
        unlink_quietly(os.path.join(mailbox_path, "maildirsize"))
    return removed


def quota_expire_main(argv=None):
    """Remove a mailbox's oldest messages until it is below TARGET_MB megabytes.

    Dovecot runs this as its quota_warning script when a mailbox fills up.
    """
    parser = ArgumentParser(prog="chatmail-quota-expire", description=quota_expire_main.__doc__)
    parser.add_argument("target_mb", type=int, help="target mailbox size in megabytes")
    parser.add_argument("mailbox_path", help="the mailbox directory, <mailboxes_dir>/<address>")
    args = parser.parse_args(argv)
    if args.target_mb < 0:
        parser.error("target_mb must not be negative")
    problem = mailbox_path_problem(args.mailbox_path)
    if problem:
        print_info(f"quota-expire: refusing {args.mailbox_path}: {problem}")
        return 1
    removed = trim_mailbox(args.mailbox_path, args.target_mb * 1024 * 1024)
    if removed:
        # mtail counts this exact line (quota_expire_runs, quota_expire_removed_files).
        name = Path(os.path.abspath(args.mailbox_path)).name
        print_info(f"quota-expire: removed {removed} message(s) from {name}")
    return 0


if __name__ == "__main__":
    sys.exit(daily_expire_main())
