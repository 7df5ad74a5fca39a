"""filtermail: Postfix's before-queue SMTP filters (smtpd_proxy_filter) of a chatmail relay.

    filtermail INI outgoing   # 127.0.0.1:filtermail_smtp_port, reinjects to postfix_reinject_port
    filtermail INI incoming   # 127.0.0.1:filtermail_smtp_port_incoming, reinjects to
                              # postfix_reinject_port_incoming

Outgoing mail must be OpenPGP-encrypted (or a SecureJoin request, or an Autocrypt Setup
Message to oneself), its From must be the authenticated envelope sender, and each sender is
rate limited. Incoming cleartext is refused for addresses that enforce encryption, and
incoming mail must carry a DKIM signature of its From domain.

Accepted mail is handed back to Postfix unmodified. The reply texts and log lines that
upstream has are an interface (metrics and upstream's online tests match them) and are
kept byte for byte. Where upstream would bounce or lose a message because of a local
failure (reinjection down, an internal error), we answer 4xx so that it is retried;
content that can never pass (even content the parser cannot take apart) gets a 5xx, so
that no sender retries it for days.
"""

import asyncio
import logging
import os
import signal
import smtplib
import sys
from concurrent.futures import ThreadPoolExecutor
from email import policy
from email.parser import BytesParser

from aiosmtpd.smtp import SMTP

from .config import ConfigError, read_config
from .dictproxy import setup_logging
from .mailbox import Mailbox
from .openpgp import check_encrypted, is_securejoin
from .ratelimit import SendRateLimiter
from .sddaemon import listen_fds, notify

log = logging.getLogger("filtermail")

ENCRYPTION_NEEDED_523 = "523 Encryption Needed: Invalid Unencrypted Mail"
# Incoming mail that Python's parser cannot take apart (e.g. thousands of nested parts)
# and that no recipient's encryption rule already refuses: it can never pass.
UNPARSEABLE_554 = "554 5.6.0 Malformed message, cannot be checked"
REINJECT_FAILED_451 = "451 4.3.0 Could not hand the message back to Postfix, try again later"
INTERNAL_ERROR_451 = "451 4.3.0 Internal error while filtering, try again later"
LISTEN_HOST = "127.0.0.1"
REINJECT_HOST = "127.0.0.1"
REINJECT_TIMEOUT = 60
WORKER_THREADS = 16
# MAIL FROM parameters that aiosmtpd itself understands; all others are dropped.
KNOWN_MAIL_PARAMS = ("SIZE", "BODY", "SMTPUTF8")


class UnparseableMessage(Exception):
    """The message's structure defeats the parser: hostile, never a transient fault."""


class HeaderCachingPolicy(policy.EmailPolicy):
    """policy.default that parses each header value once per message. The parser itself
    asks for the Content-Type about ten times per part, and policy.default parses the
    header anew each time: for a 10 KB encrypted message, 1.6 of its 2.1 ms. Header
    objects are immutable strings, so sharing them changes no result."""

    def header_fetch_parse(self, name, value):
        cache = self.__dict__["_headers"]
        key = (name, value)
        if key not in cache:
            cache[key] = super().header_fetch_parse(name, value)
        return cache[key]


def message_policy():
    """A policy with its own cache: it lives as long as the one message it parsed."""
    parsing = HeaderCachingPolicy()
    object.__setattr__(parsing, "_headers", {})  # policies refuse attribute assignment
    return parsing


def parse_message(content):
    try:
        return BytesParser(policy=message_policy()).parsebytes(content)
    except RecursionError:
        # The parser recurses once per nested multipart level.
        raise UnparseableMessage("too deeply nested") from None


def single_from_address(message):
    """The address of the message's only From header, or None when there is no From,
    more than one, or one with a number of addresses other than one (all of which mail
    clients may display differently from what was checked)."""
    values = [value for name, value in message.raw_items() if name.lower() == "from"]
    if len(values) != 1:
        return None
    try:
        addresses = policy.default.header_factory("from", utf8_header(values[0])).addresses
    except Exception:  # header parsing of hostile input: treat as unusable
        return None
    if len(addresses) != 1 or not addresses[0].addr_spec:
        return None
    return addresses[0].addr_spec


def utf8_header(value):
    """The header as text. The parser keeps 8-bit bytes surrogate-escaped; in headers
    they are UTF-8 (RFC 6532, internationalized addresses)."""
    value = value.replace("\r", "").replace("\n", "")  # unfold
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("ascii", "surrogateescape").decode("utf-8", "replace")


