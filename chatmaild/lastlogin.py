"""lastlogin: records the day of each account's last IMAP login.

Dovecot's last_login plugin sends, in a dict transaction,

    S<tx>\tshared/last-login/<addr>\t<unix timestamp>

and we set the mtime of the account's password file to that day. The mtime is the only
last-login record; expiry of inactive accounts reads it. Keeping only the day limits both
disk writes and what the server knows about its users.
"""

import logging
import sys

from .dictproxy import DictServer, daemon_main
from .mailbox import Mailbox

log = logging.getLogger(__name__)

LAST_LOGIN_PREFIX = "shared/last-login/"
# Timestamps beyond this (year 5138) are garbage, and os.utime would overflow on them.
MAX_TIMESTAMP = 10**11

USAGE = "usage: lastlogin SOCKET INI"


def parse_timestamp(value):
    """The unix timestamp in `value`, or None if it is not a plausible one."""
    value = value.strip()
    if not value.isdigit() or not value.isascii():
        return None
    timestamp = int(value)
    return timestamp if timestamp < MAX_TIMESTAMP else None


class LastLoginDictServer(DictServer):
    def __init__(self, config):
        self.config = config

    def set_value(self, user, key, value):
        """Record a login; False (the commit fails) for anything but a well-formed
        last-login key with a timestamp."""
        if not key.startswith(LAST_LOGIN_PREFIX):
            log.warning("unknown lastlogin key ignored: %r", key)
            return False
        addr = key[len(LAST_LOGIN_PREFIX):]
        timestamp = parse_timestamp(value)
        if timestamp is None:
            log.warning("invalid last-login timestamp ignored: %r", value)
            return False
        return self.record_login(addr, timestamp)

    def record_login(self, addr, timestamp):
        try:
            mailbox = Mailbox(self.config, addr)
        except ValueError:
            log.warning("last-login for invalid address ignored: %r", addr)
            return False
        # An unknown account (e.g. just expired) is not an error of the login itself;
        # Mailbox logs it and touches nothing.
        mailbox.record_login(timestamp)
        return True


def main(argv=None):
    return daemon_main(sys.argv[1:] if argv is None else argv, LastLoginDictServer, USAGE)


if __name__ == "__main__":
    sys.exit(main())
