"""A real HTTP server on 127.0.0.1 standing in for notifications.delta.chat in tests."""

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

STALL = "stall"  # an answer that never comes in time: the client's timeout must fire


class PushServer:
    """Answers each POST with the next queued status, then with `default_status`."""

    def __init__(self, idle_timeout=None, tls_context=None):
        self.answers = []
        self.default_status = 200
        self.token_statuses = {}  # token -> status, before any other rule
        self.received = []  # (monotonic time, body, status answered, client port)
        self._changed = threading.Condition()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._make_handler(idle_timeout))
        self._httpd.daemon_threads = True
        self.scheme = "http"
        if tls_context is not None:
            self.scheme = "https"
            self._httpd.socket = tls_context.wrap_socket(self._httpd.socket, server_side=True)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def url(self):
        return f"{self.scheme}://127.0.0.1:{self._httpd.server_address[1]}/notify"

    def answer(self, *statuses, default=None):
        """Answer the next POSTs with `statuses`, later ones with `default`."""
        with self._changed:
            self.answers = list(statuses)
            if default is not None:
                self.default_status = default

    def answer_token(self, token, status):
        """Always answer POSTs of `token` with `status`."""
        with self._changed:
            self.token_statuses[token] = status

    def tokens(self, status=None):
        with self._changed:
            return [body for _, body, answered, _ in self.received
                    if status is None or answered == status]

    def wait_for_requests(self, count, timeout=10.0):
        """Block until `count` POSTs arrived; return them all."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.received) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"expected {count} push requests, got {len(self.received)}")
                self._changed.wait(remaining)
            return list(self.received)

    def _next_status(self, token):
        with self._changed:
            if token in self.token_statuses:
                return self.token_statuses[token]
            return self.answers.pop(0) if self.answers else self.default_status

    def _record(self, body, status, port):
        with self._changed:
            self.received.append((time.monotonic(), body, status, port))
            self._changed.notify_all()

    def _make_handler(self, idle_timeout):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like the real service
            timeout = idle_timeout  # closes idle kept-alive connections when set

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length).decode()
                status = server._next_status(body)
                server._record(body, status, self.client_address[1])
                if status == STALL:
                    time.sleep(1.0)
                    self.close_connection = True
                    return
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        return Handler

    def close(self):
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def push_server():
    server = PushServer()
    yield server
    server.close()
