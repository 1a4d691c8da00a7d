"""Open Inference Protocol (KServe v2) for tabular models.

Inputs: one tensor ``input-0`` of shape ``[N, F]`` (FP32/FP64/INT*), ``data``
flat row-major or nested, or raw bytes after the JSON (the binary tensor data
extension, :mod:`maas_ray.serve.oip_binary`, which ``tritonclient`` uses by default).
Outputs: ``output-0`` predictions ``[N]`` and, for classifiers, ``probabilities``
``[N, C]``, in JSON or binary as the request asks. Errors are ``{"error": "..."}``.
The body is read whatever its content type (``tritonclient`` sends none).
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from maas_ray import __version__
from maas_ray.registry import ModelVersion
from maas_ray.serve.calls import TABULAR_TASKS, check_rows, predict_rows
from maas_ray.serve.context import get_context
from maas_ray.serve import oip_binary
from maas_ray.serve.errors import APIError, documented

router = APIRouter(prefix="/v2", tags=["open-inference-protocol"])
_MISSING = documented(404, oip=True)

# A registry version: a folder number, bounded so the schema says so (and 2**70 never reaches a lookup).
Version = Annotated[int, Path(ge=0, le=2**63 - 1, description="Model version number.")]
_NUMERIC = {"FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64",
            "UINT8", "UINT16", "UINT32", "UINT64"}


class Tensor(BaseModel):
    model_config = ConfigDict(extra="allow")  # OIP allows extension fields
    name: str
    # Bounded per dimension: [0, 2**70] fills with no data and used to reach numpy as a 500.
    shape: list[Annotated[int, Field(ge=-1, le=2**31 - 1)]] = Field(min_length=1, max_length=8)
    datatype: str
    # Absent when the values come as binary (``parameters.binary_data_size``).
    data: list[Any] = Field(default_factory=list, max_length=1_000_000)
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
async def model_version_metadata(name: str, version: Version) -> dict[str, Any]:
    return _metadata(get_context().resolve(f"{name}:{version}"))


@router.get("/models/{name}/ready", responses=_MISSING)
async def model_ready(name: str) -> dict[str, Any]:
    mv = get_context().resolve(name)
    return {"name": mv.name, "ready": mv.task in TABULAR_TASKS}


# The body is parsed by hand (a JSON header, maybe binary tensors after it), so the schema
# FastAPI would take from a typed parameter is given here.
_INFER_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": InferRequest.model_json_schema(ref_template="#/components/schemas/{model}")}}}}
_INFER_BODY["requestBody"]["content"]["application/json"]["schema"].pop("$defs", None)


@router.post("/models/{name}/infer", response_model=InferResponse, response_model_exclude_none=True,
             responses=_MISSING, openapi_extra=_INFER_BODY)
async def infer(name: str, request: Request) -> Any:
    return await _infer(get_context().resolve(name), request)


@router.post("/models/{name}/versions/{version}/infer", response_model=InferResponse,
             response_model_exclude_none=True, responses=_MISSING, openapi_extra=_INFER_BODY)
async def infer_version(name: str, version: Version, request: Request) -> Any:
    return await _infer(get_context().resolve(f"{name}:{version}"), request)


async def _read(request: Request) -> tuple[InferRequest, list[np.ndarray | None]]:
    """The request and, per input, its values when they came as binary."""
    try:
        header, rest = oip_binary.split_body(await request.body(),
                                             request.headers.get(oip_binary.HEADER))
        body = InferRequest.model_validate_json(header)
        return body, oip_binary.binary_inputs(body.inputs, rest)
    except ValidationError as err:
        raise RequestValidationError(err.errors(include_url=False)) from None
    except oip_binary.BinaryDataError as err:
        raise APIError(400, str(err)) from None


def _rows(tensor: Tensor, binary: np.ndarray | None) -> np.ndarray:
    if tensor.datatype.upper() not in _NUMERIC:
        raise APIError(400, f"input {tensor.name!r}: datatype {tensor.datatype!r} is not numeric")
    if any(d < 0 for d in tensor.shape) or len(tensor.shape) != 2:
        raise APIError(400, f"input {tensor.name!r}: shape must be [N, F], got {tensor.shape}")
    if binary is not None:
        values = binary.astype(np.float64)
    else:
        flat = np.asarray(tensor.data, dtype=object).reshape(-1) if tensor.data else np.empty(0)
        if any(isinstance(v, (str, bool, list, dict)) or v is None for v in flat.tolist()):
            raise APIError(400, f"input {tensor.name!r}: data must hold numbers only")
        values = np.asarray(flat.tolist(), dtype=np.float64)
    if not np.isfinite(values).all():
        raise APIError(400, f"input {tensor.name!r}: values must be finite numbers")
    if values.size != tensor.shape[0] * tensor.shape[1]:
        raise APIError(400, f"input {tensor.name!r}: {values.size} values do not fill shape "
                       f"{tensor.shape}")
    return values.reshape(tensor.shape)


async def _infer(mv: ModelVersion, request: Request) -> Any:
    ctx = get_context()
    body, binary = await _read(request)
    if len(body.inputs) != 1:
        raise APIError(400, f"model {mv.name!r} takes exactly one input tensor, "
                       f"got {len(body.inputs)}")
    rows = _rows(body.inputs[0], binary[0])
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
    outputs = [o for o in outputs if oip_binary.requested(body, o.name)]
    answer = InferResponse(model_name=mv.name, model_version=str(mv.version), id=body.id,
                           outputs=outputs)
    binary_out = {o.name for o in outputs if oip_binary.wants_binary(body, o.name)}
    if not binary_out:
        return answer
    content, header_length = oip_binary.binary_answer(answer.model_dump(exclude_none=True), binary_out)
    return Response(content, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(header_length)})
