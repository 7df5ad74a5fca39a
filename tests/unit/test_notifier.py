"""The push queue against a real HTTP server, with time running fast."""

import logging
import os
import ssl
import subprocess
import threading
import time

import pytest

from chatmaild.notifier import (
    DROP_DEADLINE,
    Notifier,
    PushClient,
    QueueItem,
    SystemClock,
    max_tries,
    retry_delay,
)
from tests.conftest import free_port
from tests.unit.push_server import STALL, PushServer, push_server  # noqa: F401

ADDR = "user@chat.example.org"
SPEED = 10_000  # 1 s of queue time per 0.1 ms: the 8 s ... 4096 s waits take 0.46 s


class FastClock(SystemClock):
    """The real clock, running SPEED times faster: waits really wait, only shorter."""

    def __init__(self, speed=SPEED):
        self.speed = speed
        self._start_wall = time.time()
        self._start_mono = time.monotonic()

    def now(self):
        return self._start_wall + (time.monotonic() - self._start_mono) * self.speed

    def wait(self, seconds, stop_event):
        return stop_event.wait(max(seconds, 0) / self.speed)


class RemovedTokens(list):
    """What the notifier asked to forget (the 410 callback)."""

    def __call__(self, addr, token):
        self.append((addr, token))


@pytest.fixture
def queue_dir(tmp_path):
    path = tmp_path / "pending_notifications"
    path.mkdir()
    return path


@pytest.fixture
def make_notifier(queue_dir):
    started = []

    def make(url, clock=None, timeout=5.0, start=True):
        notifier = Notifier(queue_dir, url, RemovedTokens(), clock=clock or FastClock(),
                            timeout=timeout)
        started.append(notifier)  # stopped at the end even if the test starts it
        if start:
            notifier.start()
        return notifier

    yield make
    for notifier in started:
        notifier.stop()


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def queue_files(queue_dir):
    return sorted(p.name for p in queue_dir.iterdir())


# -- schedule --------------------------------------------------------------------------


def test_retry_schedule_is_upstreams():
    assert max_tries() == 5
    assert [retry_delay(n) for n in range(max_tries())] == [0, 8, 64, 512, 4096]
    assert DROP_DEADLINE == 5 * 3600


# -- persistent items ------------------------------------------------------------------


def test_queue_item_file_format_and_roundtrip(queue_dir):
    item = QueueItem.create(queue_dir, ADDR, 1700000000.7, "tok en\nwith newline")
    assert item.path.read_text() == f"{ADDR}\n1700000000\ntok en\nwith newline"
    assert item.path.stat().st_mode & 0o777 == 0o600
    assert queue_files(queue_dir) == [item.name]  # no .tmp left behind
    assert QueueItem.read(item.path) == item
    item.delete()
    item.delete()  # twice is harmless
    assert queue_files(queue_dir) == []


def test_upstream_queue_file_is_read(queue_dir):
    path = queue_dir / "0123456789abcdef0123456789abcdef"
    path.write_text(f"{ADDR}\n1712345678\nencryptedtoken")
    item = QueueItem.read(path)
    assert (item.addr, item.start_ts, item.token) == (ADDR, 1712345678, "encryptedtoken")


def test_startup_removes_stray_tmp_and_invalid_files(queue_dir, caplog):
    good = QueueItem.create(queue_dir, ADDR, time.time(), "tok")
    (queue_dir / "abc.tmp").write_text(f"{ADDR}\n1\ntok")
    (queue_dir / "empty").touch()
    (queue_dir / "notanumber").write_text(f"{ADDR}\nsoon\ntok")
    (queue_dir / "twolines").write_text(f"{ADDR}\n1")
    (queue_dir / "notutf8").write_bytes(b"\xff\xfe\n1\nx")
    notifier = Notifier(queue_dir, "http://127.0.0.1:1/", RemovedTokens())
    with caplog.at_level(logging.WARNING):
        notifier.requeue_stored_items()
    assert queue_files(queue_dir) == [good.name]
    assert caplog.text.count("removing spurious queue item") == 5
    when, _, item = notifier.retry_queues[0].get_nowait()
    assert item == good and when <= time.time()


