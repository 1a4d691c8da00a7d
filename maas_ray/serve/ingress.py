"""The HTTP front door: one FastAPI app, one router per API surface."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from ray import serve

from maas_ray import __version__
from maas_ray.registry import Registry
from maas_ray.serve.context import get_context, set_context
from maas_ray.serve.errors import install_error_handlers
from maas_ray.serve.limits import BodySizeLimit
from maas_ray.serve.metrics import MeteredContext, RequestMetrics
from maas_ray.serve.openai import router as openai_router
from maas_ray.serve.routes import cards, console, health, oip, tabular
from maas_ray.serve.settings import AppArgs

logger = logging.getLogger(__name__)


def make_fastapi_app() -> FastAPI:
    app = FastAPI(
        title="maas_ray",
        version=__version__,
        description="Model-as-a-Service on Ray: OpenAI-compatible and Open Inference Protocol APIs.",
    )
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_body_bytes=lambda: get_context().settings.max_body_bytes)
    # Outermost, so it also counts what inner middleware refuses (413).
    app.add_middleware(RequestMetrics, paths=lambda: list(app.openapi()["paths"]))
    for module in (health, tabular, cards, openai_router, oip, console):
        app.include_router(module.router)
    return app


fastapi_app = make_fastapi_app()


@serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(fastapi_app)
class Ingress:
    """Authenticates, validates and routes; model work happens in the handles."""

    def __init__(self, settings: AppArgs, **handles: Any) -> None:
        set_context(MeteredContext(settings=settings, registry=Registry(settings.storage_root()),
                                   handles=handles))
        logger.info("maas ingress ready (storage %s)", settings.storage_root())
