"""The Host-header allow-list, as a pure ASGI middleware.

A page on any web site can make the browser resolve its own name to 127.0.0.1
(DNS rebinding) and then call a service on loopback as if it were same-origin;
CORS does not stop it, but the Host header still carries the page's name. So a
service that listens on loopback answers only to loopback names by default
(:meth:`~maas_ray.serve.settings.AppArgs.host_allow_list`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from maas_ray.serve.limits import send_error

Scope = dict[str, Any]


def host_name(header: str) -> str:
    """The name in a Host header, lower case, without port or trailing dot
    (``[::1]:8000`` → ``[::1]``, ``LocalHost.:80`` → ``localhost``)."""
    value = header.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[:end + 1] if end > 0 else value
    name = value.rsplit(":", 1)[0] if value.count(":") == 1 else value
    return name.rstrip(".")


def host_allowed(header: str, allowed: list[str]) -> bool:
    """``allowed`` holds names, ``*.domain`` (its subdomains) or ``*`` (anything)."""
    name = host_name(header)
    for pattern in (p.strip().lower() for p in allowed):
        if pattern == "*" or name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])):
            return True
    return False


class HostAllowList:
    """400 for a request whose Host header names none of ``allowed()``. A callable: the
    list comes from settings that exist only once the replica started."""

    def __init__(self, app: Any, allowed: Callable[[], list[str]]) -> None:
        self.app, self._allowed = app, allowed

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        allowed = self._allowed() if scope["type"] == "http" else ["*"]  # no websocket routes
        if "*" in allowed:
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        if host_allowed(header, allowed):
            await self.app(scope, receive, send)
            return
        shown = repr(header[:100]) if header else "(none)"
        await send_error(scope, send, 400, f"Host header {shown} is not allowed: this service answers "
                         f"to {', '.join(allowed)} (any port); to serve another name, add it to the "
                         "app's allowed_hosts", "host_not_allowed")
