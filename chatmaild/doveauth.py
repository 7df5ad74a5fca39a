"""doveauth: Dovecot's passdb and userdb, served over the dict protocol.

Dovecot asks (see /etc/dovecot/auth.conf):

    Lshared/userdb/<user>               -> the account's fields, or N
    Lshared/passdb/<password>"<user>    -> the account's fields incl. its stored hash
    I0\t0\tshared/userdb/               -> every address (for doveadm -A)

Dovecot compares the password with the returned hash itself. An address that does not
exist yet is created by its first login ("create on first login"), if the name and
password follow the relay's rules and the machine has resources to spare.
"""

import json
import logging
import os
import re
import sys

from .dictproxy import DictServer, daemon_main
from .files import file_lock
from .mailbox import Mailbox
from .migrate_db import migrate_from_db_to_maildir
from .sha512crypt import check_password, sha512_crypt
from .syslimits import has_sufficient_resources

log = logging.getLogger(__name__)

NOCREATE_FILE = "/etc/chatmail-nocreate"
VALID_LOCALPART_RE = re.compile(r"^[a-z0-9._-]+$")
USERDB_PREFIX = "shared/userdb/"
PASSDB_PREFIX = "shared/passdb/"
# Waiting longer than this for a concurrent creation means something is stuck; the
# lookup then fails and Dovecot reports a temporary error to the client.
CREATE_LOCK_TIMEOUT = 5

USAGE = "usage: doveauth SOCKET INI"


def encrypt_password(password):
    """The hash Dovecot stores and checks: {SHA512-CRYPT} with a random salt."""
    return "{SHA512-CRYPT}" + sha512_crypt(password)


def split_and_unescape(text):
    """Split Dovecot's %E-escaped fields: `\\` escapes the next character, `"` separates.

    Raises ValueError for a trailing lone backslash, which %E never produces.
    """
    parts, current, chars = [], [], iter(text)
    for char in chars:
        if char == "\\":
            escaped = next(chars, None)
            if escaped is None:
                raise ValueError("dangling escape character")
            current.append(escaped)
        elif char == '"':
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def is_hashable(password, addr):
    """False (and a warning) for passwords Dovecot could never check against a hash:
    with a NUL character or longer than libxcrypt accepts."""
    try:
        check_password(password)
    except ValueError as exc:
        log.warning("refusing to create %r: %s", addr, exc)
        return False
    return True


def is_allowed_to_create(config, addr, password, nocreate_file=NOCREATE_FILE):
    """True if `addr` and `password` follow the rules for a new account.

    The rules and warnings are upstream's; resource limits are checked separately.
    """
    if os.path.exists(nocreate_file):
        log.warning("blocked account creation because %r exists.", nocreate_file)
        return False
    if len(password) < config.password_min_length:
        log.warning(
            "Password needs to be at least %s characters long", config.password_min_length
        )
        return False
    parts = addr.split("@")
    if len(parts) != 2:
        log.warning("user %r is not a proper e-mail address", addr)
        return False
    localpart = parts[0]
    if not config.username_min_length <= len(localpart) <= config.username_max_length:
        log.warning(
            "localpart %r has to be between %s and %s chars long",
            localpart,
            config.username_min_length,
            config.username_max_length,
        )
        return False
    if not VALID_LOCALPART_RE.fullmatch(localpart):
        log.warning("localpart %r contains invalid characters", localpart)
        return False
    return True


class AuthDictServer(DictServer):
    def __init__(self, config, nocreate_file=NOCREATE_FILE):
        self.config = config
        self.nocreate_file = nocreate_file
        self.domain_suffix = "@" + config.mail_domain

    # -- dict protocol hooks ----------------------------------------------------------

    def lookup(self, key, user):
        fields = None
        if key.startswith(USERDB_PREFIX):
            fields = self.lookup_userdb_key(key[len(USERDB_PREFIX):])
        elif key.startswith(PASSDB_PREFIX):
            fields = self.lookup_passdb_key(key[len(PASSDB_PREFIX):])
        return json.dumps(fields) if fields else None

    def iterate(self, path, user):
        if path != USERDB_PREFIX:
            return []
        return [(USERDB_PREFIX + addr, "") for addr in self.iter_userdb()]

    # -- passdb / userdb ------------------------------------------------------------------

    def lookup_userdb_key(self, escaped):
        parts = self._split_key(escaped, 1)
        return parts and self.lookup_userdb(parts[0])

    def lookup_passdb_key(self, escaped):
        parts = self._split_key(escaped, 2)
        return parts and self.lookup_passdb(parts[1], parts[0])

    def _split_key(self, escaped, count):
        """The `count` %E-escaped fields of a key, or None if it is malformed."""
        try:
            parts = split_and_unescape(escaped)
        except ValueError:
            parts = None
        if parts is None or len(parts) != count:
            log.warning("malformed auth dict key ignored: %r", escaped)
            return None
        return parts

    def mailbox_or_none(self, addr):
        """The Mailbox of `addr` if it is a safe address of our domain, else None."""
        if not addr.endswith(self.domain_suffix):
            return None
        try:
            return Mailbox(self.config, addr)
        except ValueError:
            return None

    def lookup_userdb(self, addr):
        mailbox = self.mailbox_or_none(addr)
        return mailbox.userdb_fields() if mailbox else None

    def lookup_passdb(self, addr, password):
        """The account's fields; creates the account first if this is its first login.

        An existing account is returned whatever the password: Dovecot checks it against
        the stored hash, so a wrong password never changes the account.
        """
        mailbox = self.mailbox_or_none(addr)
        if mailbox is None:
            return None
        fields = mailbox.userdb_fields()
        if fields:
            return fields
        if not is_allowed_to_create(self.config, addr, password, self.nocreate_file):
            return None
        if not is_hashable(password, addr):
            return None
        if not has_sufficient_resources(self.config):
            return None
        return self.create_account(mailbox, password)

    def create_account(self, mailbox, password):
        """Create the account unless a concurrent login did so first (threads of this
        daemon or another process), under a lock file in the mailbox directory."""
        mailbox.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock_path = str(mailbox.password_path) + ".lock"
        with file_lock(lock_path, timeout=CREATE_LOCK_TIMEOUT):
            fields = mailbox.userdb_fields()
            if fields:
                return fields
            mailbox.create(encrypt_password(password))
            # Written to stderr, not through logging: mtail counts exactly this line.
            print(f"Created address: {mailbox.addr}", file=sys.stderr, flush=True)
        return mailbox.userdb_fields()

    def iter_userdb(self):
        """Every address with a mailbox directory."""
        try:
            names = os.listdir(self.config.mailboxes_dir)
        except FileNotFoundError:
            return []
        return [name for name in names if "@" in name]


def make_auth_server(config):
    """Migrate an old sqlite passdb if there is one, then return the server."""
    try:
        migrate_from_db_to_maildir(config)
    except Exception:
        # Keep existing accounts reachable; the next start retries the migration.
        log.exception("migration of %s failed", config.passdb_path)
    return AuthDictServer(config)


def main(argv=None):
    return daemon_main(sys.argv[1:] if argv is None else argv, make_auth_server, USAGE)


if __name__ == "__main__":
    sys.exit(main())
