"""The one place where exceptions become HTTP error bodies.

Inner code raises ordinary exceptions (``ModelNotFound``, ``ValueError``...).
Here they turn into OpenAI's ``{"error": {"message", "type", "param", "code"}}``
on ``/v1`` routes and the Open Inference Protocol's ``{"error": "..."}`` on
``/v2`` routes, always with a 4xx status for bad input. The same bodies are
declared in the OpenAPI schema (:func:`documented`), so clients and fuzzers can
check every answer against it.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from maas_ray.registry import InvalidModelName, ModelNotFound

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error", 409: "conflict_error",
          413: "request_too_large", 429: "rate_limit_error", 503: "service_unavailable"}


def error_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status."""
    return _TYPES.get(status, "api_error")


class OpenAIErrorDetail(BaseModel):
    message: str = Field(description="What went wrong, naming the field or resource and how to fix it.")
    type: str = Field(description="invalid_request_error, not_found_error, rate_limit_error, ...")
    param: str | None = Field(default=None, description="The request field at fault, if one is.")
    code: str | None = Field(default=None, description="A machine-readable reason, e.g. model_not_found.")


class OpenAIError(BaseModel):
    """OpenAI's error body, on ``/v1`` routes."""

    error: OpenAIErrorDetail


class OIPError(BaseModel):
    """The Open Inference Protocol's error body, on ``/v2`` routes."""

    error: str


_WHY = {400: "Invalid request: the message names the field and what was expected.",
        401: "Missing, wrong or revoked API key.",
        403: "The key may not use this route.",
        404: "No such model, file or job (or it belongs to another tenant).",
        409: "The resource is in a state that does not allow this.",
        413: "The request body is over the size limit.",
        429: "Over the key's rate limit or token budget; retry after Retry-After seconds.",
        503: "Overloaded, or a model replica or the database is unavailable; retry after Retry-After seconds."}
# What any /v1 or /v2 route can answer, whatever it does: the middleware's auth, size
# limit, rate limit and back-pressure. Declared on every such route by the app's schema.
COMMON = (401, 413, 429, 503)


def documented(*statuses: int, oip: bool = False) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: the error statuses it raises itself, with their body."""
    model = OIPError if oip else OpenAIError
    return {status: {"model": model, "description": _WHY[status]} for status in statuses}


class APIError(Exception):
    """An error with the status and fields the client should see.

    Model replicas return (or yield) one as a value for input their model cannot take; it
    pickles whole across the Ray hop, and the ingress raises it."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def __reduce__(self) -> tuple[Any, ...]:  # Exception pickles only args=(message,)
        return APIError, (self.status, self.message, self.param, self.code, self.headers)


def error_body(path: str, status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """The error body for a route: OpenAI's on ``/v1`` (and elsewhere), the Open Inference
    Protocol's on ``/v2``. Every error answer is written from this, routes and middleware."""
    if path.startswith("/v2"):
        return {"error": message}
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_response(request: Request, err: APIError) -> JSONResponse:
    # Under a route prefix (a RayService route_prefix, a second app) the path carries it.
    path = request.url.path.removeprefix(request.scope.get("root_path", "") or "")
    return JSONResponse(error_body(path, err.status, err.message, err.param, err.code),
                        status_code=err.status, headers=err.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{param or 'body'}: {first['msg']}{more}", param


def _documented_errors(app: FastAPI) -> Any:
    """The app's ``openapi()``, declaring the errors no route states itself: ``COMMON``
    on every ``/v1`` and ``/v2`` route, and 400 (not FastAPI's 422, see ``_invalid``
    below) wherever FastAPI validates input."""
    default = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = default()  # cached on the app: edited in place, once
            for path, operations in schema["paths"].items():
                if not path.startswith(("/v1", "/v2")):
                    continue
                ref = {"$ref": "#/components/schemas/" + ("OIPError" if path.startswith("/v2") else "OpenAIError")}
                for operation in operations.values():
                    responses = operation.setdefault("responses", {})
                    validated = responses.pop("422", None) is not None
                    for status in (400,) * validated + COMMON:
                        responses.setdefault(str(status), {
                            "description": _WHY[status], "content": {"application/json": {"schema": ref}}})
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            for model in (OpenAIError, OIPError):
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
        return app.openapi_schema

    return openapi


def install_error_handlers(app: FastAPI) -> None:
    app.openapi = _documented_errors(app)  # type: ignore[method-assign]

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(request, APIError(400, message, param, "invalid_value"))

    @app.exception_handler(ModelNotFound)
    async def _missing(request: Request, exc: ModelNotFound) -> JSONResponse:
        return error_response(request, APIError(404, str(exc), "model", "model_not_found"))

    @app.exception_handler(InvalidModelName)
    async def _bad_name(request: Request, exc: InvalidModelName) -> JSONResponse:
        return error_response(request, APIError(400, str(exc), "model", "invalid_model"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(request, APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(request, APIError(500, "internal error; see the server log"))
