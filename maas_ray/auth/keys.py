"""API keys as salted hashes, per-key fixed-window rate limits, daily token budgets, usage.

A key reads ``maas-{id}-{secret}``: the id (not secret) finds the row through
the primary key, then the secret is checked against a per-key salted PBKDF2
hash. A verified key is remembered in the process by a SHA-256 of it (never
the key itself), so the slow hash runs once per key per replica; revocation
still takes effect on the next request because the row is read every time.
An unknown or revoked id costs the same PBKDF2 as a wrong secret (against a
dummy salt), so timing does not tell which key ids exist.

Counters are rows updated atomically in the database (an upsert that adds one),
so a limit holds across all ingress replicas and processes.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, Boolean, Integer, String, select, text
from sqlalchemy.orm import Mapped, mapped_column

from maas_ray import db

PREFIX = "maas"
_ITERATIONS = 120_000
_KEY_RE = re.compile(r"maas-([0-9a-f]{16})-([A-Za-z0-9_\-]{20,128})")  # fullmatch: `$` passes "...\n"
_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60,
          "h": 3600, "hour": 3600, "d": 86400, "day": 86400}
DEFAULT_RATE = "60/min"
# In-flight requests per key per ingress replica: enough for a client's usual connection
# pool (httpx and the OpenAI SDK keep up to 10-20), far below what would crowd out others.
DEFAULT_MAX_CONCURRENT = 16
_DUMMY_SALT = bytes(16)  # unknown ids are hashed against this: same work as a real key


class ApiKeyRow(db.Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # the non-secret key id
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    salt: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(128))
    display: Mapped[str] = mapped_column(String(64))  # "maas-{id}-abcd…" for lists
    rate_limit: Mapped[int] = mapped_column(Integer)  # requests per window
    rate_window_s: Mapped[int] = mapped_column(Integer)
    tokens_per_day: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    # Added after the first release: a server default, so db.engine can add it to old tables.
    max_concurrent: Mapped[int] = mapped_column(Integer, default=DEFAULT_MAX_CONCURRENT,
                                                server_default=text(str(DEFAULT_MAX_CONCURRENT)))
    created_at: Mapped[int] = mapped_column(BigInteger, default=db.now)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class RateWindowRow(db.Base):
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


@dataclass(frozen=True)
class RateLimit:
    requests: int
    window_s: int

    def __str__(self) -> str:
        unit = {1: "s", 60: "min", 3600: "hour", 86400: "day"}.get(self.window_s, f"{self.window_s}s")
        return f"{self.requests}/{unit}"


def parse_rate(text: str) -> RateLimit:
    """``60/min``, ``10/s``, ``1000/hour``, ``5000/day``."""
    # [0-9], not \d: \d takes any Unicode digit ("٣"), and nine of them keep N in a 32-bit column.
    m = re.fullmatch(r"\s*([0-9]{1,9})\s*/\s*([a-z]+)\s*", text or "")
    if not m or m.group(2) not in _UNITS or int(m.group(1)) < 1:
        raise ValueError(f"rate {text!r}: expected N/unit with N >= 1 and unit one of s, min, hour, day "
                         "(e.g. 60/min)")
    return RateLimit(int(m.group(1)), _UNITS[m.group(2)])


@dataclass(frozen=True)
class ApiKey:
    id: str
    tenant: str
    display: str
    rate: RateLimit
    tokens_per_day: int | None
    admin: bool
    created_at: int
    revoked_at: int | None
    max_concurrent: int = DEFAULT_MAX_CONCURRENT

    def to_dict(self) -> dict[str, Any]:
        """What lists show (the admin API, the CLI): everything but the key itself."""
        return {"id": self.id, "tenant": self.tenant, "display": self.display, "rate": str(self.rate),
                "tokens_per_day": self.tokens_per_day, "max_concurrent": self.max_concurrent,
                "admin": self.admin, "created_at": self.created_at, "revoked_at": self.revoked_at}

    @classmethod
    def of(cls, row: ApiKeyRow) -> ApiKey:
        return cls(row.id, row.tenant, row.display, RateLimit(row.rate_limit, row.rate_window_s),
                   row.tokens_per_day, bool(row.admin), row.created_at, row.revoked_at,
                   row.max_concurrent or DEFAULT_MAX_CONCURRENT)


class AuthError(Exception):
    """Missing, malformed, unknown or revoked key (401)."""


class Denied(Exception):
    """Over a rate limit, token budget, concurrency limit or failed-check throttle (429);
    ``retry_after`` in whole seconds."""

    def __init__(self, message: str, retry_after: int, code: str) -> None:
        super().__init__(message)
        self.retry_after, self.code = max(1, retry_after), code


def split_key(key: str) -> tuple[str, str]:
    m = _KEY_RE.fullmatch(key or "")
    if not m:
        raise AuthError("malformed API key")
    return m.group(1), m.group(2)


def _hash(secret: str, salt: bytes) -> str:
    return hashlib.pbkdf2_hmac("sha256", secret.encode(), salt, _ITERATIONS).hex()


def _today(now: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(now))


def seconds_to_midnight(now: float | None = None) -> int:
    """Until the daily token budgets start again (UTC midnight), in whole seconds."""
    now = time.time() if now is None else now
    return math.ceil((math.floor(now / 86400) + 1) * 86400 - now)


def _upsert_add(s: Any, table: Any, keys: dict[str, Any], adds: dict[str, int],
                extra: dict[str, Any] | None = None) -> None:
    """INSERT the row or add to its counters, atomically, on SQLite and Postgres alike."""
    dialect = s.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    stmt = insert(table).values(**keys, **adds, **(extra or {}))
    stmt = stmt.on_conflict_do_update(
        index_elements=list(keys), set_={k: getattr(table.c, k) + stmt.excluded[k] for k in adds})
    s.execute(stmt)


class KeyStore:
    """Keys and their counters in one storage root's database."""

    def __init__(self, storage_root: str | None = None) -> None:
        self.root = storage_root
        self._verified: dict[str, bytes] = {}  # key id → sha256(key) once the slow hash matched

    def create(self, tenant: str, rate: str | RateLimit = DEFAULT_RATE, tokens_per_day: int | None = None,
               admin: bool = False, max_concurrent: int = DEFAULT_MAX_CONCURRENT) -> tuple[ApiKey, str]:
        """A new key for ``tenant``: its record and the key itself (shown once, never stored)."""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}", tenant or ""):
            raise ValueError(f"tenant {tenant!r}: use letters, digits, '.', '_' or '-' (1-128 characters)")
        limit = rate if isinstance(rate, RateLimit) else parse_rate(rate)
        if tokens_per_day is not None and tokens_per_day < 1:
            raise ValueError("tokens per day must be >= 1")
        if not 1 <= max_concurrent <= 100_000:
            raise ValueError(f"max concurrent requests must be between 1 and 100000, got {max_concurrent}")
        key_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        row = ApiKeyRow(id=key_id, tenant=tenant, salt=salt.hex(), hash=_hash(secret, salt),
                        display=f"{PREFIX}-{key_id}-{secret[:4]}…", rate_limit=limit.requests,
                        rate_window_s=limit.window_s, tokens_per_day=tokens_per_day, admin=admin,
                        max_concurrent=max_concurrent, created_at=db.now())
        with db.session(self.root) as s:
            s.add(row)
        return ApiKey.of(row), f"{PREFIX}-{key_id}-{secret}"

    def list(self, tenant: str | None = None, include_revoked: bool = True) -> list[ApiKey]:
        with db.session(self.root) as s:
            q = select(ApiKeyRow).order_by(ApiKeyRow.created_at, ApiKeyRow.id)
            if tenant is not None:
                q = q.where(ApiKeyRow.tenant == tenant)
            rows = [ApiKey.of(r) for r in s.scalars(q)]
        return [k for k in rows if include_revoked or k.revoked_at is None]

    def revoke(self, key_id: str) -> ApiKey:
        with db.session(self.root) as s:
            row = s.get(ApiKeyRow, key_id)
            if row is None:
                raise KeyError(f"no API key with id {key_id!r}")
            if row.revoked_at is None:
                row.revoked_at = db.now()
            return ApiKey.of(row)

    def authenticate(self, key: str, before_slow_check: Callable[[str], None] | None = None) -> ApiKey:
        """The live key record for ``key``, else :class:`AuthError` (same message for all causes).

        A key verified before in this process costs one row read. Anything else costs one
        PBKDF2, whether the id exists or not; ``before_slow_check(key_id)`` runs first and
        may raise (:class:`Denied`) to refuse without that work.
        """
        key_id, secret = split_key(key)
        with db.session(self.root) as s:
            row = s.get(ApiKeyRow, key_id)
        live = row is not None and row.revoked_at is None
        fingerprint = hashlib.sha256(key.encode()).digest()
        known = self._verified.get(key_id)
        if live and known is not None and hmac.compare_digest(known, fingerprint):
            return ApiKey.of(row)  # type: ignore[arg-type]
        if before_slow_check is not None:
            before_slow_check(key_id)
        if live:
            salt, expected = bytes.fromhex(row.salt), row.hash  # type: ignore[union-attr]
        else:
            salt, expected = _DUMMY_SALT, ""
        if not (hmac.compare_digest(_hash(secret, salt), expected) and live):
            raise AuthError("invalid or revoked API key")
        self._verified[key_id] = fingerprint
        return ApiKey.of(row)  # type: ignore[arg-type]

    def admit(self, key: ApiKey, now: float | None = None) -> int | None:
        """Count one request against the key's rate window; :class:`Denied` when over it or
        over today's token budget. Returns the tokens left today (``None``: no budget)."""
        now = time.time() if now is None else now
        window = key.rate.window_s
        start = int(now // window * window)
        left: int | None = None
        with db.session(self.root) as s:
            if key.tokens_per_day is not None:
                used = s.get(UsageRow, (key.id, _today(now)))
                spent = (used.prompt_tokens + used.completion_tokens) if used else 0
                left = key.tokens_per_day - spent
                if left <= 0:
                    raise Denied(f"daily token budget of {key.tokens_per_day} tokens used up "
                                 f"({spent} today)", seconds_to_midnight(now), "tokens_per_day_exceeded")
            _upsert_add(s, RateWindowRow.__table__, {"key_id": key.id, "window_start": start}, {"count": 1})
            count = s.scalar(select(RateWindowRow.count).where(
                RateWindowRow.key_id == key.id, RateWindowRow.window_start == start))
            # Old windows are no longer needed; drop them now and then.
            if count == 1:
                s.query(RateWindowRow).filter(RateWindowRow.key_id == key.id,
                                              RateWindowRow.window_start < start).delete()
        if count is not None and count > key.rate.requests:
            raise Denied(f"rate limit of {key.rate} exceeded", math.ceil(start + window - now),
                         "rate_limit_exceeded")
        return left

    def record(self, key: ApiKey, prompt_tokens: int = 0, completion_tokens: int = 0,
               now: float | None = None) -> None:
        """Meter one request (and the tokens it used) for today."""
        now = time.time() if now is None else now
        with db.session(self.root) as s:
            _upsert_add(s, UsageRow.__table__, {"key_id": key.id, "day": _today(now)},
                        {"requests": 1, "prompt_tokens": int(prompt_tokens),
                         "completion_tokens": int(completion_tokens)}, extra={"tenant": key.tenant})

    def usage(self, tenant: str | None = None, day: str | None = None) -> list[dict[str, Any]]:
        with db.session(self.root) as s:
            q = select(UsageRow).order_by(UsageRow.day, UsageRow.tenant, UsageRow.key_id)
            if tenant is not None:
                q = q.where(UsageRow.tenant == tenant)
            if day is not None:
                q = q.where(UsageRow.day == day)
            return [{"day": r.day, "tenant": r.tenant, "key_id": r.key_id, "requests": r.requests,
                     "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens}
                    for r in s.scalars(q)]
