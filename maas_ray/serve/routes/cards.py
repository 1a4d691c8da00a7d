"""Model cards over HTTP: ``/v1/models/{id}/card`` (JSON + Markdown page) and its plot.

``{id}`` is ``name``, ``name:version`` or ``ft:base:suffix:job[:version]``; the
colons need no escaping in a path segment.

A stored card says where things were on the server: an imported model's
``source``, a trained model's ``data.source`` (again under ``spec``) and
``run.storage``. Shared models' cards reach every tenant, so the card served here
(to admins too: one answer, no second code path) has every value that is a
server path or storage URI taken out, wherever it sits. The operator reads the
whole card with ``maas models show NAME --json``, which reads storage directly.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter
from fastapi.responses import Response

from maas_ray import storage
from maas_ray.registry import ModelVersion
from maas_ray.registry.card_page import render_card_markdown
from maas_ray.registry.plots import render_loss_plot
from maas_ray.serve.context import get_context
from maas_ray.serve.errors import APIError, documented

router = APIRouter(prefix="/v1/models", tags=["models"], responses=documented(404))


@router.get("/{model_id}/card")
async def model_card(model_id: str) -> dict[str, Any]:
    """The version's card as stored, its page as Markdown, and where its plot is."""
    mv = get_context().resolve(model_id)
    card = public_card(mv.card)
    has_plot = bool(card.get("loss_plot") or card.get("loss_curve"))
    return {
        "object": "model.card",
        "id": mv.id,
        "name": mv.name,
        "version": mv.version,
        "task": mv.task,
        "card": card,
        "plot_url": f"/v1/models/{quote(mv.id, safe=':')}/card/plot.png" if has_plot else None,
        "markdown": render_card_markdown(card, mv.id),
    }


# An absolute POSIX or Windows path, a home-relative one, or a URI (file://, s3://, gs://...).
_LOCATION = re.compile(r"^(?:/|~|[A-Za-z]:[\\/]|\\\\|[A-Za-z][A-Za-z0-9+.-]*://)")


def public_card(card: dict[str, Any]) -> dict[str, Any]:
    """``card`` without file checksums (its own, its checkpoints') and without any value
    that names a place on the server, at any depth (a key whose value is one is dropped)."""
    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if not _is_location(v) and k != "files"}
        if isinstance(value, list):
            return [clean(v) for v in value if not _is_location(v)]
        return value

    return clean(card)


def _is_location(value: Any) -> bool:
    return isinstance(value, str) and _LOCATION.match(value.strip()) is not None


@router.get("/{model_id}/card/plot.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}}})
async def model_card_plot(model_id: str) -> Response:
    """The training-curve PNG stored with the version (drawn from the card if absent)."""
    mv = get_context().resolve(model_id)
    png = await asyncio.to_thread(_plot_bytes, mv)
    if png is None:
        raise APIError(404, f"model {mv.id!r} has no training curve (imported models have none)",
                       "model", "no_training_curve")
    # A name:version never changes; a bare name moves to each new version.
    cache = "public, max-age=31536000, immutable" if model_id == mv.id else "no-cache"
    return Response(png, media_type="image/png", headers={"Cache-Control": cache})


_PLOTS: dict[str, bytes | None] = {}  # name:version → PNG (versions are immutable)
_MAX_PLOTS = 64


def _plot_bytes(mv: ModelVersion) -> bytes | None:
    if mv.id not in _PLOTS:
        if len(_PLOTS) >= _MAX_PLOTS:
            _PLOTS.pop(next(iter(_PLOTS)))  # oldest first
        _PLOTS[mv.id] = _stored_plot(mv) or render_loss_plot(dict(mv.card, name=mv.id))
    return _PLOTS[mv.id]


def _stored_plot(mv: ModelVersion) -> bytes | None:
    """The stored PNG if its checksum matches the card; else None (redrawn from the card)."""
    name = mv.card.get("loss_plot")
    if not name:
        return None
    fs, path = storage.filesystem(storage.join(mv.uri, name))
    try:
        with fs.open_input_stream(path) as fh:
            data = fh.read()
    except (FileNotFoundError, OSError):
        return None
    expected = mv.card.get("files", {}).get(name)
    return data if expected is None or hashlib.sha256(data).hexdigest() == expected else None
