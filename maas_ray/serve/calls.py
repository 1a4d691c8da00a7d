"""Calling model deployments from the ingress: validation, timeouts, failures.

A dead or overloaded replica is the server's problem, not the client's input:
it becomes 503 with ``Retry-After`` rather than a 500 or a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import ray.exceptions
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from maas_ray.auth.middleware import report_usage, tokens_left
from maas_ray.registry import ModelVersion
from maas_ray.serve.context import ServiceContext
from maas_ray.serve.errors import APIError

logger = logging.getLogger(__name__)

TABULAR_TASKS = ("regression", "classification")

# Model calls carry small arguments over Serve's gRPC transport (``_by_reference=False``)
# instead of as Ray objects: that costs about 4.5 CPU ms less per request on 2 cores
# (``python benchmarks/request_path.py``; app arg ``model_transport: ray`` turns it off). A replica's gRPC channel takes
# messages of at most 4 MiB each way (``RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH``), so
# calls whose arguments or answer may be larger go by reference, which has no such cap.
GRPC_MAX_ARG_BYTES = 1 << 20  # estimated bytes of arguments (a character counts 1; UTF-8 has at most 4)
GRPC_MAX_ITEMS = 64  # inputs per call: the answer grows with them (an embedding per text...)


def wire_size(obj: Any, limit: int = GRPC_MAX_ARG_BYTES) -> int:
    """A cheap estimate of ``obj``'s pickled size; stops counting once past ``limit``."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, str | bytes):
        return len(obj)
    if isinstance(obj, dict):
        obj = [*obj.keys(), *obj.values()]
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    if isinstance(obj, list | tuple):
        total = 0
        for item in obj:
            total += wire_size(item, limit - total)
            if total > limit:
                break
        return total
    return 8  # numbers, None, small objects


def model_handle(ctx: ServiceContext, deployment: str, model_key: str, *args: Any,
                 items: int = 1, **options: Any) -> Any:
    """The deployment's handle for one call with ``args``: over gRPC when they and the
    answer are small, else by reference."""
    small = (ctx.settings.model_transport == "grpc" and items <= GRPC_MAX_ITEMS
             and wire_size(args) <= GRPC_MAX_ARG_BYTES)
    return ctx.handles[deployment].options(multiplexed_model_id=model_key,
                                           _by_reference=not small, **options)


def check_rows(mv: ModelVersion, rows: np.ndarray, max_rows: int, param: str) -> None:
    """Reject inputs the model cannot take, naming what was expected."""
    if mv.task not in TABULAR_TASKS:
        raise APIError(400, f"model {mv.id!r} is a {mv.task!r} model, not a tabular one",
                       "model", "wrong_model_type")
    n_features = int(mv.card.get("n_features", -1))
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise APIError(400, f"{param} must be a non-empty list of rows", param, "invalid_shape")
    if rows.shape[0] > max_rows:
        raise APIError(400, f"{param} has {rows.shape[0]} rows; at most {max_rows} per request",
                       param, "too_many_rows")
    if rows.shape[1] != n_features:
        raise APIError(400, f"model {mv.id!r} expects {n_features} features per row, "
                       f"got {rows.shape[1]}", param, "wrong_feature_count")
    if not np.isfinite(rows).all():
        raise APIError(400, f"{param} contains NaN or infinite values", param, "invalid_value")


@contextlib.contextmanager
def replica_errors(mv: ModelVersion, timeout_s: float) -> Iterator[None]:
    """Turn timeouts, back-pressure and dead replicas into 503 + Retry-After."""
    try:
        yield
    except asyncio.TimeoutError:
        raise APIError(503, f"model {mv.id!r} did not answer within {timeout_s:g} s; retry later",
                       code="timeout", headers={"Retry-After": "1"}) from None
    except BackPressureError:
        raise APIError(503, f"model {mv.id!r} is at capacity; retry later",
                       code="overloaded", headers={"Retry-After": "1"}) from None
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
            ReplicaUnavailableError, DeploymentUnavailableError,
            grpc.aio.AioRpcError) as err:  # the gRPC transport's failures (calls above)
        logger.warning("replica failed for %s: %s", mv.id, type(err).__name__)
        raise APIError(503, "a model replica failed while serving this request; retry",
                       code="replica_failed", headers={"Retry-After": "1"}) from None


async def predict_rows(ctx: ServiceContext, mv: ModelVersion, rows: np.ndarray) -> dict[str, Any]:
    """Run validated rows through the predictor deployment."""
    handle = model_handle(ctx, "predictor", mv.id, rows, items=len(rows))
    timeout = ctx.settings.request_timeout_s
    with replica_errors(mv, timeout):
        return await asyncio.wait_for(handle.predict.remote(mv.id, rows), timeout=timeout)


async def classify_texts(ctx: ServiceContext, mv: ModelVersion, texts: list[Any]) -> dict[str, Any]:
    """Texts through a fine-tuned text classifier (served by the embedding deployment)."""
    if not all(isinstance(t, str) for t in texts):
        raise APIError(400, f"inputs: model {mv.id!r} classifies texts: send a list of strings",
                       "inputs", "invalid_value")
    if len(texts) > ctx.settings.max_rows_per_request:
        raise APIError(400, f"inputs: at most {ctx.settings.max_rows_per_request} texts per request",
                       "inputs", "too_many_rows")
    texts = list(texts)
    handle = model_handle(ctx, "embedder", mv.id, texts, items=len(texts))
    timeout = ctx.settings.request_timeout_s
    with replica_errors(mv, timeout):
        out = await asyncio.wait_for(handle.classify.remote(mv.id, texts, tokens_left()),
                                     timeout=timeout)
    if isinstance(out, APIError):  # over the API key's daily token budget: nothing was run
        raise out
    report_usage(out["prompt_tokens"], 0)
    return out
