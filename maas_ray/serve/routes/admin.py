"""``/v1/admin``: API keys and usage over HTTP, for holders of an admin key.

These routes demand an admin key even when the service runs with auth off (an
open loopback service must not hand out keys to anyone who can reach it). The
first admin key comes from ``maas keys create --admin`` on a machine that can
write the project database. Handlers are plain ``def``: the database calls block.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from maas_ray.auth import ApiKey, AuthError, KeyStore
from maas_ray.auth.keys import DEFAULT_MAX_CONCURRENT
from maas_ray.serve.context import get_context
from maas_ray.serve.errors import APIError, documented
from maas_ray.serve.routes.files import database_errors

router = APIRouter(tags=["admin"], responses=documented(403))


def store() -> KeyStore:
    keys = get_context().keys
    assert keys is not None, "the ingress sets the key store at start-up"
    return keys


def require_admin(request: Request) -> ApiKey:
    """The caller's key, which must be a live admin key (403 for a tenant key)."""
    key: ApiKey | None = getattr(request.state, "api_key", None)  # set by the auth middleware
    if key is None:
        scheme, _, secret = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise APIError(401, "admin routes need an admin key: send 'Authorization: Bearer <key>'",
                           None, "missing_api_key", {"WWW-Authenticate": "Bearer"})
        try:
            key = store().authenticate(secret.strip())
        except AuthError as err:
            raise APIError(401, str(err), None, "invalid_api_key", {"WWW-Authenticate": "Bearer"}) from None
    if not key.admin:
        raise APIError(403, "this route needs an admin key (maas keys create --admin)", None,
                       "admin_key_required")
    return key


Admin = Annotated[ApiKey, Depends(require_admin)]


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(min_length=1, max_length=128, description="Tenant the key acts for.")
    rate: str = Field(default="60/min", max_length=32, description="Request rate limit, N/s|min|hour|day.")
    tokens_per_day: int | None = Field(default=None, ge=1, le=10**15,
                                       description="Prompt+completion tokens per UTC day; null: unlimited.")
    max_concurrent: int = Field(default=DEFAULT_MAX_CONCURRENT, ge=1, le=100_000,
                                description="Requests in flight at once, per ingress replica; more get 429.")
    admin: bool = Field(default=False, description="May manage keys.")


class KeyInfo(BaseModel):
    id: str
    object: str = "api_key"
    tenant: str
    display: str
    rate: str
    tokens_per_day: int | None
    max_concurrent: int
    admin: bool
    created_at: int
    revoked_at: int | None


class KeyCreated(KeyInfo):
    key: str = Field(description="The key itself: shown once, never stored.")


class KeyList(BaseModel):
    object: str = "list"
    data: list[KeyInfo]


class UsageRow(BaseModel):
    day: str
    tenant: str
    key_id: str
    requests: int
    prompt_tokens: int
    completion_tokens: int


class UsageList(BaseModel):
    object: str = "list"
    data: list[UsageRow]


@router.post("/v1/admin/keys", response_model=KeyCreated)
@database_errors
def create_key(body: KeyCreate, _: Admin) -> dict[str, Any]:
    try:
        key, secret = store().create(body.tenant, body.rate, body.tokens_per_day, body.admin,
                                     body.max_concurrent)
    except ValueError as err:
        raise APIError(400, str(err), None, "invalid_value") from None
    return {**key.to_dict(), "key": secret}


@router.get("/v1/admin/keys", response_model=KeyList)
@database_errors
def list_keys(_: Admin, tenant: Annotated[str | None, Query(max_length=128)] = None) -> dict[str, Any]:
    return {"data": [k.to_dict() for k in store().list(tenant)]}


@router.delete("/v1/admin/keys/{key_id}", response_model=KeyInfo, responses=documented(404))
@database_errors
def revoke_key(key_id: str, _: Admin) -> dict[str, Any]:
    try:
        return store().revoke(key_id).to_dict()
    except KeyError:
        raise APIError(404, f"no API key with id {key_id!r}", "key_id", "not_found") from None


@router.get("/v1/admin/usage", response_model=UsageList)
@database_errors
def usage(_: Admin, tenant: Annotated[str | None, Query(max_length=128)] = None,
          day: Annotated[dt.date | None, Query(description="UTC day, YYYY-MM-DD.")] = None) -> dict[str, Any]:
    return {"data": store().usage(tenant, day.isoformat() if day else None)}
