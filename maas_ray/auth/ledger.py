"""Rate windows, token budgets and usage of one process: counted in memory, settled with
the project database in batches.

Why: counting every request in its own write transactions (admit, then record) cost more
than the request itself on a small model (see ``benchmarks/auth_overhead.py``). Here a
request writes to the database only when its key's rate lease runs out.

- **Rate limits, by lease.** A key's window of N requests is handed out in leases of
  :func:`lease_size` (N/10, at least 1). A process claims one with one atomic upsert
  (``count += lease``) and admits from it in memory. Claims never grant more than N per
  window in all, so a key is never admitted more than N requests in a window, across any
  number of processes (tolerance: 0 over). A lease one process does not use is lost to the
  others, so with R ingress replicas a key can be refused up to R × (lease − 1) requests
  before N (none for N ≤ 19).
- **Usage, buffered.** Requests and tokens add to counters in memory; a background thread
  writes them in one transaction every :data:`FLUSH_PERIOD_S` (1 s), and :meth:`Ledger.close`
  writes what is left (the ingress calls it when its replica shuts down). A crash loses at
  most the last period's metering.
- **Token budgets.** A budgeted key's tokens left are its budget, less the day's total in
  the database, less this process's usage not yet written. The total is read (one
  primary-key read, no write) at most once per :data:`FLUSH_PERIOD_S` per key and kept in
  memory between reads; this process's own flushes add to the kept total, so its own usage
  is never missed. Other replicas' usage reaches the database only at their flushes anyway,
  so reading more often would gain at most one period. Tolerance: a key can pass its budget
  by what the other replicas metered for it in their last two periods (one not yet written,
  one not yet re-read; each replica alone stops at the budget, so never more than R × the
  budget in all), plus the in-flight margin of :func:`maas_ray.auth.middleware.tokens_left`.
  Keys without a budget (the default) read nothing.
"""

from __future__ import annotations

import atexit
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import BigInteger, Integer, String, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from maas_ray import db

if TYPE_CHECKING:
    from maas_ray.auth.keys import ApiKey

logger = logging.getLogger(__name__)

FLUSH_PERIOD_S = 1.0
LEASE_SHARE = 10  # a lease is this share of a window's requests: few claims, little stranded


class NeedsDatabase(Exception):
    """Raised by ``memory_only`` calls that would have to wait on the database: the caller
    should retry off the event loop."""


def lease_size(requests_per_window: int) -> int:
    return max(1, requests_per_window // LEASE_SHARE)


class RateWindowRow(db.Base):
    """Requests claimed (leased) in one key's fixed window, by all processes together."""
    __tablename__ = "api_key_rate_windows"
    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    window_start: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    count: Mapped[int] = mapped_column(Integer, default=0)


class UsageRow(db.Base):
    __tablename__ = "api_key_usage"
    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    day: Mapped[str] = mapped_column(String(10), primary_key=True)  # YYYY-MM-DD (UTC)
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)


class Denied(Exception):
    """Over a rate limit, token budget, concurrency limit or failed-check throttle (429);
    ``retry_after`` in whole seconds."""

    def __init__(self, message: str, retry_after: int, code: str) -> None:
        super().__init__(message)
        self.retry_after, self.code = max(1, retry_after), code


def today(now: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(now))


def seconds_to_midnight(now: float | None = None) -> int:
    """Until the daily token budgets start again (UTC midnight), in whole seconds."""
    now = time.time() if now is None else now
    return math.ceil((math.floor(now / 86400) + 1) * 86400 - now)


def upsert_add(s: Session, table: Any, keys: dict[str, Any], adds: dict[str, int],
               extra: dict[str, Any] | None = None) -> None:
    """INSERT the row or add to its counters, atomically, on SQLite and Postgres alike."""
    if s.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    stmt = insert(table).values(**keys, **adds, **(extra or {}))
    stmt = stmt.on_conflict_do_update(
        index_elements=list(keys), set_={k: getattr(table.c, k) + stmt.excluded[k] for k in adds})
    s.execute(stmt)


