"""One address's mailbox directory and the account state kept in it.

Layout (upstream's, kept for migration): <mailboxes_dir>/<addr>/ holds the maildir,
`password` ({SHA512-CRYPT} hash; its mtime is the day of the last login),
`enforceE2EEincoming` (present: incoming cleartext is refused) and `metadata.json`.
"""

import logging
import os

from .files import JsonFile, write_atomic

log = logging.getLogger(__name__)


def day_timestamp(timestamp):
    """Round down to the day: last-login times are kept no more precisely than that."""
    return int(timestamp) // 86400 * 86400


class Mailbox:
    def __init__(self, config, addr):
        self.addr = addr
        self.path = config.mailbox_path(addr)  # raises ValueError for hostile names
        self.password_path = self.path / "password"
        self.enforce_e2ee_path = self.path / "enforceE2EEincoming"
        self.metadata = JsonFile(self.path / "metadata.json")

    def read_password_hash(self):
        """The stored hash, or None if the account does not exist (or is broken)."""
        try:
            text = self.password_path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            log.error("cannot read password of %s: %s", self.addr, exc)
            return None
        if not text:
            log.error("password is empty for: %s", self.addr)
            return None
        return text

    def exists(self):
        return self.read_password_hash() is not None

    def userdb_fields(self):
        """Dovecot passdb/userdb fields of an existing account, else None."""
        password = self.read_password_hash()
        if password is None:
            return None
        return {
            "addr": self.addr,
            "home": str(self.path),
            "uid": "vmail",
            "gid": "vmail",
            "password": password,
        }

    def create(self, password_hash):
        """Make the mailbox directory, store the hash, and refuse incoming cleartext."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(self.password_path, password_hash.encode("ascii"))
        self.enforce_e2ee_path.touch()

    def accepts_incoming_cleartext(self):
        return not self.enforce_e2ee_path.exists()

    def last_login(self):
        try:
            return int(self.password_path.stat().st_mtime)
        except FileNotFoundError:
            return None

    def record_login(self, timestamp):
        """Set the password file's mtime to the login day, touching it only on change."""
        day = day_timestamp(timestamp)
        current = self.last_login()
        if current is None:
            log.error("Can not get last login timestamp for %s", self.addr)
            return False
        if current != day:
            os.utime(self.password_path, (day, day))
        return True
