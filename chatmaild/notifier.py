"""Push notifications: tell the notification service that a device has new mail.

For each device token of a recipient, one queue item is written to
<mailboxes_dir>/pending_notifications/<id> ("addr\\nstart_ts\\ntoken", upstream's format, so
a relay moved from upstream keeps its pending items). Worker threads POST the token to
`notification_url`; the item file is removed once the service answered, so items survive a
restart and are re-read at startup.

Retries follow upstream's schedule: try n (n >= 1) waits BASE_DELAY**n seconds
(8 s, 64 s, 512 s, 4096 s); an item is dropped after its last try or once the next try would
fall DROP_DEADLINE (5 h) after its first. 200 means delivered, 410 means the token is dead
(it is removed from the user's metadata), anything else is retried.

Tokens are opaque, encrypted blobs for the notification service; nothing here can tell
which phone or vendor they belong to.
"""

import itertools
import logging
import math
import os
import threading
import time
from collections import namedtuple
from pathlib import Path
from queue import PriorityQueue
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

QUEUE_DIR_NAME = "pending_notifications"
BASE_DELAY = 8  # seconds; try n waits BASE_DELAY**n
DROP_DEADLINE = 5 * 3600  # seconds after the first try
REQUEST_TIMEOUT = 60.0
FIRST_TRY_THREADS = 4
RETRY_THREADS = 2  # per retry level


def max_tries(base_delay=BASE_DELAY, drop_deadline=DROP_DEADLINE):
    """Upstream: int(log_base(deadline)) + 1 tries, i.e. 5 with the defaults."""
    return int(math.log(drop_deadline, base_delay)) + 1


def retry_delay(retry_num, base_delay=BASE_DELAY):
    return 0 if retry_num == 0 else base_delay**retry_num


def worker_count(retry_num):
    """Most notifications succeed at the first try; later tries need fewer workers."""
    return FIRST_TRY_THREADS if retry_num == 0 else RETRY_THREADS


class SystemClock:
    """Wall-clock time; tests pass a faster clock with the same two methods."""

    def now(self):
        return time.time()

    def wait(self, seconds, stop_event):
        """Sleep up to `seconds`; True if `stop_event` was set meanwhile."""
        return stop_event.wait(max(seconds, 0))


# A namedtuple, not a dataclass, and names from os.urandom, not uuid: dataclasses and uuid
# would add 1.4 MB to the daemon's memory (bench/README.md, footprint).
class QueueItem(namedtuple("QueueItem", "path addr start_ts token")):
    __slots__ = ()

    @classmethod
    def create(cls, queue_dir, addr, start_ts, token):
        # 32 hex digits, as upstream's uuid4().hex (nothing reads the name)
        path = Path(queue_dir) / os.urandom(16).hex()
        start_ts = int(start_ts)
        write_item_file(path, f"{addr}\n{start_ts}\n{token}")
        return cls(path, addr, start_ts, token)

    @classmethod
    def read(cls, path):
        """ValueError if the file is not a queue item."""
        addr, start_ts, token = path.read_text(encoding="utf-8").split("\n", 2)
        if not addr or not token:
            raise ValueError("empty address or token")
        return cls(path, addr, int(start_ts), token)

    @property
    def name(self):
        return self.path.name

    def delete(self):
        self.path.unlink(missing_ok=True)


def write_item_file(path, text):
    """Write via <name>.tmp and rename, so a crash leaves a whole item or a stray .tmp.

    No fsync: an item lost to a power cut costs one push; an fsync per incoming message
    would cost every delivery. A truncated item is removed at the next startup.
    """
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.rename(tmp, path)


