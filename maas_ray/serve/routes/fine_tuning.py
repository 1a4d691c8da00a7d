"""``/v1/fine_tuning/jobs``: OpenAI's fine-tuning API over Ray jobs.

The body is OpenAI's; ``method`` takes ``{"type": "supervised"}`` (full
fine-tuning, OpenAI's own), ``{"type": "dpo", "dpo": {"hyperparameters": {"beta",
...}}}`` (OpenAI's preference fine-tuning; our extension ``"lora": {...}`` inside
``dpo`` trains adapters) or ``{"type": "lora", "lora": {"r", "alpha", "dropout",
"target_modules", "hyperparameters"}}`` (our extension). All become one
:class:`~maas_ray.config.finetune.FineTuneSpec`, the same spec ``maas train`` runs.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from maas_ray.config.finetune import DpoSpec, FineTuneSpec, Hyperparameters, LoraSpec
from maas_ray.config.load import format_validation_error
from maas_ray.finetune.jobs import JobConflict, JobNotFound, JobRejected
from maas_ray.serve.context import get_context, tenant_of
from maas_ray.serve.errors import APIError, documented
from maas_ray.serve.routes.files import database_errors, not_found

router = APIRouter(tags=["fine-tuning"])
# Pydantic matches patterns with Rust's regex engine, where `$` is the end of the text only.
EVENT_ID = r"^ftevent-[0-9]{1,18}$"  # an integer row id that fits 64 bits, in ASCII digits

Auto = Literal["auto"]


def like(spec: type[BaseModel], name: str) -> Any:
    """The type of ``spec.name`` with its bounds, so the request schema shows the spec's limits
    instead of a second hand-written copy of them."""
    info = spec.model_fields[name]
    return Annotated[(info.annotation, *info.metadata)]


class HyperparametersIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: like(Hyperparameters, "n_epochs") | Auto | None = None
    batch_size: like(Hyperparameters, "batch_size") | Auto | None = None
    learning_rate_multiplier: like(Hyperparameters, "learning_rate_multiplier") | Auto | None = None


class LoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: like(LoraSpec, "r") | None = None
    alpha: like(LoraSpec, "alpha") | None = None
    dropout: like(LoraSpec, "dropout") | None = None
    target_modules: list[str] | None = Field(default=None, max_length=64)


class MethodOptions(LoraOptions):
    hyperparameters: HyperparametersIn | None = None


class DpoHyperparametersIn(HyperparametersIn):
    beta: like(DpoSpec, "beta") | Auto | None = None


class DpoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: DpoHyperparametersIn | None = None
    lora: LoraOptions | None = Field(default=None, description="maas extension: train LoRA "
                                     "adapters (these options) instead of every weight.")


class MethodIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "lora", "dpo"] = "supervised"
    supervised: MethodOptions | None = None
    lora: MethodOptions | None = None
    dpo: DpoOptions | None = None


class CreateJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="Base model id, e.g. smollm2-135m-instruct.")
    training_file: str = Field(description="Id of an uploaded file (purpose fine-tune).")
    validation_file: str | None = None
    suffix: str | None = None
    seed: like(FineTuneSpec, "seed") = None
    hyperparameters: HyperparametersIn | None = None
    method: MethodIn | None = None
    export_gguf: Literal["f32", "f16", "q8_0"] | None = Field(
        default=None, description="maas extension: also publish a GGUF for the llama.cpp engine.")
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    integrations: list[dict[str, Any]] | None = Field(default=None, max_length=16)


def to_spec(body: CreateJob) -> FineTuneSpec:
    method = body.method or MethodIn()
    options = getattr(method, method.type) or (DpoOptions() if method.type == "dpo" else MethodOptions())
    hp: dict[str, Any] = {}
    for source in (body.hyperparameters, options.hyperparameters):  # method's win, as in OpenAI
        if source is not None:
            hp.update({k: v for k, v in source.model_dump().items() if v not in (None, "auto")})
    lora = options if method.type == "lora" else getattr(options, "lora", None)
    raw: dict[str, Any] = {"base_model": body.model, "training_file": body.training_file,
                           "validation_file": body.validation_file, "suffix": body.suffix,
                           "seed": body.seed, "method": "lora" if lora is not None else "full",
                           "export_gguf": body.export_gguf}
    if method.type == "dpo":
        raw["dpo"] = {"beta": hp.pop("beta")} if "beta" in hp else {}
    raw["hyperparameters"] = hp
    if lora is not None:
        raw["lora"] = {k: v for k, v in lora.model_dump(include=set(LoraOptions.model_fields)).items()
                       if v is not None}
    try:
        return FineTuneSpec.model_validate(raw)
    except ValidationError as err:
        message = format_validation_error(err, "request").replace("request: ", "", 1)
        param = message.split(":", 1)[0].replace("base_model", "model")
        raise APIError(400, message.replace("base_model", "model"), param, "invalid_value") from None


def jobs() -> Any:
    return get_context().jobs


@router.post("/v1/fine_tuning/jobs")
@database_errors
def create_job(request: Request, body: CreateJob) -> dict[str, Any]:
    spec = to_spec(body)
    try:
        return jobs().create(spec, tenant_of(request))
    except JobRejected as err:
        raise APIError(400, str(err), err.param, "invalid_value") from None
    except RuntimeError as err:  # no dashboard / job server: the cluster cannot run jobs
        raise APIError(503, f"cannot start the fine-tuning job: {err}", None,
                       "jobs_unavailable", {"Retry-After": "30"}) from None


@router.get("/v1/fine_tuning/jobs")
@database_errors
def list_jobs(request: Request, after: str | None = None,
              limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict[str, Any]:
    try:
        data, more = jobs().list(tenant_of(request), after, limit)
    except JobNotFound as err:
        raise APIError(400, f"after: {err}", "after", "invalid_value") from None
    return {"object": "list", "data": data, "has_more": more}


@router.get("/v1/fine_tuning/jobs/{job_id}", responses=documented(404))
@database_errors
def get_job(request: Request, job_id: str) -> dict[str, Any]:
    try:
        return jobs().get(job_id, tenant_of(request))
    except JobNotFound as err:
        raise not_found(err, "fine_tuning_job_id") from None


@router.get("/v1/fine_tuning/jobs/{job_id}/events", responses=documented(404))
@database_errors
def job_events(request: Request, job_id: str,
               after: Annotated[str | None, Query(pattern=EVENT_ID, description="An event id "
                                                  "(ftevent-...): list the events before it.")] = None,
               limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> dict[str, Any]:
    try:
        data, more = jobs().events(job_id, tenant_of(request), after, limit)
    except JobNotFound as err:
        raise not_found(err, "fine_tuning_job_id") from None
    except JobRejected as err:
        raise APIError(400, str(err), err.param, "invalid_value") from None
    return {"object": "list", "data": data, "has_more": more}


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints", responses=documented(404))
@database_errors
def job_checkpoints(request: Request, job_id: str,
                    limit: Annotated[int, Query(ge=1, le=100)] = 10) -> dict[str, Any]:
    try:
        data, more = jobs().checkpoints(job_id, tenant_of(request), limit)
    except JobNotFound as err:
        raise not_found(err, "fine_tuning_job_id") from None
    return {"object": "list", "data": data, "has_more": more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel", responses=documented(404, 409))
@database_errors
def cancel_job(request: Request, job_id: str) -> dict[str, Any]:
    try:
        return jobs().cancel(job_id, tenant_of(request))
    except JobNotFound as err:
        raise not_found(err, "fine_tuning_job_id") from None
    except JobConflict as err:
        raise APIError(409, str(err), "fine_tuning_job_id", "job_not_cancellable") from None
