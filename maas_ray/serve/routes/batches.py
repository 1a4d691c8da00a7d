"""``/v1/batches``: OpenAI's Batch API over Ray jobs and Ray Data (:mod:`maas_ray.batches`).

The batch runs with the service's own engine choice (``AppArgs.llm``) and the
``AppArgs.batches`` settings, both recorded on the batch when it is created.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from maas_ray.batches.service import BatchService
from maas_ray.finetune.jobs import JobConflict, JobNotFound, JobRejected
from maas_ray.serve.context import get_context, tenant_of
from maas_ray.serve.errors import APIError, documented
from maas_ray.serve.routes.files import database_errors, not_found

router = APIRouter(tags=["batches"])


class CreateBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_file_id: str = Field(description="Id of an uploaded JSONL file (purpose batch).")
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"] = Field(
        description="The endpoint every line's request is for.")
    completion_window: Literal["24h"] = Field(description="The only window OpenAI offers.")
    metadata: dict[str, str] | None = Field(default=None, max_length=16)


def batches() -> BatchService:
    return get_context().batches


def run_spec() -> dict[str, Any]:
    """How this service runs a batch: its batch settings and its engine choice."""
    settings = get_context().settings
    llm = settings.llm
    return {**settings.batches.model_dump(), "engine": llm.engine, "model_engines": llm.model_engines,
            "llama_cpp_threads": llm.llama_cpp_threads}


@router.post("/v1/batches", responses=documented(400))
@database_errors
def create_batch(request: Request, body: CreateBatch) -> dict[str, Any]:
    try:
        return batches().create(body.input_file_id, body.endpoint, body.completion_window,
                                body.metadata, run_spec(), tenant_of(request))
    except JobRejected as err:
        raise APIError(400, str(err), err.param, "invalid_value") from None
    except RuntimeError as err:  # no dashboard / job server: the cluster cannot run jobs
        raise APIError(503, f"cannot start the batch: {err}", None, "jobs_unavailable",
                       {"Retry-After": "30"}) from None


@router.get("/v1/batches")
@database_errors
def list_batches(request: Request, after: str | None = None,
                 limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict[str, Any]:
    try:
        data, more = batches().list(tenant_of(request), after, limit)
    except JobNotFound as err:
        raise APIError(400, f"after: {err}", "after", "invalid_value") from None
    return {"object": "list", "data": data, "has_more": more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


@router.get("/v1/batches/{batch_id}", responses=documented(404))
@database_errors
def get_batch(request: Request, batch_id: str) -> dict[str, Any]:
    try:
        return batches().get(batch_id, tenant_of(request))
    except JobNotFound as err:
        raise not_found(err, "batch_id") from None


@router.post("/v1/batches/{batch_id}/cancel", responses=documented(404, 409))
@database_errors
def cancel_batch(request: Request, batch_id: str) -> dict[str, Any]:
    try:
        return batches().cancel(batch_id, tenant_of(request))
    except JobNotFound as err:
        raise not_found(err, "batch_id") from None
    except JobConflict as err:
        raise APIError(409, str(err), "batch_id", "batch_not_cancellable") from None
