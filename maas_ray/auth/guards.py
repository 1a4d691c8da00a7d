"""Limits kept in one ingress replica's memory: failed key checks and requests in flight.

Both are per replica, not shared through the database: they guard the replica's own
CPU and event loop, and a database round trip per failure would be the very cost an
attacker is after. With ``R`` ingress replicas a client can get ``R`` times the limits
below (Serve's proxy spreads requests over the replicas).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from maas_ray.auth.keys import ApiKey, Denied

# A wrong secret costs a PBKDF2 (~0.1 s of a CPU): allow a client that mistyped a key a
# few tries, not a stream of guesses. Per key id: a guesser aiming at one key; per client
# address: one guessing at many ids (unknown ids count too, so the limit does not tell
# which ids exist).
FAILURES_PER_KEY_ID = 10
FAILURES_PER_ADDRESS = 100
FAILURE_WINDOW_S = 60
_MAX_TRACKED = 100_000  # counters kept before old windows are swept


class FailureThrottle:
    """Counts failed key checks per key id and per client address in fixed windows;
    :meth:`check` raises :class:`Denied` once either is over its limit."""

    def __init__(self, per_key_id: int = FAILURES_PER_KEY_ID, per_address: int = FAILURES_PER_ADDRESS,
                 window_s: int = FAILURE_WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_key_id, self.per_address, self.window_s, self._clock = per_key_id, per_address, window_s, clock
        self._counts: dict[tuple[str, str], tuple[int, int]] = {}  # (kind, name) → (window, failures)

    def _window(self) -> tuple[int, float]:
        now = self._clock()
        return int(now // self.window_s), now

    def _failures(self, kind: str, name: str, window: int) -> int:
        start, count = self._counts.get((kind, name), (window, 0))
        return count if start == window else 0

    def check(self, key_id: str, address: str) -> None:
        """Refuse (429) before any hashing when this key id or address failed too often."""
        window, now = self._window()
        for kind, name, limit in (("key id", key_id, self.per_key_id), ("address", address, self.per_address)):
            if self._failures(kind, name, window) >= limit:
                retry = math.ceil((window + 1) * self.window_s - now)
                raise Denied(f"too many failed API key checks for this {kind}; retry in {retry} s",
                             retry, "too_many_failed_attempts")

    def fail(self, key_id: str | None, address: str) -> None:
        window, _ = self._window()
        if len(self._counts) > _MAX_TRACKED:
            self._counts = {k: v for k, v in self._counts.items() if v[0] == window}
        for kind, name in (("key id", key_id), ("address", address)):
            if name is not None:
                self._counts[(kind, name)] = (window, self._failures(kind, name, window) + 1)


class ConcurrencyLimit:
    """Requests in flight per key in this replica, at most ``ApiKey.max_concurrent``
    (used from the event loop only, so plain counters suffice)."""

    def __init__(self) -> None:
        self._inflight: dict[str, int] = {}

    def acquire(self, key: ApiKey) -> None:
        """Take one slot for the request's whole life (a stream's too); :class:`Denied` when
        the key has none left. Every successful call needs one :meth:`release`."""
        n = self._inflight.get(key.id, 0)
        if n >= key.max_concurrent:
            raise Denied(f"at most {key.max_concurrent} concurrent requests per key (per ingress "
                         "replica); wait for one to finish", 1, "too_many_concurrent_requests")
        self._inflight[key.id] = n + 1

    def release(self, key: ApiKey) -> None:
        left = self._inflight.get(key.id, 1) - 1
        if left > 0:
            self._inflight[key.id] = left
        else:
            self._inflight.pop(key.id, None)

    def inflight(self, key_id: str) -> int:
        return self._inflight.get(key_id, 0)