def address_domain(addr):
    return addr.rpartition("@")[2] if addr and "@" in addr else None


def envelope_sender(envelope):
    """MAIL FROM as an address; aiosmtpd keeps the null sender as the text '<>'."""
    mail_from = envelope.mail_from or ""
    return "" if mail_from == "<>" else mail_from


def is_autocrypt_setup_message(message, rcpt_tos, from_addr):
    """A self-sent Autocrypt Setup Message: its key is encrypted with a setup code."""
    return (
        [rcpt.lower() for rcpt in rcpt_tos] == [from_addr.lower()]
        and str(message.get("subject", "")) == "Autocrypt Setup Message"
        and message.get_content_type() == "multipart/mixed"
    )


def is_mailer_daemon_report(message):
    """A delivery status report, which Delta Chat shows as an error, not as a message."""
    if not message.get("auto-submitted"):
        return False
    from_addr = single_from_address(message) or ""
    return (
        from_addr.lower().startswith("mailer-daemon@")
        and message.get_content_type() == "multipart/report"
    )


def reinject_mail_options(mail_options, mail_from, rcpt_tos):
    """The MAIL FROM parameters to pass on: the client's BODY= and SMTPUTF8, and SMTPUTF8
    whenever an address needs it (aiosmtpd accepts UTF-8 addresses without it)."""
    options = [option for option in mail_options
               if option.upper() == "SMTPUTF8" or option.upper().startswith("BODY=")]
    needs_utf8 = not all(addr.isascii() for addr in [mail_from, *rcpt_tos])
    if needs_utf8 and "SMTPUTF8" not in (option.upper() for option in options):
        options.append("SMTPUTF8")
    return options


def printable(addr):
    """An address fit for a reply line: client-supplied text may hold control characters
    or undecodable bytes (kept by aiosmtpd as surrogate escapes)."""
    if addr.isprintable():
        return addr
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in addr)


def one_line(text):
    return " ".join(text.split())


class FilterSMTP(SMTP):
    """aiosmtpd's server, tolerant of the ESMTP parameters real MTAs send.

    aiosmtpd answers 555 to any RCPT TO parameter and to unknown MAIL FROM parameters,
    but Postfix and Stalwart send DSN parameters (ORCPT=, NOTIFY=, ENVID=, RET=). Those
    are dropped; SIZE, BODY and SMTPUTF8 are still checked by aiosmtpd.
    """

    def _getparams(self, params):
        parsed = super()._getparams(params) or {}
        return {key: value for key, value in parsed.items() if key in KNOWN_MAIL_PARAMS}


