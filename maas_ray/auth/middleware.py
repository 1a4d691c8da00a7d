"""Bearer-key authentication, rate limits, token budgets and metering as a pure ASGI middleware.

Only ``/v1`` and ``/v2`` are guarded; ``/healthz``, ``/docs``, ``/openapi.json``
and the console stay open. A good key sets ``request.state.tenant`` (what
:func:`~maas_ray.serve.context.tenant_of` reads) and the tenant context variable
that model resolution checks. Keys are never logged: errors name only the cause.

Every guarded request is metered (one request, plus the tokens a route reports or
its answer's ``usage`` shows). The key's tokens left today are published for the
request (:func:`tokens_left`): routes that know a request's size before running it
refuse one the budget cannot cover, or cut generation at the budget. Failed key
checks are throttled and requests in flight capped per key (:mod:`.guards`).

A request usually waits on nothing: a recently verified key, a rate lease with
requests left and a fresh budget total are all in memory, and usage is buffered;
only a missing one sends the check to the thread pool and the database
(:mod:`.ledger` says what that costs in exactness).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool

from maas_ray.auth.guards import ConcurrencyLimit, FailureThrottle
from maas_ray.auth.keys import ApiKey, AuthError, Denied, KeyStore, NeedsDatabase, split_key
from maas_ray.serve.limits import send_error

logger = logging.getLogger(__name__)
Scope = dict[str, Any]
T = TypeVar("T")
GUARDED = ("/v1", "/v2")
# Routes whose JSON answers carry OpenAI ``usage`` to meter.
METERED = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
# Token counts a route reports itself (a stream without ``include_usage`` carries none in
# its body; a stream the client dropped counts what was generated until then).
_REPORTED: ContextVar[dict[str, int] | None] = ContextVar("maas_reported_usage", default=None)
# The key's daily tokens left when the request was admitted (None: no budget, or auth off).
_TOKENS_LEFT: ContextVar[int | None] = ContextVar("maas_tokens_left", default=None)


def tokens_left() -> int | None:
    """Prompt + completion tokens the request's key may still use today; ``None``: unlimited.

    Concurrent requests of one key each see what was left when they were admitted, so
    together they can pass the budget by at most ``max_concurrent - 1`` times that.
    """
    return _TOKENS_LEFT.get()


def report_usage(prompt_tokens: int, completion_tokens: int) -> None:
    """Meter these counts for the request being served (a no-op when nothing meters it)."""
    holder = _REPORTED.get()
    if holder is not None:
        holder["prompt"], holder["completion"] = int(prompt_tokens), int(completion_tokens)


def route_path(scope: Scope) -> str:
    """The path inside the app (an app under a route prefix sees it in ``root_path``)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _guarded(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in GUARDED)


def _usage_of(body: bytes) -> tuple[int, int]:
    """(prompt, completion) tokens from a JSON answer or the SSE events of a stream."""
    prompt = completion = 0
    text = body.decode("utf-8", "replace")
    docs = [text] if not text.lstrip().startswith("data:") else [
        line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
    for doc in docs:
        if '"usage"' not in doc:
            continue
        try:
            usage = json.loads(doc).get("usage") or {}
        except (ValueError, AttributeError):
            continue
        prompt = max(prompt, int(usage.get("prompt_tokens") or 0))
        completion = max(completion, int(usage.get("completion_tokens") or 0))
    return prompt, completion


async def _in_memory_or_thread(call: Callable[..., T], *args: Any) -> T:
    """``call(*args)`` on the event loop when it needs no database (the usual case: a recently
    verified key, a rate lease with requests left), else in the thread pool."""
    try:
        return call(*args, memory_only=True)
    except NeedsDatabase:
        return await run_in_threadpool(call, *args)


class ApiKeyAuth:
    """Guards /v1 and /v2 when ``enabled()`` is true (settings exist only once the replica started)."""

    def __init__(self, app: Any, enabled: Callable[[], bool], store: Callable[[], KeyStore],
                 set_tenant: Callable[[str], Any]) -> None:
        self.app, self._enabled, self._store, self._set_tenant = app, enabled, store, set_tenant
        # Per replica: this object lives in the ingress replica's process.
        self._throttle, self._inflight = FailureThrottle(), ConcurrencyLimit()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self._enabled():
            await self.app(scope, receive, send)
            return
        if not _guarded(route_path(scope)):
            self._set_tenant("")  # open pages act for no tenant: only shared models show
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            await send_error(scope, send, 401, "missing API key: send 'Authorization: Bearer <key>' "
                             "(create one with `maas keys create --tenant NAME`)", "missing_api_key",
                             {"WWW-Authenticate": "Bearer"})
            return
        store = self._store()
        key = key.strip()
        address = (scope.get("client") or ("unknown",))[0]
        try:
            api_key: ApiKey = await _in_memory_or_thread(
                store.authenticate, key, lambda key_id: self._throttle.check(key_id, address))
        except AuthError as err:
            try:
                key_id: str | None = split_key(key)[0]
            except AuthError:
                key_id = None  # malformed: no hash was computed, the address still counts
            self._throttle.fail(key_id, address)
            await send_error(scope, send, 401, str(err), "invalid_api_key", {"WWW-Authenticate": "Bearer"})
            return
        except Denied as err:
            await send_error(scope, send, 429, str(err), err.code, {"Retry-After": str(err.retry_after)})
            return
        try:
            self._inflight.acquire(api_key)
        except Denied as err:
            await send_error(scope, send, 429, str(err), err.code, {"Retry-After": str(err.retry_after)})
            return
        try:
            try:
                left = await _in_memory_or_thread(store.admit, api_key)
            except Denied as err:
                await send_error(scope, send, 429, str(err), err.code, {"Retry-After": str(err.retry_after)})
                return
            await self._serve(scope, receive, send, store, api_key, left)
        finally:
            self._inflight.release(api_key)

    async def _serve(self, scope: Scope, receive: Any, send: Any, store: KeyStore, api_key: ApiKey,
                     left: int | None) -> None:
        """The request itself, for a key that passed every check; metered when it ends."""
        scope.setdefault("state", {})["tenant"] = api_key.tenant
        scope["state"]["api_key"] = api_key
        self._set_tenant(api_key.tenant)
        metered = route_path(scope) in METERED and scope.get("method") == "POST"
        captured: list[bytes] = []
        ok = True
        reported: dict[str, int] = {}
        _REPORTED.set(reported)
        _TOKENS_LEFT.set(left)

        async def capture(message: dict[str, Any]) -> None:
            nonlocal ok
            if message["type"] == "http.response.start":
                ok = message["status"] < 400
            elif message["type"] == "http.response.body" and metered and ok:
                captured.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            if reported:
                prompt, completion = reported["prompt"], reported["completion"]
            else:
                prompt, completion = _usage_of(b"".join(captured)) if captured else (0, 0)
            store.record(api_key, prompt, completion)  # in memory; written by the ledger's flushes
