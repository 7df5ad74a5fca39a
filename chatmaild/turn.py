"""TURN credentials for Delta Chat calls, checked by coturn's `use-auth-secret` mode.

coturn and chatmail-metadata share one secret (the "TURN REST API" scheme): the username is
the unix time at which the credentials expire, the password is
base64(HMAC-SHA1(secret, username)). coturn recomputes the password from the username, so
no per-user state exists anywhere. Upstream's chatmail-turn hands out the same kind of
credentials, valid for 5 days, but with a secret compiled into the binary; ours is generated
per relay at install time (`python3 -m chatmaild.turn generate-secret PATH`).
"""

import base64
import hashlib
import hmac
import secrets
import sys
import time
from pathlib import Path

from .files import write_atomic

CREDENTIAL_LIFETIME = 5 * 24 * 3600  # as upstream's chatmail-turn
TURN_PORT = 3478
SECRET_FILE_MODE = 0o640  # root writes it; the group (vmail) reads it


class TurnSecretError(Exception):
    """The shared secret cannot be read; no credentials can be handed out."""


def make_credentials(secret, now=None, lifetime=CREDENTIAL_LIFETIME):
    """Return (username, password) that coturn accepts until `now + lifetime`."""
    if now is None:
        now = time.time()
    username = str(int(now) + lifetime)
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii")


def read_secret(path):
    """The secret stored in `path`, without surrounding whitespace."""
    try:
        secret = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise TurnSecretError(f"cannot read TURN secret {path}: {exc}") from None
    if not secret:
        raise TurnSecretError(f"TURN secret file {path} is empty")
    return secret


def credentials_for(config, now=None):
    """'username:password' for the relay of `config`, as chatmail-turn's socket replied."""
    # Read on every request: a secret rotated by the admin takes effect without a restart.
    username, password = make_credentials(read_secret(config.turn_secret_path), now)
    return f"{username}:{password}"


def _stored_text(path):
    """The file's content, None if it does not exist; OSError if it cannot be read."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None


def generate_secret(path, group=None):
    """Create the secret file at `path` unless it already holds a secret.

    Returns True if a new secret was written. The file appears complete or not at all,
    and an existing secret is never replaced: coturn's configuration and every
    credential handed out so far depend on it. `group` (a name or gid) lets the
    unprivileged metadata service read it.
    """
    path = Path(path)
    stored = _stored_text(path)
    if stored is not None and stored.strip():
        return False
    # 32 random bytes as hex: no character that needs quoting in turnserver.conf.
    secret = secrets.token_hex(32)
    gid = -1 if group is None else _gid(group)
    data = (secret + "\n").encode("ascii")
    try:
        # An empty leftover holds no secret and may be replaced; otherwise another
        # installer that created the file meanwhile wins.
        write_atomic(path, data, SECRET_FILE_MODE, gid, replace=stored is not None)
    except FileExistsError:
        return False
    return True


def _gid(group):
    if isinstance(group, int) or group.isdigit():
        return int(group)
    import grp

    return grp.getgrnam(group).gr_gid


USAGE = """usage: python3 -m chatmaild.turn generate-secret PATH [GROUP]

Create PATH holding a new random TURN shared secret (mode 0640, group GROUP)
unless PATH already holds one."""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (2, 3) or argv[0] != "generate-secret":
        print(USAGE, file=sys.stderr)
        return 2
    try:
        created = generate_secret(argv[1], *argv[2:])
    except (OSError, KeyError) as exc:
        print(f"error: cannot create TURN secret {argv[1]}: {exc}", file=sys.stderr)
        return 1
    print(f"{'created' if created else 'kept existing'} TURN secret {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
