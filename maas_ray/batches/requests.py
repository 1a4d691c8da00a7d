"""One batch line: its request validated as the online route validates it, and the lines
of the output and error files in OpenAI's shape.

Each line's ``body`` goes through the same pydantic model as the HTTP route
(:mod:`maas_ray.serve.openai.protocol`), its model through the same tenant check
and task check; what fails becomes that line's entry in the error file, with the
error body the online route would have answered and the line's number.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from maas_ray.registry import ModelNotFound, ModelVersion, Registry
from maas_ray.serve.errors import APIError, _validation_message, error_type
from maas_ray.serve.openai import protocol as p
from maas_ray.serve.openai.serving import CHAT_TASKS, EMBEDDING_TASKS, require_task
from maas_ray.tenancy import resolve_model

REQUESTS: dict[str, tuple[type[BaseModel], tuple[str, ...]]] = {
    "/v1/chat/completions": (p.ChatCompletionRequest, CHAT_TASKS),
    "/v1/completions": (p.CompletionRequest, CHAT_TASKS),
    "/v1/embeddings": (p.EmbeddingRequest, EMBEDDING_TASKS),
}

# Constrained decoding and tools, which the online chat route may take, are not run by the
# batch worker yet: refused per line rather than answered without them.
UNSUPPORTED = ("response_format", "tools", "tool_choice")


def parse(endpoint: str, body: dict[str, Any]) -> Any:
    """The request model of ``body`` (already checked: the runner validated it)."""
    return REQUESTS[endpoint][0].model_validate(body)


def check(endpoint: str, body: dict[str, Any], registry: Registry, tenant: str) -> tuple[Any, ModelVersion]:
    """(the validated request, its model version) or :class:`APIError` as online."""
    model, tasks = REQUESTS[endpoint]
    try:
        req = model.model_validate(body)
    except ValidationError as err:
        message, param = _validation_message(RequestValidationError(err.errors()))
        raise APIError(400, message, param, "invalid_value") from None
    for field in UNSUPPORTED:
        if body.get(field) not in (None, {"type": "text"}):
            raise APIError(400, f"{field}: not supported in a batch yet (the online route takes "
                           "it)", field, "unsupported_parameter")
    if getattr(req, "stream", False):
        raise APIError(400, "stream: a batch answers each request whole; leave stream unset",
                       "stream", "invalid_value")
    try:
        mv = resolve_model(registry.get, req.model, tenant)
    except ModelNotFound as err:
        raise APIError(404, str(err), "model", "model_not_found") from None
    require_task(mv, tasks, endpoint)
    return req, mv


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex[:24]}"


def output_line(custom_id: str, status_code: int, body: dict[str, Any]) -> str:
    """A line of the output (2xx) or error file, OpenAI's shape."""
    return json.dumps({"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": custom_id,
                       "response": {"status_code": status_code, "request_id": new_request_id(),
                                    "body": body},
                       "error": None}, separators=(",", ":"))


def error_line(line: int, custom_id: str, err: APIError) -> str:
    """A failed request: the error body the online route answers, its line in the input
    file (``line``, 1-based) in it and in ``error``."""
    message = f"line {line}: {err.message}"
    body = {"error": {"message": message, "type": error_type(err.status), "param": err.param,
                      "code": err.code, "line": line}}
    out = json.loads(output_line(custom_id, err.status, body))
    out["error"] = {"code": err.code, "message": message, "line": line}
    return json.dumps(out, separators=(",", ":"))
