"""chatmail-metadata: Dovecot's mail_attribute_dict, i.e. the IMAP METADATA of every user.

    chatmail-metadata SOCKET INI

What Delta Chat clients set and read through it (keys as Dovecot passes them):

  S priv/<guid>/devicetoken <token>   a device's push token (SETMETADATA /private/devicetoken)
  S priv/<guid>/messagenew            new incoming mail (push_notification.lua): push every token
  L priv/<guid>/devicetoken <addr>    the address's tokens, space separated
  L shared/<guid>/vendor/vendor.dovecot/pvt/server/vendor/deltachat/<name>
        irohrelay          the iroh relay URL (only if one is configured)
        turn               <mail_domain>:3478:<username>:<password> for coturn
        maxsmtprecipients  1000 (Postfix's smtpd_recipient_limit default)
        appversions        the single-line JSON of defaults/appversions.json

Everything else is answered "not found". Tokens are kept per address in
<mailboxes_dir>/<addr>/metadata.json as {"devicetoken": {token: unix time last set}}.
"""

import json
import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .dictproxy import DictServer, daemon_main
from .mailbox import Mailbox
from .notifier import QUEUE_DIR_NAME, Notifier
from .turn import TURN_PORT, TurnSecretError, credentials_for

log = logging.getLogger(__name__)

DEVICETOKEN_KEY = "devicetoken"
TOKEN_LIFETIME = 90 * 24 * 3600
CLOCK_SKEW = 60  # a token set "in the future" by more than this is bogus
VENDOR_PREFIX = "vendor/vendor.dovecot/pvt/server/vendor/deltachat/"
MAX_SMTP_RECIPIENTS = "1000"  # Postfix's default smtpd_recipient_limit

USAGE = "usage: chatmail-metadata SOCKET INI"


def is_valid_token_timestamp(timestamp, now):
    """Tokens expire 90 days after they were last set; future times are bogus."""
    if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)):
        return False
    return now - TOKEN_LIFETIME < timestamp < now + CLOCK_SKEW


def valid_tokens(stored, now):
    """The stored devicetoken value as {token: timestamp}, expired entries left out.

    Old metadata.json files hold a plain list of tokens; those count as set `now`.
    """
    if isinstance(stored, list):
        return {token: int(now) for token in stored if isinstance(token, str) and token}
    if isinstance(stored, dict):
        return {
            token: timestamp for token, timestamp in stored.items()
            if is_valid_token_timestamp(timestamp, now)
        }
    return {}


class DeviceTokens:
    """The push tokens of each address, in the address's metadata.json."""

    def __init__(self, config, clock=time.time):
        self.config = config
        self.clock = clock

    def _metadata_file(self, addr):
        # Mailbox() refuses anything that is not a plain address of this relay (ValueError),
        # so a hostile user name never leads outside mailboxes_dir.
        mailbox = Mailbox(self.config, addr)
        if not mailbox.path.is_dir():
            raise FileNotFoundError(f"no mailbox for {addr}")
        return mailbox.metadata

    @contextmanager
    def _modify(self, metadata_file):
        """Yield the valid tokens for changing; they are written back with expired ones gone."""
        with metadata_file.modify() as data:
            tokens = valid_tokens(data.get(DEVICETOKEN_KEY), self.clock())
            yield tokens
            data[DEVICETOKEN_KEY] = tokens

    def add(self, addr, token):
        # Setting a known token again renews it: active devices re-send theirs.
        with self._modify(self._metadata_file(addr)) as tokens:
            tokens[token] = int(self.clock())

    def remove(self, addr, token):
        try:
            metadata_file = self._metadata_file(addr)
        except FileNotFoundError:
            return
        with self._modify(metadata_file) as tokens:
            tokens.pop(token, None)

    def get(self, addr):
        """The address's valid tokens; stale or old-format storage is cleaned up."""
        try:
            metadata_file = self._metadata_file(addr)
        except FileNotFoundError:
            return []
        stored = metadata_file.read().get(DEVICETOKEN_KEY)
        tokens = valid_tokens(stored, self.clock())
        if stored is not None and stored != tokens:
            with self._modify(metadata_file) as tokens:
                pass
        return list(tokens)


