"""Per-sender send rate limit (GCRA), kept in memory like upstream's.

The generic cell rate algorithm keeps one number per sender, the "theoretical arrival
time" (TAT) of its next message. Each accepted message moves the TAT one emission
interval (60 s / rate) further; a message is refused while the TAT is more than `burst`
intervals ahead of now. So a sender may send `burst` messages at once and then one every
interval, which is what upstream's governor `Quota::per_minute(rate).allow_burst(burst)`
does. The state is lost when filtermail restarts, as upstream's is.
"""

import time

# How many checks pass between sweeps of senders whose limit has fully recovered.
SWEEP_EVERY = 1000


class SendRateLimiter:
    def __init__(self, per_minute, burst, clock=time.monotonic):
        if per_minute <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.interval = 60.0 / per_minute
        self.tolerance = self.interval * burst
        self.clock = clock
        self._tat = {}
        self._checks = 0

    def delay(self, sender):
        """Count one message from `sender` and return 0.0, or, if it is over the limit,
        count nothing and return how many seconds remain until it may send again."""
        now = self.clock()
        self._sweep_now_and_then(now)
        key = sender.lower()
        next_tat = max(self._tat.get(key, now), now) + self.interval
        # A tiny epsilon keeps float rounding from refusing a message that is exactly due.
        excess = next_tat - now - self.tolerance
        if excess > 1e-9:
            return excess
        self._tat[key] = next_tat
        return 0.0

    def is_sending_allowed(self, sender):
        return self.delay(sender) == 0.0

    def _sweep_now_and_then(self, now):
        """Forget senders whose TAT has passed: they are as good as new, and this keeps
        memory bounded by the number of senders active in the last burst window."""
        self._checks += 1
        if self._checks % SWEEP_EVERY:
            return
        self._tat = {key: tat for key, tat in self._tat.items() if tat > now}

    def __len__(self):
        return len(self._tat)
