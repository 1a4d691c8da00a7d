"""API keys as salted hashes, per-key fixed-window rate limits, daily token budgets, usage.

A key reads ``maas-{id}-{secret}``: the id (not secret) finds the row through
the primary key, then the secret is checked against a per-key salted PBKDF2
hash. A verified key is remembered in the process under a SHA-256 of the whole
key (never the key itself) for :data:`VERIFIED_TTL_S` (5 s): within that, a request
reads nothing from the database; after it, the row is read again (no second PBKDF2
while its hash is unchanged). So a key revoked elsewhere stops working within 5 s on
every replica (at once on the store that revoked it), and changed limits apply within
5 s. An unknown or revoked id costs the same PBKDF2 as a wrong secret (against a dummy
salt), so timing does not tell which key ids exist.

Rate windows, budgets and usage are counted by the store's :class:`~.ledger.Ledger`: in
memory, settled with the database in batches, with the tolerances it states.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, Boolean, Integer, String, select, text
from sqlalchemy.orm import Mapped, mapped_column

from maas_ray import db
from maas_ray.auth.ledger import (FLUSH_PERIOD_S, Denied, Ledger, NeedsDatabase, UsageRow,
                                  seconds_to_midnight)

__all__ = ["ApiKey", "ApiKeyRow", "AuthError", "Denied", "KeyStore", "NeedsDatabase", "RateLimit",
           "parse_rate", "seconds_to_midnight", "split_key"]

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
VERIFIED_TTL_S = 5.0  # how long a verified key is trusted without reading its row
_MAX_VERIFIED = 10_000  # verified keys remembered per process (only real keys get in)


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


def split_key(key: str) -> tuple[str, str]:
    m = _KEY_RE.fullmatch(key or "")
    if not m:
        raise AuthError("malformed API key")
    return m.group(1), m.group(2)


def _hash(secret: str, salt: bytes) -> str:
    return hashlib.pbkdf2_hmac("sha256", secret.encode(), salt, _ITERATIONS).hex()


@dataclass(frozen=True)
class _Verified:
    key: ApiKey
    hash: str  # the row's PBKDF2 hash when verified: a new hash means verify again
    fresh_until: float  # time.monotonic()


class KeyStore:
    """Keys in one storage root's database, and this process's counters for them."""

    def __init__(self, storage_root: str | None = None, flush_period_s: float | None = FLUSH_PERIOD_S,
                 verified_ttl_s: float = VERIFIED_TTL_S) -> None:
        self.root, self.verified_ttl_s = storage_root, verified_ttl_s
        self.ledger = Ledger(storage_root, flush_period_s)
        self._verified: dict[bytes, _Verified] = {}  # sha256(whole key) → what verifying it found

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
        self._verified = {f: v for f, v in self._verified.items() if v.key.id != key_id}
        return ApiKey.of(row)

    def authenticate(self, key: str, before_slow_check: Callable[[str], None] | None = None,
                     memory_only: bool = False) -> ApiKey:
        """The live key record for ``key``, else :class:`AuthError` (same message for all causes).

        A key verified in the last :attr:`verified_ttl_s` costs nothing; verified before that,
        one row read. Anything else costs one PBKDF2, whether the id exists or not;
        ``before_slow_check(key_id)`` runs first and may raise (:class:`Denied`) to refuse
        without that work. ``memory_only``: raise :class:`NeedsDatabase` rather than read.
        """
        key_id, secret = split_key(key)
        fingerprint = hashlib.sha256(key.encode()).digest()
        known = self._verified.get(fingerprint)
        if known is not None and time.monotonic() < known.fresh_until:
            return known.key
        if memory_only:
            raise NeedsDatabase(key_id)
        with db.session(self.root) as s:
            row = s.get(ApiKeyRow, key_id)
        live = row is not None and row.revoked_at is None
        if live and known is not None and hmac.compare_digest(known.hash, row.hash):  # type: ignore[union-attr]
            return self._remember(fingerprint, row)  # type: ignore[arg-type]
        self._verified.pop(fingerprint, None)
        if before_slow_check is not None:
            before_slow_check(key_id)
        if live:
            salt, expected = bytes.fromhex(row.salt), row.hash  # type: ignore[union-attr]
        else:
            salt, expected = _DUMMY_SALT, ""
        if not (hmac.compare_digest(_hash(secret, salt), expected) and live):
            raise AuthError("invalid or revoked API key")
        return self._remember(fingerprint, row)  # type: ignore[arg-type]

    def _remember(self, fingerprint: bytes, row: ApiKeyRow) -> ApiKey:
        if len(self._verified) >= _MAX_VERIFIED:
            self._verified.pop(next(iter(self._verified)))  # the oldest entry
        self._verified[fingerprint] = entry = _Verified(ApiKey.of(row), row.hash,
                                                        time.monotonic() + self.verified_ttl_s)
        return entry.key

    def admit(self, key: ApiKey, now: float | None = None, memory_only: bool = False) -> int | None:
        """Count one request against the key's rate window; :class:`Denied` when over it or
        over today's token budget. Returns the tokens left today (``None``: no budget)."""
        return self.ledger.admit(key, now, memory_only)

    def record(self, key: ApiKey, prompt_tokens: int = 0, completion_tokens: int = 0,
               now: float | None = None) -> None:
        """Meter one request (and the tokens it used) for today (written within a flush period)."""
        self.ledger.record(key, prompt_tokens, completion_tokens, now)

    def close(self) -> None:
        """Write this process's buffered usage (call when the process stops serving)."""
        self.ledger.close()

    def usage(self, tenant: str | None = None, day: str | None = None) -> list[dict[str, Any]]:
        """Metered usage in the database (this store's buffer written first; other processes'
        arrives within their flush period)."""
        self.ledger.flush()
        with db.session(self.root) as s:
            q = select(UsageRow).order_by(UsageRow.day, UsageRow.tenant, UsageRow.key_id)
            if tenant is not None:
                q = q.where(UsageRow.tenant == tenant)
            if day is not None:
                q = q.where(UsageRow.day == day)
            return [{"day": r.day, "tenant": r.tenant, "key_id": r.key_id, "requests": r.requests,
                     "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens}
                    for r in s.scalars(q)]
