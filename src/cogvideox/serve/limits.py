"""Who is calling, and how much they may ask: API keys, a per-key rate limit on new jobs.

(The per-key limit on queued jobs lives in the queue's insert, `JobStore.create(owner_limit=...)`, so
that it holds across API servers.)
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time


class ApiKeys:
    """The accepted keys; with none, the service is open and callers are told apart by address."""

    def __init__(self, keys: tuple[str, ...] | list[str] = ()) -> None:
        self._keys = [k.encode() for k in keys if k]

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def owner(self, token: str | None, client_host: str | None) -> str | None:
        """The caller's identity for limits and job ownership, or None when a key is required and `token`
        is not one of them. A key itself is never stored: jobs record a hash of it."""
        if not self._keys:
            return f"ip:{client_host or 'unknown'}"
        if token is None:
            return None
        given = token.encode()
        # Compare with every key in constant time, so timing tells nothing about how much of a key matched.
        if not any([hmac.compare_digest(given, key) for key in self._keys]):
            return None
        return "key:" + hashlib.sha256(given).hexdigest()[:16]


class RateLimiter:
    """Token buckets: each owner may start `per_minute` jobs a minute, in bursts of up to `per_minute` (one
    at least: a bucket that cannot hold a whole token, under one a minute, would never let a job through).

    In memory, per API process; several API servers behind a balancer each apply it to what they see.
    """

    def __init__(self, per_minute: float) -> None:
        self.capacity = max(1.0, per_minute) if per_minute > 0 else 0.0
        self.rate = per_minute / 60.0  # tokens per second
        self._buckets: dict[str, tuple[float, float]] = {}  # owner -> (tokens, time of last update)
        self._lock = threading.Lock()

    def take(self, owner: str) -> float | None:
        """Spend one token: None when allowed, else the seconds until the next token."""
        if self.capacity <= 0:
            return None
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(owner, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[owner] = (tokens, now)
                return (1.0 - tokens) / self.rate
            self._buckets[owner] = (tokens - 1.0, now)
            if len(self._buckets) > 10_000:
                self._forget_idle(now)
        return None

    def give_back(self, owner: str) -> None:
        """Return the token of a `take` that started no job."""
        if self.capacity <= 0:
            return
        with self._lock:
            if owner in self._buckets:
                tokens, last = self._buckets[owner]
                self._buckets[owner] = (min(self.capacity, tokens + 1.0), last)

    def _forget_idle(self, now: float) -> None:
        # A bucket that has refilled completely is the same as no bucket.
        full_after = self.capacity / self.rate
        self._buckets = {o: (t, last) for o, (t, last) in self._buckets.items() if now - last < full_after}
