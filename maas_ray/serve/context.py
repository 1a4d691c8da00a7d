"""Per-replica state the routers share: registry, settings and deployment handles.

Routers are plain ``APIRouter`` modules (one per API surface); the ingress
replica fills this in at start-up and route functions read it through
:func:`get_context`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from maas_ray.registry import ModelRef, ModelVersion, Registry
from maas_ray.serve.settings import AppArgs


@dataclass
class ServiceContext:
    settings: AppArgs
    registry: Registry
    handles: dict[str, Any] = field(default_factory=dict)
    # name:version → card; versions are immutable, so this never goes stale.
    _cards: dict[str, ModelVersion] = field(default_factory=dict)

    def resolve(self, model_id: str) -> ModelVersion:
        """``name`` → its latest version (read fresh, so new versions appear at once)."""
        ref = ModelRef.parse(model_id)
        if ref.version is not None and str(ref) in self._cards:
            return self._cards[str(ref)]
        mv = self.registry.get(ref)
        self._cards[mv.id] = mv
        return mv


_CONTEXT: ServiceContext | None = None


def set_context(ctx: ServiceContext) -> None:
    global _CONTEXT
    _CONTEXT = ctx


def get_context() -> ServiceContext:
    if _CONTEXT is None:
        raise RuntimeError("the maas ingress has not been initialised in this process")
    return _CONTEXT