def read_appversions():
    """The packaged app version list as one line of JSON, or None if it is unusable."""
    # Beside this module: the package is installed as files, never zipped, and
    # importlib.resources would cost the daemon 1 MB of memory (bench/README.md).
    path = Path(__file__).parent / "defaults" / "appversions.json"
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        log.error("cannot read %s: %s", path, exc)
        return None
    # the dict protocol is line based; compact JSON escapes newlines inside strings
    return json.dumps(data, separators=(",", ":"))


class MetadataServer(DictServer):
    def __init__(self, config, tokens, notifier):
        self.config = config
        self.tokens = tokens
        self.notifier = notifier
        self.appversions = read_appversions()

    def lookup(self, key, user):
        parts = key.split("/", 2)
        if len(parts) == 3 and parts[0] == "priv" and parts[2] == DEVICETOKEN_KEY:
            return self._lookup_tokens(user)
        if len(parts) == 3 and parts[0] == "shared" and parts[2].startswith(VENDOR_PREFIX):
            return self._lookup_vendor_value(parts[2][len(VENDOR_PREFIX):])
        log.debug("lookup ignored: %r", key)
        return None

    def _lookup_tokens(self, user):
        try:
            return " ".join(self.tokens.get(user))
        except ValueError as exc:
            log.warning("devicetoken lookup refused: %s", exc)
            return None

    def _lookup_vendor_value(self, name):
        if name == "irohrelay":
            return self.config.iroh_relay or None
        if name == "turn":
            return self._turn_value()
        if name == "maxsmtprecipients":
            return MAX_SMTP_RECIPIENTS
        if name == "appversions":
            return self.appversions
        return None

    def _turn_value(self):
        try:
            credentials = credentials_for(self.config)
        except TurnSecretError as exc:
            log.error("failed to get TURN credentials: %s", exc)
            return None
        # mail_domain is "[a.b.c.d]" on IPv4 relays; upstream sends it bracketed too.
        return f"{self.config.mail_domain}:{TURN_PORT}:{credentials}"

    def set_value(self, user, key, value):
        parts = key.split("/")
        if len(parts) != 3 or parts[0] != "priv":
            log.warning("metadata set ignored: %r", key)
            return False
        try:
            if parts[2] == DEVICETOKEN_KEY:
                return self._set_token(user, value)
            if parts[2] == "messagenew":
                self.notifier.notify(user, self.tokens.get(user))
                return True
        except (ValueError, FileNotFoundError) as exc:
            log.warning("metadata set refused for %r: %s", key, exc)
            return False
        log.warning("metadata set ignored: %r", key)
        return False

    def _set_token(self, user, token):
        if not token:
            return True  # nothing to push to
        self.tokens.add(user, token)
        return True

    def serve_forever(self, socket_path):
        self.notifier.start()
        log.info("chatmail-metadata serving %s", socket_path)
        try:
            super().serve_forever(socket_path)
        finally:
            self.notifier.stop(timeout=1)


def make_metadata_server(config):
    """The server for `config`; exits with a message if the mailboxes are missing."""
    if not config.mailboxes_dir.is_dir():
        raise SystemExit(
            f"error: mailboxes_dir {config.mailboxes_dir} does not exist; "
            "it is created when the relay is configured (owner vmail, mode 700)"
        )
    queue_dir = config.mailboxes_dir / QUEUE_DIR_NAME
    queue_dir.mkdir(mode=0o700, exist_ok=True)
    tokens = DeviceTokens(config)
    try:
        notifier = Notifier(queue_dir, config.notification_url, tokens.remove)
    except ValueError as exc:
        raise SystemExit(f"error: {config.inipath}: {exc}") from None
    return MetadataServer(config, tokens, notifier)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    return daemon_main(argv, make_metadata_server, USAGE)


if __name__ == "__main__":
    sys.exit(main())