class BeforeQueueFilter:
    """Shared part of both filters: aiosmtpd's DATA hook and the reinjection."""

    direction = ""

    def __init__(self, config):
        self.config = config

    @property
    def reinject_port(self):
        raise NotImplementedError

    async def handle_DATA(self, server, session, envelope):
        return await self.filter(envelope)

    async def filter(self, envelope):
        """Check one message and reinject it if it passes; returns the SMTP reply."""
        try:
            error, reinject_from = await self.check(envelope)
            if error:
                return error
            options = reinject_mail_options(envelope.mail_options, reinject_from,
                                            envelope.rcpt_tos)
            return await asyncio.to_thread(self.reinject, reinject_from, envelope.rcpt_tos,
                                           envelope.original_content, options)
        except Exception:
            # A 4xx keeps the message queued at the sender instead of bouncing it.
            log.exception("%s: filtering failed", self.direction)
            return INTERNAL_ERROR_451

    async def check(self, envelope):
        """(error reply or None, MAIL FROM to reinject with)."""
        raise NotImplementedError

    def check_DATA(self, envelope):
        """None if the message may pass, else the SMTP error reply (as upstream's API)."""
        return asyncio.run(self.check(envelope))[0]

    def reinject(self, mail_from, rcpt_tos, content, mail_options=()):
        """Hand the unmodified message to Postfix's reinjection port.

        Any failure becomes a 4xx so that the sending Postfix keeps the message and
        retries, except a 4xx/5xx answer to the message itself, which is passed on.
        """
        try:
            # A fixed EHLO name: smtplib's default resolves our FQDN on every connection.
            with smtplib.SMTP(REINJECT_HOST, self.reinject_port, local_hostname="localhost",
                              timeout=REINJECT_TIMEOUT) as client:
                refused = client.sendmail(mail_from, rcpt_tos, content, list(mail_options))
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = next(iter(exc.recipients.values()))
            return self._passed_on_error(code, text)
        except (smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as exc:
            return self._passed_on_error(exc.smtp_code, exc.smtp_error)
        except UnicodeError:
            # An address that is not even valid UTF-8 will never get through.
            return "553 5.1.3 Invalid characters in address"
        except (OSError, smtplib.SMTPException) as exc:
            log.error("%s: reinjection to port %d failed: %s",
                      self.direction, self.reinject_port, exc)
            return REINJECT_FAILED_451
        if refused:
            # Cannot be answered per recipient after DATA; Postfix's reinjection service
            # accepts all recipients, so this means a misconfiguration.
            log.error("%s: reinjection refused some recipients: %r", self.direction, refused)
        return "250 OK"

    def _passed_on_error(self, code, text):
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        log.warning("%s: reinjection answered %s %s", self.direction, code, one_line(text))
        if not 400 <= code < 600:
            return REINJECT_FAILED_451
        return f"{code} {one_line(text)}"


class OutgoingFilter(BeforeQueueFilter):
    """Mail submitted by our users (Postfix submission/smtps) before it is queued."""

    direction = "Outgoing"

    def __init__(self, config):
        super().__init__(config)
        self.rate_limiter = SendRateLimiter(
            config.max_user_send_per_minute, config.max_user_send_burst_size
        )

    @property
    def reinject_port(self):
        return self.config.postfix_reinject_port

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        error = self.check_MAIL(address)
        if error:
            return error
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    def check_MAIL(self, address):
        if len(address.split("@")) != 2:
            return f"500 Invalid from address <{printable(address)}>"
        if not self.rate_limiter.is_sending_allowed(address):
            return f"450 4.7.1: Too much mail from {printable(address)}"
        return None

    async def check(self, envelope):
        # Parsing and checking a message of up to max_message_size is CPU work; doing it
        # in a thread keeps other SMTP sessions responsive.
        return await asyncio.to_thread(self.inspect, envelope)

    def inspect(self, envelope):
        mail_from = envelope_sender(envelope)
        try:
            message = parse_message(envelope.content)
        except UnparseableMessage as exc:
            log.info("Outgoing: cannot parse the message: %s", exc)
            log.info("Rejected unencrypted mail.")
            return ENCRYPTION_NEEDED_523, mail_from
        from_addr = single_from_address(message)
        if from_addr is None or from_addr.lower() != mail_from.lower():
            reply = f"500 Invalid FROM <{printable(from_addr or '')}> for <{printable(mail_from)}>"
            return reply, mail_from

        if check_encrypted(message, outgoing=True) or is_securejoin(message):
            log.info("Outgoing: Filtering encrypted mail.")
            return None, mail_from

        log.info("Outgoing: Filtering unencrypted mail.")
        if is_autocrypt_setup_message(message, envelope.rcpt_tos, from_addr):
            return None, mail_from
        log.info("Rejected unencrypted mail.")
        return ENCRYPTION_NEEDED_523, mail_from


class IncomingFilter(BeforeQueueFilter):
    """Mail from other servers (Postfix port 25) before it is queued for delivery."""

    direction = "Incoming"

    def __init__(self, config, verify_dkim=True, key_lookup=None):
        super().__init__(config)
        self.verify_dkim = verify_dkim
        self.key_lookup = key_lookup
        if verify_dkim:
            from .dkimverify import TxtLookup, check_dkim_async

            self._check_dkim = check_dkim_async
            if self.key_lookup is None:
                self.key_lookup = TxtLookup()

    @property
    def reinject_port(self):
        return self.config.postfix_reinject_port_incoming

    async def check(self, envelope):
        # The content checks are CPU work for a thread; DKIM waits on DNS in the event
        # loop, so a slow zone holds no thread that other senders' mail needs.
        error, mail_from, from_domain = await asyncio.to_thread(self.inspect, envelope)
        if error is None and self.verify_dkim:
            error = await self._check_dkim(envelope.content, from_domain, self.key_lookup)
        return error, mail_from

    def inspect(self, envelope):
        """(error reply or None, MAIL FROM to reinject with, From domain for DKIM)."""
        mail_from = envelope_sender(envelope)
        try:
            message = parse_message(envelope.content)
        except UnparseableMessage as exc:
            log.info("Incoming: cannot parse the message: %s", exc)
            return self.refuse_unparseable(envelope.rcpt_tos), mail_from, None
        from_addr = single_from_address(message)
        error = self.check_content(message, envelope.rcpt_tos, from_addr)
        if from_addr is None or mail_from.lower() != from_addr.lower():
            # Forwarders (SRS) send with their own MAIL FROM. A bounce to them would go to
            # the wrong party, so Postfix must not bounce: reinject as a null sender.
            mail_from = ""
        return error, mail_from, address_domain(from_addr)

    def refuse_unparseable(self, rcpt_tos):
        """What cannot be parsed is not encrypted: upstream's 523 where a recipient
        refuses cleartext; otherwise still refused, since nothing about it can be
        checked (not even its From for DKIM)."""
        if all(self.recipient_accepts_cleartext(rcpt) for rcpt in rcpt_tos):
            return UNPARSEABLE_554
        log.info("Rejected unencrypted mail.")
        return ENCRYPTION_NEEDED_523

    def check_content(self, message, rcpt_tos, from_addr):
        if check_encrypted(message, outgoing=False) or is_securejoin(message):
            log.info("Incoming: Filtering encrypted mail.")
            return None

        log.info("Incoming: Filtering unencrypted mail.")
        if is_mailer_daemon_report(message):
            log.info("Incoming: Filtering mailer-daemon message from %s", from_addr)
            return None
        for recipient in rcpt_tos:
            if not self.recipient_accepts_cleartext(recipient):
                log.info("Rejected unencrypted mail.")
                return ENCRYPTION_NEEDED_523
        return None

    def recipient_accepts_cleartext(self, recipient):
        """False if the recipient's mailbox refuses cleartext (enforceE2EEincoming).

        Postfix and Dovecot ignore case and deliver user+detail@ to user@, so all those
        spellings are checked. Addresses of other domains have no mailbox here; names of
        our domain that cannot be a mailbox (path tricks, odd characters) are refused.
        """
        addr = recipient.lower()
        localpart, _, domain = addr.rpartition("@")
        if domain != self.config.mail_domain.lower():
            return True
        candidates = {addr, localpart.partition("+")[0] + "@" + domain}
        for candidate in candidates:
            try:
                mailbox = Mailbox(self.config, candidate)
            except ValueError:
                return False
            if not mailbox.accepts_incoming_cleartext():
                return False
        return True


def make_filter(config, mode):
    if mode == "outgoing":
        return OutgoingFilter(config)
    skip_dkim = os.environ.get("FILTERMAIL_SKIP_DKIM") == "1"
    if skip_dkim:
        log.warning("DKIM verification DISABLED!")
    return IncomingFilter(config, verify_dkim=not skip_dkim)


def listen_port(config, mode):
    if mode == "outgoing":
        return config.filtermail_smtp_port
    return config.filtermail_smtp_port_incoming


# How long a stop lets the sessions in progress finish. Postfix opens one per message
# (MAIL FROM to QUIT); with socket activation new connections wait meanwhile in the
# socket's queue, for the next filtermail.
STOP_TIMEOUT = 30


class TrackedSMTP(FilterSMTP):
    """FilterSMTP that is in `sessions` while its connection is open, so that a stop can
    wait for the messages in progress."""

    def __init__(self, *args, sessions, **kwargs):
        super().__init__(*args, **kwargs)
        self.sessions = sessions

    def connection_made(self, transport):
        self.sessions.add(self)
        super().connection_made(transport)

    def connection_lost(self, error):
        super().connection_lost(error)
        self.sessions.discard(self)


async def open_servers(loop, make_protocol, config, mode):
    """Servers on the sockets systemd passed (socket activation: systemd keeps them open
    across restarts, so no connection is refused meanwhile), or else on the port
    chatmail.ini gives."""
    port = listen_port(config, mode)
    passed = listen_fds()
    if not passed:
        return [await loop.create_server(make_protocol, host=LISTEN_HOST, port=port)]
    # IPv4 and IPv6 addresses are tuples with the port second; unix sockets' are paths.
    addresses = [sock.getsockname() for sock in passed]
    ports = [address[1] for address in addresses if isinstance(address, tuple)]
    if port not in ports:
        log.warning("listening on the port systemd passed (%s), not on %d from chatmail.ini:"
                    " run 'chatmail configure'", ", ".join(map(str, ports)), port)
    return [await loop.create_server(make_protocol, sock=sock) for sock in passed]


async def sessions_ended(sessions, timeout):
    """Wait until no session is open, or `timeout` seconds have passed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while sessions and loop.time() < deadline:
        await asyncio.sleep(0.02)
    if sessions:
        log.warning("stopping with %d SMTP sessions still open", len(sessions))


async def serve(config, mode, handler):
    """Serve until SIGTERM or SIGINT, then let the messages in progress finish."""
    loop = asyncio.get_running_loop()
    sessions = set()

    def make_protocol():
        # hostname is fixed: aiosmtpd's default looks up the FQDN for every connection.
        return TrackedSMTP(
            handler,
            sessions=sessions,
            data_size_limit=config.max_message_size,
            enable_SMTPUTF8=True,
            hostname="localhost",
            ident="chatmail filtermail",
            loop=loop,
        )

    # Threads parse and check messages and hand them back to Postfix, which may be slow
    # to answer; more of them than asyncio's default (cores + 4) keep a slow reinjection
    # from stalling every other message. DNS lookups wait in the event loop instead.
    loop.set_default_executor(ThreadPoolExecutor(max_workers=WORKER_THREADS))
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    servers = await open_servers(loop, make_protocol, config, mode)
    # systemd (Type=notify) counts the filter as started from here: it accepts SMTP.
    notify("READY=1")
    log.info("entering serving loop")
    try:
        await stop.wait()
        notify("STOPPING=1")
        close_servers(servers)
        # Not wait_closed(): before Python 3.12 it does not wait for the sessions, since
        # then also for idle ones without a bound.
        await sessions_ended(sessions, STOP_TIMEOUT)
    finally:
        close_servers(servers)
    log.info("filtermail %s stopped", mode)


def close_servers(servers):
    """Stop accepting connections (those already accepted go on)."""
    for server in servers:
        server.close()


class UsageError(Exception):
    pass


USAGE = "usage: filtermail INI outgoing|incoming"
HELP = f"""{USAGE}

Before-queue SMTP filter of a chatmail relay: lets only encrypted mail through
(outgoing) and checks encryption and DKIM of arriving mail (incoming).

  INI       path to chatmail.ini
  outgoing  the filter of mail our users submit
  incoming  the filter of mail from other servers
"""
MODES = ("outgoing", "incoming")


def parse_args(argv):
    """(INI path, mode); UsageError for anything else. Two positional arguments need no
    argparse, which (with gettext) is 0.5 MB of each filter's memory (bench/README.md)."""
    if len(argv) != 2:
        raise UsageError(f"expected INI and a mode, got {len(argv)} arguments")
    inipath, mode = argv
    if mode not in MODES:
        raise UsageError(f"mode must be outgoing or incoming, not {mode!r}")
    return inipath, mode


def skip_unused_http_clients():
    """Keep dnspython from importing HTTP client libraries in the daemon.

    Debian 12's dnspython imports requests and httpx (when installed) for DNS-over-HTTPS,
    which filtermail never uses; they would make up 40% of the incoming filter's memory.
    Marking them absent makes dnspython skip them. Only the daemon's own process does this
    (main() called without arguments), never an importer of this module.
    """
    for name in ("httpx", "requests", "requests_toolbelt"):
        sys.modules.setdefault(name, None)


def quiet_library_loggers():
    # aiosmtpd logs every connection, sender and recipient at INFO: noise in the journal
    # and addresses that the relay does not need to keep.
    logging.getLogger("mail.log").setLevel(logging.WARNING)


def main(argv=None):
    setup_logging()
    quiet_library_loggers()
    run_as_program = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(HELP, end="")
        return 0
    try:
        inipath, mode = parse_args(argv)
    except UsageError as exc:
        print(f"filtermail: error: {exc}\n{USAGE}", file=sys.stderr)
        return 1
    try:
        config = read_config(inipath)
    except ConfigError as exc:
        print(f"filtermail: error: {exc}", file=sys.stderr)
        return 1
    if mode == "incoming" and run_as_program:
        skip_unused_http_clients()
    try:
        handler = make_filter(config, mode)
    except ImportError as exc:
        print(f"filtermail: error: {exc}", file=sys.stderr)
        return 1
    try:
        asyncio.run(serve(config, mode, handler))
    except OSError as exc:
        print(f"filtermail: error: cannot listen on {LISTEN_HOST}:"
              f"{listen_port(config, mode)}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