@dataclass
class _Lease:
    window_start: int
    left: int
    last: bool = False  # the window had no more to grant: refuse without asking again


@dataclass
class _Usage:
    tenant: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Ledger:
    """One process's counters for the keys of one storage root's database (thread-safe)."""

    def __init__(self, root: str | None, flush_period_s: float | None = FLUSH_PERIOD_S) -> None:
        """``flush_period_s=None``: no background flushes (tests call :meth:`flush`)."""
        self.root, self.flush_period_s = root, flush_period_s
        self._lock = threading.Lock()
        self._leases: dict[str, _Lease] = {}
        self._pending: dict[tuple[str, str], _Usage] = {}  # (key id, day) → not yet written
        self._writing: dict[tuple[str, str], _Usage] = {}  # taken by a flush, not yet committed
        # (key id, day) → (when read, the day's tokens in the database then, plus our flushes since)
        self._written: dict[tuple[str, str], tuple[float, int]] = {}
        self._flush_lock, self._claim_lock = threading.Lock(), threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- admission -------------------------------------------------------------------------

    def admit(self, key: ApiKey, now: float | None = None, memory_only: bool = False) -> int | None:
        """Count one request against the key's rate window; :class:`~maas_ray.auth.keys.Denied`
        when over it or over today's token budget. Returns the tokens left today (``None``:
        no budget). ``memory_only``: raise :class:`NeedsDatabase` instead of waiting on it."""
        now = time.time() if now is None else now
        left = self.tokens_left(key, now, memory_only)
        if left is not None and left <= 0:
            spent = key.tokens_per_day - left  # type: ignore[operator]
            raise Denied(f"daily token budget of {key.tokens_per_day} tokens used up ({spent} today)",
                         seconds_to_midnight(now), "tokens_per_day_exceeded")
        start = int(now // key.rate.window_s * key.rate.window_s)
        if self._take(key.id, start):
            return left
        if self._spent(key.id, start):
            raise self._over_rate(key, start, now)
        if memory_only:
            raise NeedsDatabase(key.id)
        # One claim at a time: threads that found the lease empty together would each claim
        # one, and what this process strands at the window's end could pass one lease.
        with self._claim_lock:
            if self._take(key.id, start):  # another thread's claim came first
                return left
            granted = self._claim(key, start)
            with self._lock:
                lease = self._leases.get(key.id)
                if lease is None or lease.window_start != start:
                    lease = self._leases[key.id] = _Lease(start, 0)
                lease.left += granted
                lease.last = granted < lease_size(key.rate.requests)
            if self._take(key.id, start):
                return left
        raise self._over_rate(key, start, now)

    @staticmethod
    def _over_rate(key: ApiKey, start: int, now: float) -> Denied:
        return Denied(f"rate limit of {key.rate} exceeded", math.ceil(start + key.rate.window_s - now),
                      "rate_limit_exceeded")

    def _spent(self, key_id: str, start: int) -> bool:
        with self._lock:
            lease = self._leases.get(key_id)
            return lease is not None and lease.window_start == start and lease.last and lease.left <= 0

    def _take(self, key_id: str, start: int) -> bool:
        with self._lock:
            lease = self._leases.get(key_id)
            if lease is None or lease.window_start != start or lease.left <= 0:
                return False
            lease.left -= 1
            return True

    def _claim(self, key: ApiKey, start: int) -> int:
        """Claim a lease of this window's requests; how many were granted (0: none left)."""
        size = lease_size(key.rate.requests)
        with db.session(self.root) as s:
            upsert_add(s, RateWindowRow.__table__, {"key_id": key.id, "window_start": start}, {"count": size})
            claimed = s.scalar(select(RateWindowRow.count).where(
                RateWindowRow.key_id == key.id, RateWindowRow.window_start == start)) or size
            if claimed == size:  # the window's first claim: drop the key's old windows
                s.query(RateWindowRow).filter(RateWindowRow.key_id == key.id,
                                              RateWindowRow.window_start < start).delete()
        return max(0, min(size, key.rate.requests - (claimed - size)))

    def tokens_left(self, key: ApiKey, now: float, memory_only: bool = False) -> int | None:
        """The key's budget less the day's total in the database (re-read when the kept one is a
        period old) and this process's unwritten usage."""
        budget = key.tokens_per_day
        if budget is None:
            return None
        pair = (key.id, today(now))
        with self._lock:
            kept = self._written.get(pair)
            if kept is not None and 0 <= now - kept[0] < FLUSH_PERIOD_S:
                return budget - kept[1] - self._unwritten(*pair)
        if memory_only:
            raise NeedsDatabase(key.id)
        # No flush of ours commits during the read: each of our tokens is either in the total
        # read or still unwritten, and a later flush adds to the kept total. Counted once.
        with self._flush_lock:
            with db.session(self.root) as s:
                row = s.get(UsageRow, pair)
                written = row.prompt_tokens + row.completion_tokens if row is not None else 0
            with self._lock:
                self._written = {p: v for p, v in self._written.items() if p[1] == pair[1]}  # old days go
                self._written[pair] = (now, written)
                return budget - written - self._unwritten(*pair)

    def _unwritten(self, key_id: str, day: str) -> int:
        return sum(u[(key_id, day)].tokens for u in (self._pending, self._writing) if (key_id, day) in u)

    # -- metering --------------------------------------------------------------------------

    def record(self, key: ApiKey, prompt_tokens: int = 0, completion_tokens: int = 0,
               now: float | None = None) -> None:
        """Meter one request (and the tokens it used) for today; written by the next flush."""
        now = time.time() if now is None else now
        with self._lock:
            usage = self._pending.setdefault((key.id, today(now)), _Usage(key.tenant))
            usage.requests += 1
            usage.prompt_tokens += int(prompt_tokens)
            usage.completion_tokens += int(completion_tokens)
        self._start_flusher()

    def flush(self) -> None:
        """Write the buffered usage in one transaction."""
        with self._flush_lock:
            with self._lock:
                self._writing, self._pending = self._pending, {}
                writing = self._writing
            if not writing:
                return
            try:
                with db.session(self.root) as s:
                    for (key_id, day), u in writing.items():
                        upsert_add(s, UsageRow.__table__, {"key_id": key_id, "day": day},
                                   {"requests": u.requests, "prompt_tokens": u.prompt_tokens,
                                    "completion_tokens": u.completion_tokens}, extra={"tenant": u.tenant})
            except BaseException:
                with self._lock:  # not written: back into the buffer for the next flush
                    for pair, u in writing.items():
                        merged = self._pending.setdefault(pair, _Usage(u.tenant))
                        merged.requests += u.requests
                        merged.prompt_tokens += u.prompt_tokens
                        merged.completion_tokens += u.completion_tokens
                    self._writing = {}
                raise
            with self._lock:
                self._writing = {}
                for pair, u in writing.items():  # now in the database: keep the kept totals whole
                    if pair in self._written:
                        read_at, total = self._written[pair]
                        self._written[pair] = (read_at, total + u.prompt_tokens + u.completion_tokens)

    def _start_flusher(self) -> None:
        if self._thread is not None or self.flush_period_s is None:
            return
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._flush_every, name="maas-usage-flush", daemon=True)
            self._thread.start()
        atexit.register(self.close)

    def _flush_every(self) -> None:
        while not self._stop.wait(self.flush_period_s):
            try:
                self.flush()
            except Exception:  # the database may be back next period; the usage stays buffered
                logger.exception("could not write API key usage; retrying in %s s", self.flush_period_s)

    def close(self) -> None:
        """Stop the periodic flushes and write what is buffered (call on shutdown)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        self.flush()

