"""The web console: a static single-page app served at ``/`` by the same Serve app.

Plain HTML/CSS/JS shipped inside the package (``maas_ray/serve/console/static``):
no Node build step at install and no CDN, so it works offline. It talks to the
same public API as any client (``/v1/...``), sending the API key the user typed
(kept in the browser's ``sessionStorage``) as ``Authorization: Bearer``.
"""

from __future__ import annotations

import mimetypes
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from maas_ray.serve.errors import APIError

router = APIRouter(tags=["console"], include_in_schema=False)

_STATIC = resources.files("maas_ray.serve.console") / "static"
_HEADERS = {
    # Small files, changed only by an upgrade: revalidate each load.
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    # Everything the console loads comes from this origin.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                               "style-src 'self'; script-src 'self'; connect-src 'self'; "
                               "frame-ancestors 'none'",
}


@router.get("/", response_class=HTMLResponse)
async def index() -> Response:
    return _file("index.html")


@router.get("/console/{name}")
async def asset(name: str) -> Response:
    # Only plain names of files that ship in the folder: no paths, no traversal.
    if "/" in name or "\\" in name or name.startswith(".") or not (_STATIC / name).is_file():
        raise APIError(404, f"no console asset {name!r}", code="not_found")
    return _file(name)


def _file(name: str) -> Response:
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if media_type.startswith("text/") or media_type.endswith("javascript"):
        media_type += "; charset=utf-8"
    return Response((_STATIC / name).read_bytes(), media_type=media_type, headers=_HEADERS)
