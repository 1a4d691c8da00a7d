"""The HTTP front door: one FastAPI app, one router per API surface."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from ray import serve

from maas_ray import __version__
from maas_ray.registry import Registry
from maas_ray.auth.keys import KeyStore
from maas_ray.auth.middleware import ApiKeyAuth
from maas_ray.serve.context import (ServiceContext, context_or_none, get_context, set_context,
                                     set_current_tenant)
from maas_ray.serve.errors import install_error_handlers
from maas_ray.serve.hosts import HostAllowList
from maas_ray.serve.limits import BodySizeLimit, JsonDepthLimit, is_upload
from maas_ray.serve.metrics import MeteredContext, RequestMetrics
from maas_ray.serve.openai import router as openai_router
from maas_ray.serve.routes import admin, batches, cards, console, files, fine_tuning, health, oip, tabular
from maas_ray.serve.settings import AppArgs

logger = logging.getLogger(__name__)


def body_limit(scope: dict[str, Any]) -> int:
    """Uploads (multipart ``POST /v1/files``, streamed to storage) may be larger than API calls."""
    settings = get_context().settings
    if is_upload(scope):
        return settings.max_upload_bytes
    return settings.max_body_bytes


# Named module functions, not lambdas: Serve pickles the FastAPI app by value; these read
# the replica's context at call time.
def auth_enabled() -> bool:
    ctx = context_or_none()
    return ctx is not None and ctx.auth_required


def key_store() -> KeyStore | None:
    ctx = context_or_none()
    return None if ctx is None else ctx.keys


def allowed_hosts() -> list[str]:
    ctx = context_or_none()
    return ["*"] if ctx is None else ctx.hosts


def configure_auth(ctx: ServiceContext) -> bool:
    """Give this replica's context its key store, whether keys are required and the Host
    allow-list."""
    settings = ctx.settings
    asks = settings.http_host is None and (settings.auth == "auto" or settings.allowed_hosts is None)
    serve_host = _serve_http_host() if asks else None
    ctx.keys = KeyStore(settings.storage_root())
    ctx.auth_required = bool(settings.auth_enabled(serve_host))
    ctx.hosts = settings.host_allow_list(serve_host)
    return ctx.auth_required


def _serve_http_host() -> str | None:
    """The interface the running Serve instance's HTTP proxies listen on, if it can be asked."""
    try:
        import ray
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return ray.get(controller.get_http_config.remote(), timeout=10).host
    except Exception:  # unknown: auth='auto' then stays on
        return None


def json_depth() -> int:
    return get_context().settings.max_json_depth


class Cors:
    """CORS only for the origins in the settings (none by default): browsers on other
    sites cannot call the API unless an operator says so. Built on the first request,
    once the replica's settings exist."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._inner: Any = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self._inner is None:
            from starlette.middleware.cors import CORSMiddleware

            origins = get_context().settings.cors_origins
            self._inner = CORSMiddleware(self.app, allow_origins=origins, allow_methods=["*"],
                                         allow_headers=["*"]) if origins else self.app
        await self._inner(scope, receive, send)


def make_fastapi_app() -> FastAPI:
    app = FastAPI(
        title="maas_ray",
        version=__version__,
        description="Model-as-a-Service on Ray: OpenAI-compatible and Open Inference Protocol APIs.",
    )
    install_error_handlers(app)
    app.add_middleware(JsonDepthLimit, max_depth=json_depth)
    app.add_middleware(BodySizeLimit, max_body_bytes=body_limit)
    # Outside the body limit: an unauthenticated client cannot make us read its body.
    app.add_middleware(ApiKeyAuth, enabled=auth_enabled, store=key_store, set_tenant=set_current_tenant)
    # Outside auth: a browser's preflight (OPTIONS) carries no key.
    app.add_middleware(Cors)
    # Before anything answers: a rebound name (DNS rebinding) gets no page, preflight or error.
    app.add_middleware(HostAllowList, allowed=allowed_hosts)
    # Outermost, so it also counts what inner middleware refuses (413).
    app.add_middleware(RequestMetrics, paths=lambda: list(app.openapi()["paths"]))
    for module in (health, tabular, cards, openai_router, files, fine_tuning, batches, admin, oip, console):
        app.include_router(module.router)
    return app


fastapi_app = make_fastapi_app()


@serve.deployment(max_ongoing_requests=512, max_queued_requests=4096, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(fastapi_app)
class Ingress:
    """Authenticates, validates and routes; model work happens in the handles."""

    def __init__(self, settings: AppArgs, **handles: Any) -> None:
        ctx = MeteredContext(settings=settings, registry=Registry(settings.storage_root()),
                             handles=handles)
        required = configure_auth(ctx)
        set_context(ctx)
        logger.info("maas ingress ready (storage %s, API keys %s, Host allow-list %s)",
                    settings.storage_root(), "required" if required else "off", allowed_hosts())

    def __del__(self) -> None:
        """Serve calls this when the replica stops: write the usage metered since the last flush."""
        store = key_store()
        if store is not None:
            store.close()
