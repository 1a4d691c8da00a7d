"""``/v1/files``: OpenAI's file API, for fine-tuning data and batches (their input and results).

Handlers are plain ``def``: the database and storage calls block, so FastAPI
runs them in its thread pool instead of on the replica's event loop. The upload
is the exception: it reads the body as it streams (:mod:`maas_ray.serve.uploads`)
and hands each chunk's blocking work to a thread.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from maas_ray import db
from maas_ray.batches.service import ACTIVE as BATCH_ACTIVE
from maas_ray.finetune.files import FileNotFound, FileRejected, FileStore
from maas_ray.finetune.jobs import ACTIVE
from maas_ray.serve.context import get_context, tenant_of
from maas_ray.serve.errors import APIError, documented
from maas_ray.serve.uploads import OPENAPI_BODY, FormUpload

router = APIRouter(tags=["files"])


def files() -> FileStore:
    return get_context().files


def not_found(err: LookupError, param: str = "file_id") -> APIError:
    return APIError(404, str(err).strip("'\""), param, "not_found")


def database_errors(fn: Any) -> Any:
    """A service whose database cannot be reached answers 503, never 500."""
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return await fn(*args, **kwargs)
            except db.DatabaseConfigError as err:
                raise APIError(503, str(err), None, "database_unavailable") from None
        return run

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except db.DatabaseConfigError as err:
            raise APIError(503, str(err), None, "database_unavailable") from None
    return wrapper


@router.post("/v1/files", openapi_extra=OPENAPI_BODY, responses=documented(400))
@database_errors
async def upload_file(request: Request) -> dict[str, Any]:
    """Streams the file to storage, validating fine-tune JSONL line by line as it arrives."""
    try:
        form = FormUpload(request.headers.get("content-type"), files(), tenant_of(request))
    except FileRejected as err:
        raise APIError(400, str(err), "file", "invalid_file") from None
    rejected: FileRejected | None = None
    try:
        async for chunk in request.stream():
            if rejected is None and chunk:
                try:
                    await asyncio.to_thread(form.write, chunk)
                except FileRejected as err:
                    rejected = err  # read the rest unprocessed, so the client gets the answer
        if rejected is None:
            stored = await asyncio.to_thread(form.finish)
    except FileRejected as err:
        rejected = err
    except BaseException:  # over the size limit, client gone: leave nothing behind
        await asyncio.to_thread(form.abort)
        raise
    if rejected is not None:
        await asyncio.to_thread(form.abort)
        raise APIError(400, str(rejected), rejected.param, "invalid_file")
    return stored.to_openai()


@router.get("/v1/files")
@database_errors
def list_files(request: Request, purpose: str | None = None,
               limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
               after: str | None = None, order: Literal["asc", "desc"] = "desc") -> dict[str, Any]:
    rows = files().list(tenant_of(request), purpose, limit + 1, after, order)
    data = [f.to_openai() for f in rows[:limit]]
    return {"object": "list", "data": data, "has_more": len(rows) > limit,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


@router.get("/v1/files/{file_id}", responses=documented(404))
@database_errors
def get_file(request: Request, file_id: str) -> dict[str, Any]:
    try:
        return files().get(file_id, tenant_of(request)).to_openai()
    except FileNotFound as err:
        raise not_found(err) from None


@router.get("/v1/files/{file_id}/content", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}}}, **documented(404)})
@database_errors
def file_content(request: Request, file_id: str) -> StreamingResponse:
    try:
        chunks = files().open(file_id, tenant_of(request))
    except FileNotFound as err:
        raise not_found(err) from None
    return StreamingResponse(chunks, media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}", responses=documented(404, 409))
@database_errors
def delete_file(request: Request, file_id: str) -> dict[str, Any]:
    tenant = tenant_of(request)
    store = files()
    try:
        store.get(file_id, tenant)
    except FileNotFound as err:
        raise not_found(err) from None
    with db.session(store.root) as s:  # data a running job still reads is not lost
        busy = s.scalars(select(db.JobRow.id).where(
            db.JobRow.status.in_(ACTIVE),
            (db.JobRow.training_file == file_id) | (db.JobRow.validation_file == file_id))).first()
        busy = busy and f"fine-tuning job {busy}"
        batch = s.scalars(select(db.BatchRow.id).where(
            db.BatchRow.status.in_(BATCH_ACTIVE), db.BatchRow.input_file_id == file_id)).first()
        busy = busy or (batch and f"batch {batch}")
    if busy:
        raise APIError(409, f"file {file_id} is in use by {busy}; "
                       "cancel it or wait for it to finish", "file_id", "file_in_use")
    try:
        store.delete(file_id, tenant)
    except FileNotFound as err:
        raise not_found(err) from None
    return {"id": file_id, "object": "file", "deleted": True}
