"""Request body size limit as a pure ASGI middleware.

Checks ``Content-Length`` up front and counts streamed (chunked) bodies too, so
an oversized upload is refused with 413 before it is buffered in memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

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
        if length is not None and length.isdigit() and int(length) > limit:
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
        message = f"request body exceeds the limit of {limit} bytes"
        if scope.get("path", "").removeprefix(scope.get("root_path", "") or "").startswith("/v2"):
            body: dict[str, Any] = {"error": message}
        else:
            body = {"error": {"message": message, "type": "request_too_large",
                              "param": None, "code": "body_too_large"}}
        payload = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


class _TooLarge(Exception):
    pass