def test_items_older_than_the_deadline_are_dropped_at_startup(queue_dir, caplog):
    QueueItem.create(queue_dir, ADDR, time.time() - DROP_DEADLINE - 10, "old")
    notifier = Notifier(queue_dir, "http://127.0.0.1:1/", RemovedTokens())
    notifier.requeue_stored_items()
    assert queue_files(queue_dir) == []
    assert all(q.empty() for q in notifier.retry_queues)
    assert "exceeded deadline" in caplog.text


def test_malformed_url_is_refused(queue_dir):
    for url in ("", "ftp://example.org/", "notifications.delta.chat/notify", "https:///x"):
        with pytest.raises(ValueError):
            Notifier(queue_dir, url, RemovedTokens())


# -- delivery --------------------------------------------------------------------------


def test_every_token_is_posted_and_its_item_removed(make_notifier, push_server, queue_dir):
    notifier = make_notifier(push_server.url)
    notifier.notify(ADDR, ["token-a", "token-b", "token-c"])
    push_server.wait_for_requests(3)
    assert sorted(push_server.tokens(200)) == ["token-a", "token-b", "token-c"]
    wait_until(lambda: queue_files(queue_dir) == [])
    assert notifier.remove_token == []


def test_failures_are_retried_with_growing_delays(make_notifier, push_server, queue_dir):
    speed = 1000  # slower than elsewhere so that HTTP round trips barely count
    push_server.answer(500, 503, default=200)
    make_notifier(push_server.url, clock=FastClock(speed)).notify(ADDR, ["tok"])
    requests = push_server.wait_for_requests(3)
    assert [status for _, _, status, _ in requests] == [500, 503, 200]
    times = [arrived for arrived, _, _, _ in requests]
    # queue time between tries: 8 s, then 64 s
    first_gap, second_gap = ((b - a) * speed for a, b in zip(times, times[1:]))
    assert 8 <= first_gap < 64
    assert 64 <= second_gap < 512
    wait_until(lambda: queue_files(queue_dir) == [])
    time.sleep(0.2)
    assert len(push_server.received) == 3


def test_item_is_dropped_after_the_last_try(make_notifier, push_server, queue_dir, caplog):
    push_server.answer(default=500)
    with caplog.at_level(logging.WARNING):
        make_notifier(push_server.url).notify(ADDR, ["tok"])
        push_server.wait_for_requests(max_tries())
        wait_until(lambda: queue_files(queue_dir) == [])
        wait_until(lambda: "exceeded deadline" in caplog.text)
    time.sleep(0.5)
    assert len(push_server.received) == max_tries() == 5
    assert caplog.text.count("Notification request failed: HTTP status 500") == 5


def test_no_try_is_made_past_the_deadline(make_notifier, push_server, queue_dir):
    """First try at once, second after 8 s; the third would come 72 s after the first,
    which is past this item's deadline (30 s away), so there are exactly two tries."""
    push_server.answer(default=500)
    clock = FastClock(100)  # the 30 s left must not pass during an HTTP round trip
    notifier = make_notifier(push_server.url, clock=clock, start=False)
    QueueItem.create(queue_dir, ADDR, clock.now() - DROP_DEADLINE + 30, "tok")
    notifier.start()
    push_server.wait_for_requests(2)
    wait_until(lambda: queue_files(queue_dir) == [])
    time.sleep(0.3)
    assert len(push_server.received) == 2


def test_unreachable_server_is_retried(make_notifier, queue_dir, caplog):
    url = f"http://127.0.0.1:{free_port()}/notify"  # nothing listens there
    with caplog.at_level(logging.WARNING):
        make_notifier(url).notify(ADDR, ["tok"])
        wait_until(lambda: queue_files(queue_dir) == [])
    assert caplog.text.count("Notification request failed: ConnectionRefusedError") == 5


