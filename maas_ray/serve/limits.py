"""Request body limits as pure ASGI middleware.

:class:`BodySizeLimit` checks ``Content-Length`` up front and counts streamed
(chunked) bodies too, so an oversized upload is refused with 413 before it is
buffered in memory. :class:`JsonDepthLimit` refuses JSON nested deeper than a
limit with 400 before any parser recurses into it; array lengths are bounded by
the request schemas (``max_length``), where clients can read them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from maas_ray.json_depth import json_too_deep

Scope = dict[str, Any]


class BodySizeLimit:
    def __init__(self, app: Any, max_body_bytes: Callable[[Scope], int]) -> None:
        # A callable: the limit comes from settings that exist only once the
        # replica has started, after the app object was built; it may depend on the
        # route (uploads get their own, larger limit).
        self.app, self._limit = app, max_body_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isascii() and length.isdigit() and int(length) > limit:
            await self._reject(scope, send, limit)
            return
        seen = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._reject(scope, send, limit)

    async def _reject(self, scope: Scope, send: Any, limit: int) -> None:
        await send_error(scope, send, 413, f"request body exceeds the limit of {limit} bytes",
                         "body_too_large")


class _TooLarge(Exception):
    pass


def route_path(scope: Scope) -> str:
    """The path inside the app: under a route prefix (a second app at ``/auth``) Serve's
    ``path`` carries the prefix as ``root_path`` too."""
    path, root = scope.get("path", ""), scope.get("root_path", "") or ""
    return path[len(root):] if root and path.startswith(root) else path


def is_upload(scope: Scope) -> bool:
    """A file upload: multipart/form-data to ``/v1/files``. Only these get the upload limit; a
    JSON body there is an API call like any other (and would be buffered whole to check it)."""
    ctype = dict(scope.get("headers") or []).get(b"content-type", b"")
    return (scope.get("method") == "POST" and route_path(scope) == "/v1/files"
            and ctype.split(b";")[0].strip().lower() == b"multipart/form-data")


async def send_error(scope: Scope, send: Any, status: int, message: str, code: str,
                     headers: dict[str, str] | None = None) -> None:
    """An error answer from middleware: OpenAI's body on /v1 (its ``type`` from the status,
    as :mod:`maas_ray.serve.errors` maps it), the Open Inference Protocol's on /v2."""
    from maas_ray.serve.errors import error_body

    payload = json.dumps(error_body(route_path(scope), status, message, None, code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


_THREAD_BYTES = 64 * 1024  # bodies above this are checked off the event loop


class JsonDepthLimit:
    """400 for JSON bodies nested deeper than ``max_depth()`` (inside the size limit, so
    the body it buffers is bounded)."""

    def __init__(self, app: Any, max_depth: Callable[[], int]) -> None:
        self.app, self._max_depth = app, max_depth

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        ctype = dict(scope.get("headers") or []).get(b"content-type", b"").split(b";")[0].strip().lower()
        if ctype and not ctype.endswith(b"json"):  # uploads (multipart) are not parsed as JSON
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # client gone
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        limit = self._max_depth()
        # Linear, but megabytes still take a while: other requests (/healthz too) go on meanwhile.
        too_deep = (await asyncio.to_thread(json_too_deep, body, limit) if len(body) > _THREAD_BYTES
                    else json_too_deep(body, limit))
        if too_deep:
            await send_error(scope, send, 400, f"JSON body nests deeper than {limit} levels",
                             "json_too_deep")
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
