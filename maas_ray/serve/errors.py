"""The one place where exceptions become HTTP error bodies.

Inner code raises ordinary exceptions (``ModelNotFound``, ``ValueError``...).
Here they turn into OpenAI's ``{"error": {"message", "type", "param", "code"}}``
on ``/v1`` routes and the Open Inference Protocol's ``{"error": "..."}`` on
``/v2`` routes, always with a 4xx status for bad input.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from maas_ray.registry import InvalidModelName, ModelNotFound

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 409: "conflict_error",
          413: "request_too_large", 429: "rate_limit_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error with the status and fields the client should see."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def error_response(request: Request, err: APIError) -> JSONResponse:
    # Under a route prefix (a RayService route_prefix, a second app) the path carries it.
    path = request.url.path.removeprefix(request.scope.get("root_path", "") or "")
    if path.startswith("/v2"):
        body: dict = {"error": err.message}
    else:
        body = {"error": {"message": err.message, "type": _TYPES.get(err.status, "api_error"),
                          "param": err.param, "code": err.code}}
    return JSONResponse(body, status_code=err.status, headers=err.headers)


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


def install_error_handlers(app: FastAPI) -> None:
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
