import pytest

from chatmaild import ratelimit
from chatmaild.ratelimit import SendRateLimiter


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


def sends_allowed(limiter, sender, count):
    return [limiter.is_sending_allowed(sender) for _ in range(count)]


def test_burst_then_refused(clock):
    limiter = SendRateLimiter(60, 10, clock=clock)
    assert sends_allowed(limiter, "a@x.org", 10) == [True] * 10
    assert not limiter.is_sending_allowed("a@x.org")
    assert limiter.delay("a@x.org") == pytest.approx(1.0)


def test_refill_at_the_configured_rate(clock):
    limiter = SendRateLimiter(30, 3, clock=clock)  # one message every 2 s
    assert sends_allowed(limiter, "a@x.org", 4) == [True, True, True, False]
    clock.now += 1.9
    assert not limiter.is_sending_allowed("a@x.org")
    clock.now += 0.1
    assert limiter.is_sending_allowed("a@x.org")
    assert not limiter.is_sending_allowed("a@x.org")
    clock.now += 6.0  # three intervals: the burst is available again
    assert sends_allowed(limiter, "a@x.org", 4) == [True, True, True, False]


def test_steady_rate_is_sustained(clock):
    limiter = SendRateLimiter(60, 1, clock=clock)
    for _ in range(100):
        assert limiter.is_sending_allowed("a@x.org")
        clock.now += 1.0
    assert limiter.is_sending_allowed("a@x.org")
    assert not limiter.is_sending_allowed("a@x.org")


def test_refused_messages_do_not_count(clock):
    limiter = SendRateLimiter(60, 2, clock=clock)
    assert sends_allowed(limiter, "a@x.org", 50) == [True, True] + [False] * 48
    clock.now += 1.0
    assert limiter.is_sending_allowed("a@x.org")


def test_senders_are_independent_and_case_insensitive(clock):
    limiter = SendRateLimiter(60, 2, clock=clock)
    assert sends_allowed(limiter, "a@x.org", 2) == [True, True]
    assert not limiter.is_sending_allowed("A@X.org")
    assert limiter.is_sending_allowed("b@x.org")


def test_per_minute_never_triggers_before_burst(clock):
    # what upstream's online test requires of a deployed relay
    for per_minute, burst in [(60, 10), (1, 5), (1000, 1)]:
        limiter = SendRateLimiter(per_minute, burst, clock=clock)
        assert all(sends_allowed(limiter, f"s{per_minute}@x.org", burst))


def test_idle_senders_are_forgotten(clock, monkeypatch):
    monkeypatch.setattr(ratelimit, "SWEEP_EVERY", 10)
    limiter = SendRateLimiter(60, 5, clock=clock)
    for index in range(9):
        limiter.is_sending_allowed(f"user{index}@x.org")
    assert len(limiter) == 9
    clock.now += 2.0
    limiter.is_sending_allowed("new@x.org")  # 10th check sweeps
    assert len(limiter) == 1


def test_invalid_parameters():
    with pytest.raises(ValueError):
        SendRateLimiter(0, 1)
    with pytest.raises(ValueError):
        SendRateLimiter(1, 0)