class PushClient:
    """POSTs tokens over one kept-alive HTTP(S) connection (one client per thread).

    http.client from the standard library rather than requests: it keeps a connection
    alive just as well for a single endpoint, verifies TLS with the system's CA store, and
    keeps the idle daemon several megabytes smaller (see bench/results/metadata.md).

    http.client is imported at the first push, not at start: with it come ssl (OpenSSL)
    and the email package, 5.7 MB of memory a relay that pushes nothing never needs
    (bench/README.md, footprint). The first push waits for the import once (about 10 ms,
    in a worker thread: no Dovecot request waits for it).
    """

    def __init__(self, url, timeout=REQUEST_TIMEOUT):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"notification_url must be an http(s) URL: {url!r}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.timeout = timeout
        self._connection = None

    def post(self, token):
        """Return the HTTP status; OSError or HTTPException if no answer came."""
        import http.client

        body = token.encode("utf-8")
        reused = self._connection is not None
        try:
            return self._post_once(body)
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            self.close()
            if not reused:
                raise
        # Most likely the server closed the idle kept-alive connection before reading our
        # request. Retry once on a fresh connection; at worst a device is woken twice.
        return self._post_once(body)

    def _post_once(self, body):
        connection = self._connection or self._connect()
        self._connection = connection
        try:
            # the bare token as the body, no Content-Type: what upstream's requests sends
            connection.request("POST", self.path, body=body,
                               headers={"User-Agent": "chatmail-metadata"})
            response = connection.getresponse()
            response.read()
        except BaseException:
            self.close()
            raise
        if response.will_close:
            self.close()
        return response.status

    def _connect(self):
        import http.client

        if self.scheme == "https":
            import ssl

            return http.client.HTTPSConnection(
                self.host, self.port, timeout=self.timeout,
                context=ssl.create_default_context())
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def close(self):
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class Notifier:
    """The persistent queue and its worker threads.

    `remove_token(addr, token)` is called when the service says a token is gone (410).
    """

    def __init__(self, queue_dir, url, remove_token, clock=None,
                 base_delay=BASE_DELAY, drop_deadline=DROP_DEADLINE,
                 timeout=REQUEST_TIMEOUT):
        self.queue_dir = Path(queue_dir)
        self.url = url
        self.remove_token = remove_token
        self.clock = clock or SystemClock()
        self.base_delay = base_delay
        self.drop_deadline = drop_deadline
        self.timeout = timeout
        self.retry_queues = [PriorityQueue() for _ in range(max_tries(base_delay, drop_deadline))]
        self._order = itertools.count()  # ties in time never compare QueueItems
        self._stopping = threading.Event()
        self._threads = []
        PushClient(url)  # a malformed URL fails at startup, not at the first push

    # -- queueing --------------------------------------------------------------------

    def notify(self, addr, tokens):
        """Queue one notification per token of `addr`, persisted before this returns."""
        start_ts = int(self.clock.now())
        for token in tokens:
            self.schedule(QueueItem.create(self.queue_dir, addr, start_ts, token), 0)

    def schedule(self, item, retry_num):
        """Queue `item` for try `retry_num`, or drop it if that is past its deadline."""
        when = self.clock.now() + retry_delay(retry_num, self.base_delay)
        if retry_num >= len(self.retry_queues) or when > item.start_ts + self.drop_deadline:
            item.delete()
            log.error("notification exceeded deadline, dropped: %s", item.name)
            return
        self.retry_queues[retry_num].put((when, next(self._order), item))

    def requeue_stored_items(self):
        """Queue the items a previous run left behind; remove what is not an item."""
        for path in sorted(self.queue_dir.iterdir()):
            if path.name.endswith(".tmp"):
                log.warning("removing spurious queue item: %s", path.name)
                path.unlink(missing_ok=True)
                continue
            try:
                item = QueueItem.read(path)
            except (ValueError, UnicodeDecodeError):
                log.warning("removing spurious queue item: %s", path.name)
                path.unlink(missing_ok=True)
                continue
            except OSError as exc:
                log.error("cannot read queue item %s: %s", path.name, exc)
                continue
            self.schedule(item, 0)

    # -- workers ---------------------------------------------------------------------

    def start(self):
        """Re-read stored items and start the worker threads."""
        self.requeue_stored_items()
        for retry_num in range(len(self.retry_queues)):
            for _ in range(worker_count(retry_num)):
                thread = threading.Thread(
                    target=self._work, args=(retry_num,), daemon=True,
                    name=f"notify-{retry_num}")
                thread.start()
                self._threads.append(thread)

    def stop(self, timeout=10):
        """End the workers; queued items stay on disk for the next start."""
        self._stopping.set()
        for retry_num, queue in enumerate(self.retry_queues):
            for _ in range(worker_count(retry_num)):
                queue.put((float("-inf"), next(self._order), None))
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()

    def _work(self, retry_num):
        client = PushClient(self.url, self.timeout)
        queue = self.retry_queues[retry_num]
        try:
            while not self._stopping.is_set():
                when, _, item = queue.get()
                if item is None:
                    break
                if self.clock.wait(when - self.clock.now(), self._stopping):
                    break
                try:
                    self.attempt(client, item, retry_num)
                except Exception:
                    # e.g. the queue directory became unwritable: keep the worker alive,
                    # the item's file stays and is retried at the next start
                    log.exception("notification worker error for %s", item.name)
        finally:
            client.close()

    def attempt(self, client, item, retry_num):
        """One POST of `item`'s token; a failure schedules the next try."""
        try:
            status = client.post(item.token)
        except Exception as exc:  # no answer (refused, timeout, TLS, protocol): retry
            problem = f"{type(exc).__name__}: {exc}"
        else:
            if status == 200:
                item.delete()
                return
            if status == 410:
                self._forget_token(item)
                item.delete()
                return
            problem = f"HTTP status {status}"
        log.warning("Notification request failed: %s", problem)
        self.schedule(item, retry_num + 1)

    def _forget_token(self, item):
        try:
            self.remove_token(item.addr, item.token)
        except Exception:
            # the item is done either way: a dead token is never retried
            log.exception("cannot remove expired token of %s", item.name)
