"""``/v1/models``: listing, and ``POST /v1/models/{name}/predict`` for tabular models."""

from __future__ import annotations

import time
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from maas_ray.serve.calls import check_rows, classify_texts, predict_rows
from maas_ray.registry import ModelNotFound
from maas_ray.registry.checkpoints import checkpoint_version, kept_steps
from maas_ray.registry.refs import checkpoint_name
from maas_ray.serve.context import get_context
from maas_ray.serve.errors import APIError, documented

router = APIRouter(tags=["models"])

# Strict: "1.5" (a string) or true is a client bug, not a number to coerce.
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Row = Annotated[list[Number], Field(max_length=10_000)]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: list[Row] | list[Annotated[str, Field(strict=True)]] = Field(
        min_length=1, max_length=100_000, description="Tabular models: rows of raw feature values, "
        "in the model's feature order. Text classifiers: the texts to classify."
    )


class PredictResponse(BaseModel):
    model: str = Field(description="The exact version that answered, as name:version.")
    predictions: list[Any]
    probabilities: list[list[float]] | None = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str
    task: str | None = None
    version: int | None = None
    versions: list[int] | None = None
    engine: dict[str, Any] | None = Field(default=None, description=(
        "Chat models, once served through this ingress replica: the engine (`engine`), its "
        "`max_batch_size`, the llama.cpp batch self-check (`batch_check`) and a `warning` when "
        "it serves in a degraded way, e.g. one request at a time because batching changed answers."))


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


@router.get("/v1/models", response_model=ModelList)
async def list_models() -> ModelList:
    ctx = get_context()
    data = []
    for name in ctx.registry.names():
        versions = ctx.registry.versions(name)
        try:
            mv = ctx.resolve(f"{name}:{versions[-1]}")
        except ModelNotFound:  # another tenant's model, or removed meanwhile
            continue
        data.append(ModelCard(id=name, created=int(mv.card.get("created_at", time.time())),
                              owned_by=str(mv.card.get("owned_by", "maas")), task=mv.task,
                              version=mv.version, versions=versions, engine=ctx.engines.get(mv.id)))
        for step in kept_steps(mv.card):  # a fine-tune's kept checkpoints, servable by id
            ckpt = checkpoint_version(mv, step)
            data.append(ModelCard(id=checkpoint_name(name, step), created=data[-1].created,
                                  owned_by=data[-1].owned_by, task=mv.task, version=mv.version,
                                  versions=ctx.registry.versions(ckpt.name),
                                  engine=ctx.engines.get(ckpt.id)))
    return ModelList(data=data)


@router.get("/v1/models/{model_id}", response_model=ModelCard, responses=documented(404))
async def get_model(model_id: str) -> ModelCard:
    ctx = get_context()
    mv = ctx.resolve(model_id)
    return ModelCard(id=model_id, created=int(mv.card.get("created_at", 0)),
                     owned_by=str(mv.card.get("owned_by", "maas")), task=mv.task,
                     version=mv.version, versions=ctx.registry.versions(mv.name),
                     engine=ctx.engines.get(mv.id))


@router.post("/v1/models/{model_id}/predict", response_model=PredictResponse,
             response_model_exclude_none=True, responses=documented(404))
async def predict(model_id: str, body: PredictRequest) -> PredictResponse:
    ctx = get_context()
    mv = ctx.resolve(model_id)
    if mv.task == "text-classification":
        out = await classify_texts(ctx, mv, body.inputs)
        return PredictResponse(model=mv.id, predictions=list(out["predictions"]),
                               probabilities=np.asarray(out["probabilities"]).tolist())
    if any(isinstance(row, str) for row in body.inputs):
        raise APIError(400, f"inputs: model {mv.id!r} is a {mv.task!r} model: send rows of "
                       "numbers, not texts", "inputs", "invalid_value")
    if len({len(row) for row in body.inputs}) != 1:
        raise APIError(400, "inputs: every row must have the same number of values",
                       "inputs", "invalid_shape")
    rows = np.asarray(body.inputs, dtype=np.float64)  # (B, F)
    check_rows(mv, rows, ctx.settings.max_rows_per_request, "inputs")
    out = await predict_rows(ctx, mv, rows)
    probs = out.get("probabilities")
    return PredictResponse(model=mv.id, predictions=np.asarray(out["predictions"]).tolist(),
                           probabilities=None if probs is None else np.asarray(probs).tolist())
