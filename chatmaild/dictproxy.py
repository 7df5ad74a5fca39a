"""A server for Dovecot's dict protocol (the "proxy" dict client) on a unix socket.

Each request is one line: a command character followed by TAB-separated fields.
Dovecot escapes TAB, LF, CR and \\001 inside fields with \\001 sequences (str_tabescape).
Transactions (B/S/C) belong to one connection: Dovecot reuses transaction ids across
connections, so they must not be shared.
"""

import contextlib
import logging
import os
import socketserver
import sys

log = logging.getLogger(__name__)

_UNESCAPES = {"1": "\x01", "t": "\t", "r": "\r", "n": "\n", "0": "\x00"}


def tab_unescape(field):
    """Undo Dovecot's str_tabescape()."""
    if "\x01" not in field:
        return field
    out = []
    chars = iter(field)
    for char in chars:
        if char == "\x01":
            out.append(_UNESCAPES.get(next(chars, ""), ""))
        else:
            out.append(char)
    return "".join(out)


def tab_escape(field):
    """Dovecot's str_tabescape(), for values we send back."""
    return (
        field.replace("\x01", "\x011").replace("\t", "\x01t")
        .replace("\r", "\x01r").replace("\n", "\x01n")
    )


class DictServer:
    """Subclasses override lookup(), iterate() and set_value()."""

    def lookup(self, key, user):
        """Return the value for `key` (a str), or None when it does not exist."""
        return None

    def iterate(self, path, user):
        """Yield (key, value) pairs below `path`."""
        return ()

    def set_value(self, user, key, value):
        """Store one value of a transaction; return False if it failed."""
        log.warning("dict set ignored: %r", key)
        return False

    # -- protocol --------------------------------------------------------------------

    def handle_line(self, line, transactions):
        """Answer one request line; returns the reply (possibly empty)."""
        if not line:
            return ""
        command, fields = line[0], [tab_unescape(f) for f in line[1:].split("\t")]
        if command == "H":
            return ""
        if command == "L":
            return self._reply_lookup(fields)
        if command == "I":
            return self._reply_iterate(fields)
        if command == "B" and len(fields) >= 1:
            user = fields[1] if len(fields) > 1 else ""
            transactions[fields[0]] = {"user": user, "ok": True}
            return ""
        if command == "S" and len(fields) >= 3 and fields[0] in transactions:
            txn = transactions[fields[0]]
            if not self._safe_set(txn["user"], fields[1], fields[2]):
                txn["ok"] = False
                log.error("dictproxy-set failed for %r: %r", txn["user"], line)
            return ""
        if command == "C" and fields and fields[0] in transactions:
            return "O\n" if transactions.pop(fields[0])["ok"] else "F\n"
        if command == "R" and fields:
            transactions.pop(fields[0], None)
            return ""
        log.warning("unknown dictproxy request: %r", line)
        return ""

    def _reply_lookup(self, fields):
        key = fields[0]
        user = fields[1] if len(fields) > 1 else ""
        try:
            value = self.lookup(key, user)
        except Exception:
            log.exception("lookup failed: %r", key)
            return "F\n"
        if value is None:
            return "N\n"
        return f"O{tab_escape(value)}\n"

    def _reply_iterate(self, fields):
        # I<flags>\t<max rows>\t<path>[\t<user>]; an empty line ends the listing.
        if len(fields) < 3:
            return "\n"
        user = fields[3] if len(fields) > 3 else ""
        try:
            rows = [
                f"O{tab_escape(key)}\t{tab_escape(value)}\n"
                for key, value in self.iterate(fields[2], user)
            ]
        except Exception:
            log.exception("iterate failed: %r", fields)
            return "F\n"
        return "".join(rows) + "\n"

    def _safe_set(self, user, key, value):
        try:
            return self.set_value(user, key, value) is not False
        except Exception:
            log.exception("set failed: %r", key)
            return False

    def serve_connection(self, rfile, wfile):
        transactions = {}
        for raw in rfile:
            line = raw.decode("utf-8", "surrogateescape").rstrip("\r\n")
            reply = self.handle_line(line, transactions)
            if reply:
                wfile.write(reply.encode("utf-8", "surrogateescape"))
                wfile.flush()

    def make_server(self, socket_path):
        """Listen on `socket_path` (replacing a stale socket) and return the server.

        The path appears only once the socket listens: it is bound under a temporary name
        and renamed. Bound in place, it would exist a moment before it accepts, and
        whoever waits for it to exist (the units' ExecStartPost, then Dovecot) could be
        refused."""
        dictserver = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                try:
                    dictserver.serve_connection(self.rfile, self.wfile)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        temporary = f"{socket_path}.{os.getpid()}.new"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        server = _Server(temporary, Handler)
        os.replace(temporary, socket_path)
        server.server_address = str(socket_path)
        return server

    def serve_forever(self, socket_path):
        with self.make_server(socket_path) as server:
            try:
                server.serve_forever()
            except KeyboardInterrupt:
                pass


class _Server(socketserver.ThreadingUnixStreamServer):
    request_queue_size = 1000
    daemon_threads = True


def setup_logging():
    """Daemons log to stderr (the journal); upstream's metrics read these lines."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")


def daemon_main(argv, make_dictserver, usage):
    """Shared `NAME SOCKET INI` entry point of the dict-protocol daemons."""
    from .config import ConfigError, read_config

    setup_logging()
    if len(argv) != 2 or argv[0] in ("-h", "--help"):
        print(usage, file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    socket_path, inipath = argv
    try:
        config = read_config(inipath)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    make_dictserver(config).serve_forever(socket_path)
    return 0