def test_a_stalled_request_times_out_and_is_retried(make_notifier, push_server, queue_dir):
    push_server.answer(STALL, default=200)
    make_notifier(push_server.url, timeout=0.2).notify(ADDR, ["tok"])
    requests = push_server.wait_for_requests(2)
    assert [status for _, _, status, _ in requests] == [STALL, 200]
    wait_until(lambda: queue_files(queue_dir) == [])


def test_gone_token_is_forgotten_and_not_retried(make_notifier, push_server, queue_dir):
    push_server.answer(410, default=200)
    notifier = make_notifier(push_server.url)
    notifier.notify(ADDR, ["dead"])
    push_server.wait_for_requests(1)
    wait_until(lambda: queue_files(queue_dir) == [])
    assert notifier.remove_token == [(ADDR, "dead")]
    time.sleep(0.2)
    assert len(push_server.received) == 1


def test_stop_keeps_queued_items_for_the_next_start(make_notifier, push_server, queue_dir):
    push_server.answer(default=500)
    slow = make_notifier(push_server.url, clock=SystemClock())  # retry waits 8 real seconds
    slow.notify(ADDR, ["tok"])
    push_server.wait_for_requests(1)
    slow.stop()
    assert len(queue_files(queue_dir)) == 1
    push_server.answer(default=200)
    make_notifier(push_server.url)
    requests = push_server.wait_for_requests(2)
    assert [status for _, _, status, _ in requests] == [500, 200]
    wait_until(lambda: queue_files(queue_dir) == [])


def test_stop_interrupts_a_waiting_worker(make_notifier, push_server):
    push_server.answer(default=500)
    notifier = make_notifier(push_server.url, clock=SystemClock(), start=False)
    notifier.start()
    notifier.notify(ADDR, ["tok"])
    push_server.wait_for_requests(1)
    workers = [t for t in threading.enumerate() if t.name.startswith("notify-")]
    started = time.monotonic()
    notifier.stop()
    assert time.monotonic() - started < 2  # not the 8 s the retry worker was waiting
    assert not any(t.is_alive() for t in workers)


# -- HTTP client -----------------------------------------------------------------------


def test_client_keeps_the_connection_alive(push_server):
    client = PushClient(push_server.url)
    assert [client.post("a"), client.post("b")] == [200, 200]
    ports = [port for _, _, _, port in push_server.received]
    assert ports[0] == ports[1]
    client.close()


def test_client_reconnects_when_the_server_closed_an_idle_connection():
    server = PushServer(idle_timeout=0.1)
    try:
        client = PushClient(server.url)
        assert client.post("a") == 200
        time.sleep(0.4)  # the server drops the kept-alive connection meanwhile
        assert client.post("b") == 200
        assert server.tokens() == ["a", "b"]  # each token posted exactly once
        client.close()
    finally:
        server.close()


def test_client_sends_the_token_as_the_body(push_server):
    client = PushClient(push_server.url, timeout=3)
    assert client.post("ÄbC/+=") == 200
    assert push_server.tokens() == ["ÄbC/+="]
    client.close()


def test_queue_files_are_private_whatever_the_umask(queue_dir):
    old = os.umask(0)
    try:
        item = QueueItem.create(queue_dir, ADDR, 1, "tok")
    finally:
        os.umask(old)
    assert item.path.stat().st_mode & 0o777 == 0o600


@pytest.fixture
def tls_push_server(tmp_path):
    """An https push server with a self-signed certificate for 127.0.0.1."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = PushServer(tls_context=context)
    server.cert = cert
    yield server
    server.close()


def test_https_certificates_are_verified(tls_push_server):
    client = PushClient(tls_push_server.url, timeout=5)
    with pytest.raises(ssl.SSLCertVerificationError):
        client.post("tok")
    client.close()
    assert tls_push_server.received == []


def test_https_push_to_a_trusted_server(tls_push_server, monkeypatch):
    # OpenSSL reads SSL_CERT_FILE when the default context loads the system CA store
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_push_server.cert))
    client = PushClient(tls_push_server.url, timeout=5)
    assert [client.post("tok1"), client.post("tok2")] == [200, 200]
    assert tls_push_server.tokens() == ["tok1", "tok2"]
    client.close()
