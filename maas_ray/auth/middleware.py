"""Bearer-key authentication, rate limits, token budgets and metering as a pure ASGI middleware.

Only ``/v1`` and ``/v2`` are guarded; ``/healthz``, ``/docs``, ``/openapi.json``
and the console stay open. A good key sets ``request.state.tenant`` (what
:func:`~maas_ray.serve.context.tenant_of` reads) and the tenant context variable
that model resolution checks. Keys are never logged: errors name only the cause.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from starlette.concurrency import run_in_threadpool

from maas_ray.auth.keys import ApiKey, AuthError, Denied, KeyStore
from maas_ray.serve.limits import send_error

logger = logging.getLogger(__name__)
Scope = dict[str, Any]
GUARDED = ("/v1", "/v2")
# Routes whose JSON answers carry OpenAI ``usage`` to meter.
METERED = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
# Token counts a route reports itself (a stream without ``include_usage`` carries none in
# its body; a stream the client dropped counts what was generated until then).
_REPORTED: ContextVar[dict[str, int] | None] = ContextVar("maas_reported_usage", default=None)


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


class ApiKeyAuth:
    """Guards /v1 and /v2 when ``enabled()`` is true (settings exist only once the replica started)."""

    def __init__(self, app: Any, enabled: Callable[[], bool], store: Callable[[], KeyStore],
                 set_tenant: Callable[[str], Any]) -> None:
        self.app, self._enabled, self._store, self._set_tenant = app, enabled, store, set_tenant

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
        try:
            api_key: ApiKey = await run_in_threadpool(store.authenticate, key.strip())
            await run_in_threadpool(store.admit, api_key)
        except AuthError as err:
            await send_error(scope, send, 401, str(err), "invalid_api_key", {"WWW-Authenticate": "Bearer"})
            return
        except Denied as err:
            await send_error(scope, send, 429, str(err), err.code, {"Retry-After": str(err.retry_after)})
            return
        scope.setdefault("state", {})["tenant"] = api_key.tenant
        scope["state"]["api_key"] = api_key
        self._set_tenant(api_key.tenant)
        metered = route_path(scope) in METERED and scope.get("method") == "POST"
        captured: list[bytes] = []
        ok = True
        reported: dict[str, int] = {}
        _REPORTED.set(reported)

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
            try:
                await run_in_threadpool(store.record, api_key, prompt, completion)
            except Exception:  # metering must not turn a served answer into an error
                logger.exception("could not record usage for key %s", api_key.id)
