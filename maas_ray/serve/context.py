"""Per-replica state the routers share: settings, registry, deployment handles, the stores
behind the files, fine-tuning and batch routes, and the API keys and their settings.

Routers are plain ``APIRouter`` modules (one per API surface); the ingress
replica fills this in at start-up and route functions and the edge middleware read it
through :func:`get_context`. One object per replica, instead of module globals and caches.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from maas_ray.registry import ModelRef, ModelVersion, Registry
from maas_ray.serve.settings import AppArgs
from maas_ray.tenancy import DEFAULT_TENANT, resolve_model

if TYPE_CHECKING:
    from maas_ray.auth.keys import KeyStore
    from maas_ray.batches.service import BatchService
    from maas_ray.finetune.files import FileStore
    from maas_ray.finetune.jobs import JobService


@dataclass
class ServiceContext:
    settings: AppArgs
    registry: Registry
    handles: dict[str, Any] = field(default_factory=dict)
    # name:version → the engine that last served it (``GenerationEngine.info()``), for /v1/models.
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)
    # name:version → card; versions are immutable, so this never goes stale.
    _cards: dict[str, ModelVersion] = field(default_factory=dict)
    # name → (folder mtime in ns, when we read it in ns, latest version)
    _latest: dict[str, tuple[int, int, ModelVersion]] = field(default_factory=dict)
    # API keys: the store (usage ledger included), whether keys are required, and the
    # Host allow-list; set once by the ingress (:func:`maas_ray.serve.ingress.configure_auth`).
    keys: KeyStore | None = None
    auth_required: bool = False
    hosts: list[str] = field(default_factory=lambda: ["*"])

    @cached_property
    def files(self) -> FileStore:
        from maas_ray.finetune.files import FileStore

        return FileStore(self.settings.storage_root())

    @cached_property
    def jobs(self) -> JobService:
        from maas_ray.finetune.jobs import JobService

        return JobService(self.settings.storage_root())

    @cached_property
    def batches(self) -> BatchService:
        from maas_ray.batches.service import BatchService

        return BatchService(self.settings.storage_root())

    def resolve(self, model_id: str) -> ModelVersion:
        """The model a request may use: :meth:`resolve_any` behind the tenant check of
        :func:`maas_ray.tenancy.resolve_model`. Every route resolves through here; another
        tenant's model answers exactly as one that never existed."""
        return resolve_model(self.resolve_any, model_id, current_tenant())

    def resolve_any(self, model_id: str) -> ModelVersion:
        """``name`` → its latest version; ``name:version`` → that version, whoever owns
        it; its not-found errors may list versions. Routes use :meth:`resolve`.

        The latest version is re-read whenever the model's folder changes (a
        publish or removal renames inside it), so a new version is served on the
        very next request without listing storage on every call.
        """
        ref = ModelRef.parse(model_id)
        if ref.version is not None:
            if str(ref) not in self._cards:
                mv = self.registry.get(ref)
                self._cards[mv.id] = mv
            return self._cards[str(ref)]
        stamp = self.registry.change_stamp(ref.name)
        cached = self._latest.get(ref.name)
        # mtimes tick coarsely: trust an unchanged stamp only if our read came
        # well after it, so a change in the same tick cannot hide.
        if stamp is not None and cached is not None and cached[0] == stamp \
                and cached[1] - stamp > _MTIME_SLACK_NS:
            return cached[2]
        read_at = time.time_ns()
        mv = self.registry.get(ref)
        self._cards[mv.id] = mv
        if stamp is not None:
            self._latest[ref.name] = (stamp, read_at, mv)
        return mv


_MTIME_SLACK_NS = 100_000_000  # 100 ms
_CONTEXT: ServiceContext | None = None


def set_context(ctx: ServiceContext) -> None:
    global _CONTEXT
    _CONTEXT = ctx


def get_context() -> ServiceContext:
    if _CONTEXT is None:
        raise RuntimeError("the maas ingress has not been initialised in this process")
    return _CONTEXT


def context_or_none() -> ServiceContext | None:
    """The context, or None before the ingress has set it (middleware built, not yet run)."""
    return _CONTEXT


# The tenant of the request being handled, set by the auth middleware; model
# resolution reads it where no request object is at hand.
_TENANT: ContextVar[str | None] = ContextVar("maas_tenant", default=None)


def set_current_tenant(tenant: str) -> None:
    _TENANT.set(tenant)


def current_tenant() -> str:
    return _TENANT.get() or DEFAULT_TENANT


def tenant_of(request: Any) -> str:
    """The tenant a request acts for: set by authentication when it is on, else the
    single default tenant of an open (loopback) service."""
    return getattr(request.state, "tenant", None) or DEFAULT_TENANT
