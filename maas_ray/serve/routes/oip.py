"""Open Inference Protocol (KServe v2) for tabular models.

Inputs: one tensor ``input-0`` of shape ``[N, F]`` (FP32/FP64/INT*), ``data``
flat row-major or nested. Outputs: ``output-0`` predictions ``[N]`` and, for
classifiers, ``probabilities`` ``[N, C]``. Errors are ``{"error": "..."}``.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from maas_ray import __version__
from maas_ray.registry import ModelVersion
from maas_ray.serve.calls import TABULAR_TASKS, check_rows, predict_rows
from maas_ray.serve.context import get_context
from maas_ray.serve.errors import APIError, documented

router = APIRouter(prefix="/v2", tags=["open-inference-protocol"])
_MISSING = documented(404, oip=True)

_NUMERIC = {"FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64",
            "UINT8", "UINT16", "UINT32", "UINT64"}


class Tensor(BaseModel):
    model_config = ConfigDict(extra="allow")  # OIP allows extension fields
    name: str
    # Bounded per dimension: [0, 2**70] fills with no data and used to reach numpy as a 500.
    shape: list[Annotated[int, Field(ge=-1, le=2**31 - 1)]] = Field(min_length=1, max_length=8)
    datatype: str
    data: list[Any] = Field(max_length=1_000_000)
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[Tensor] = Field(min_length=1, max_length=64)
    outputs: list[dict[str, Any]] | None = Field(default=None, max_length=64)


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[Tensor]


@router.get("")
async def server_metadata() -> dict[str, Any]:
    return {"name": "maas_ray", "version": __version__, "extensions": []}


@router.get("/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready")
async def ready() -> dict[str, bool]:
    get_context()  # raises until the ingress is initialised
    return {"ready": True}


def _metadata(mv: ModelVersion) -> dict[str, Any]:
    classifier = mv.task == "classification"
    classes = mv.card.get("classes") or []
    label_type = "INT64" if all(isinstance(c, int) for c in classes) else "BYTES"
    outputs = [{"name": "output-0", "datatype": label_type if classifier else "FP64", "shape": [-1]}]
    if classifier:
        outputs.append({"name": "probabilities", "datatype": "FP32", "shape": [-1, -1]})
    return {
        "name": mv.name,
        "versions": [str(v) for v in get_context().registry.versions(mv.name)],
        "platform": "pytorch",
        "inputs": [{"name": "input-0", "datatype": "FP32",
                    "shape": [-1, int(mv.card.get("n_features", -1))]}],
        "outputs": outputs,
    }


@router.get("/models/{name}", responses=_MISSING)
async def model_metadata(name: str) -> dict[str, Any]:
    return _metadata(get_context().resolve(name))


@router.get("/models/{name}/versions/{version}", responses=_MISSING)
async def model_version_metadata(name: str, version: int) -> dict[str, Any]:
    return _metadata(get_context().resolve(f"{name}:{version}"))


@router.get("/models/{name}/ready", responses=_MISSING)
async def model_ready(name: str) -> dict[str, Any]:
    mv = get_context().resolve(name)
    return {"name": mv.name, "ready": mv.task in TABULAR_TASKS}


@router.post("/models/{name}/infer", response_model=InferResponse, response_model_exclude_none=True,
             responses=_MISSING)
async def infer(name: str, body: InferRequest) -> InferResponse:
    return await _infer(get_context().resolve(name), body)


@router.post("/models/{name}/versions/{version}/infer", response_model=InferResponse,
             response_model_exclude_none=True, responses=_MISSING)
async def infer_version(name: str, version: int, body: InferRequest) -> InferResponse:
    return await _infer(get_context().resolve(f"{name}:{version}"), body)


def _rows(tensor: Tensor) -> np.ndarray:
    if tensor.datatype.upper() not in _NUMERIC:
        raise APIError(400, f"input {tensor.name!r}: datatype {tensor.datatype!r} is not numeric")
    if any(d < 0 for d in tensor.shape) or len(tensor.shape) != 2:
        raise APIError(400, f"input {tensor.name!r}: shape must be [N, F], got {tensor.shape}")
    flat = np.asarray(tensor.data, dtype=object).reshape(-1) if tensor.data else np.empty(0)
    if any(isinstance(v, (str, bool, list, dict)) or v is None for v in flat.tolist()):
        raise APIError(400, f"input {tensor.name!r}: data must hold numbers only")
    values = np.asarray(flat.tolist(), dtype=np.float64)
    if values.size != tensor.shape[0] * tensor.shape[1]:
        raise APIError(400, f"input {tensor.name!r}: {values.size} values do not fill shape "
                       f"{tensor.shape}")
    return values.reshape(tensor.shape)


async def _infer(mv: ModelVersion, body: InferRequest) -> InferResponse:
    ctx = get_context()
    if len(body.inputs) != 1:
        raise APIError(400, f"model {mv.name!r} takes exactly one input tensor, "
                       f"got {len(body.inputs)}")
    rows = _rows(body.inputs[0])
    check_rows(mv, rows, ctx.settings.max_rows_per_request, body.inputs[0].name)
    out = await predict_rows(ctx, mv, rows)
    preds = np.asarray(out["predictions"])
    if mv.task == "classification":
        labels = preds.tolist()
        numeric = all(isinstance(v, (int, np.integer)) for v in labels)
        outputs = [Tensor(name="output-0", shape=[len(labels)],
                          datatype="INT64" if numeric else "BYTES",
                          data=[int(v) if numeric else str(v) for v in labels])]
        probs = np.asarray(out["probabilities"], dtype=np.float32)
        outputs.append(Tensor(name="probabilities", shape=list(probs.shape), datatype="FP32",
                              data=probs.reshape(-1).tolist()))
    else:
        outputs = [Tensor(name="output-0", shape=[len(preds)], datatype="FP64",
                          data=preds.astype(np.float64).tolist())]
    return InferResponse(model_name=mv.name, model_version=str(mv.version), id=body.id,
                         outputs=outputs)
