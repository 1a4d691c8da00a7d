"""Building the one maas Serve application.

``serve run apps/maas.yaml`` imports :func:`build_app` (``import_path``) and
passes the config's ``args``; ``maas up`` calls it directly.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from maas_ray.serve.embedding_server import EmbeddingServer
from maas_ray.serve.ingress import Ingress
from maas_ray.serve.llm_server import LLMServer
from maas_ray.serve.predictor import Predictor
from maas_ray.serve.settings import AppArgs


def build_app(args: dict[str, Any] | AppArgs | None = None) -> Application:
    """The application graph: ingress → predictor (tabular), LLM server, embedder."""
    settings = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    # Pin the storage root now so every replica sees the same one.
    settings = settings.model_copy(update={"storage": settings.storage_root()})
    logging_config = {"enable_access_log": settings.access_log}

    def options(name: str) -> dict[str, Any]:
        # args.deployments overrides per deployment (autoscaling, queue limits...)
        return {"logging_config": logging_config, **settings.deployment_options(name)}

    predictor = Predictor.options(**options("Predictor")).bind(
        settings.storage,
        settings.predictor.max_batch_size,
        settings.predictor.batch_wait_timeout_s,
    )
    llm = LLMServer.options(**options("LLMServer")).bind(settings.storage, **settings.llm.model_dump())
    embedder = EmbeddingServer.options(**options("EmbeddingServer")).bind(
        settings.storage, settings.embeddings.max_batch_size, settings.embeddings.batch_wait_timeout_s)
    return Ingress.options(**options("Ingress")).bind(
        settings, predictor=predictor, llm=llm, embedder=embedder)
