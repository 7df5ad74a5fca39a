"""One-time migration from upstream's old sqlite password database to password files.

Old relays kept accounts in `passdb_path` (table `users`: addr, password and, in older
versions, last_login). Today each account is `<mailboxes_dir>/<addr>/password`, whose mtime
is the last-login day. doveauth runs this at startup; once done the database is renamed to
`<passdb_path>.old`, so later starts skip it.
"""

import logging
import os

from .mailbox import Mailbox

log = logging.getLogger(__name__)

# Upstream never migrated its CI test accounts; neither do we.
SKIPPED_PREFIXES = ("ci-", "ac_")


def read_user_rows(path):
    """[(addr, password, last_login or None)] from the `users` table, read-only."""
    # Imported only here: doveauth imports this module at every start, and sqlite3 would
    # cost it 2 MB of memory for a database that exists once, before the migration.
    import sqlite3

    uri = f"file:{path}?mode=ro"
    connection = sqlite3.connect(uri, uri=True, timeout=60)
    try:
        columns = {row[1] for row in connection.execute("PRAGMA table_info(users)")}
        last_login = "last_login" if "last_login" in columns else "NULL"
        query = f"SELECT addr, password, {last_login} FROM users"
        return connection.execute(query).fetchall()
    finally:
        connection.close()


def migrate_row(config, addr, password, last_login):
    """Create the account of one database row unless it exists; True if created."""
    if not isinstance(addr, str) or addr[:3] in SKIPPED_PREFIXES:
        return False
    try:
        mailbox = Mailbox(config, addr)
    except ValueError:
        log.warning("migration: skipping invalid address %r", addr)
        return False
    if not isinstance(password, str) or not password.strip() or not password.isascii():
        log.warning("migration: skipping %s, its stored password is unusable", addr)
        return False
    if mailbox.exists():
        # The account was used after the database was abandoned; its file is newer.
        return False
    mailbox.create(password.strip())
    if last_login:
        try:
            mailbox.record_login(int(last_login))
        except (TypeError, ValueError, OverflowError):
            log.warning("migration: ignoring bad last_login %r of %s", last_login, addr)
    return True


def move_database_aside(path):
    """Rename the database and its sqlite side files (-wal, -shm, -journal) to `.old`,
    keeping the pair consistent so the backup can still be opened."""
    old_path = path.with_name(path.name + ".old")
    os.rename(path, old_path)
    for side in path.parent.iterdir():
        if side.name.startswith(path.name + "-"):
            suffix = side.name[len(path.name):]
            os.rename(side, old_path.with_name(old_path.name + suffix))
    return old_path


def migrate_from_db_to_maildir(config, progress_every=10000):
    """Copy accounts of an old sqlite passdb into the mailbox directories, once."""
    path = config.passdb_path
    if not path.exists():
        return
    rows = read_user_rows(path)
    log.info("migrating %d sqlite database passwords to user dirs", len(rows))
    created = 0
    for index, (addr, password, last_login) in enumerate(rows, 1):
        created += migrate_row(config, addr, password, last_login)
        if index % progress_every == 0:
            log.info("migration-progress: %d rows processed", index)
    old_path = move_database_aside(path)
    log.info("migration: %d accounts created, database moved to %s", created, old_path)
