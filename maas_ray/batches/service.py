"""Batches (``/v1/batches``, ``maas batch``): records, launch, cancel, reconcile.

A batch is a database row plus a Ray job whose driver runs
:mod:`maas_ray.batches.runner`, the way a fine-tuning job is (the same
:class:`~maas_ray.finetune.jobs.RayJobs`, the same credentials hand-over). The
row is the truth clients read; the runner moves it through OpenAI's lifecycle
(validating → in_progress → finalizing → completed | failed, or cancelling →
cancelled) and stamps each step's ``*_at``. Reading a batch reconciles the row
with Ray's view, so a driver that died without saying so shows as failed.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

from sqlalchemy import select, update

from maas_ray import db, storage
from maas_ray.finetune.files import FileNotFound, FileStore
from maas_ray.finetune.formats import BATCH_ENDPOINTS
# A batch is a Ray job like a fine-tuning job: the same errors, raised with a batch's words.
from maas_ray.finetune.jobs import JobConflict, JobNotFound, JobRejected, RayJobs
from maas_ray.tenancy import DEFAULT_TENANT, owns

logger = logging.getLogger(__name__)

TERMINAL = ("completed", "failed", "cancelled", "expired")
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
CANCELLABLE = ("validating", "in_progress")
WINDOWS_S = {"24h": 24 * 3600}  # completion_window values OpenAI accepts, in seconds
RUNNER = "maas_ray.batches.runner"


def new_batch_id() -> str:
    return f"batch_{secrets.token_hex(12)}"


def batch_to_openai(row: db.BatchRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "batch",
        "endpoint": row.endpoint,
        "errors": row.errors,
        "input_file_id": row.input_file_id,
        "completion_window": row.completion_window,
        "status": row.status,
        "output_file_id": row.output_file_id,
        "error_file_id": row.error_file_id,
        "created_at": row.created_at,
        "in_progress_at": row.in_progress_at,
        "expires_at": row.created_at + WINDOWS_S[row.completion_window],
        "finalizing_at": row.finalizing_at,
        "completed_at": row.completed_at,
        "failed_at": row.failed_at,
        "expired_at": None,
        "cancelling_at": row.cancelling_at,
        "cancelled_at": row.cancelled_at,
        "request_counts": {"total": row.total, "completed": row.completed, "failed": row.failed},
        "metadata": row.meta,
    }


def set_status(root: str, batch_id: str, status: str, only_from: tuple[str, ...] = ACTIVE,
               **fields: Any) -> bool:
    """Move a batch to ``status`` if it is still in ``only_from``, stamping ``{status}_at``;
    False if it was not (e.g. a cancel got there first)."""
    stamp = f"{status}_at"
    if hasattr(db.BatchRow, stamp):
        fields.setdefault(stamp, int(time.time()))
    with db.session(root) as s:
        done = s.execute(update(db.BatchRow).where(db.BatchRow.id == batch_id,
                                                   db.BatchRow.status.in_(only_from))
                         .values(status=status, **fields)).rowcount
    return bool(done)


def set_counts(root: str, batch_id: str, **counts: int) -> None:
    with db.session(root) as s:
        s.execute(update(db.BatchRow).where(db.BatchRow.id == batch_id).values(**counts))


def status_of(root: str, batch_id: str) -> str:
    with db.session(root) as s:
        row = s.get(db.BatchRow, batch_id)
        return row.status if row else "missing"


class BatchService:
    """Batches of one storage root, scoped to a tenant."""

    def __init__(self, root: str | None = None, ray_jobs: RayJobs | None = None) -> None:
        self.root = storage.storage_root(root)
        self.files = FileStore(self.root)
        self.ray = ray_jobs or RayJobs()

    def create(self, input_file_id: str, endpoint: str, completion_window: str = "24h",
               metadata: dict[str, str] | None = None, spec: dict[str, Any] | None = None,
               tenant: str = DEFAULT_TENANT, submit: bool = True) -> dict[str, Any]:
        """Check the input file, record the batch, and submit its Ray job (unless ``submit``
        is False: the caller runs :func:`maas_ray.batches.runner.run_batch` itself).
        ``spec``: how it runs (``AppArgs.batches`` and the LLM engine choice)."""
        if endpoint not in BATCH_ENDPOINTS:
            raise JobRejected(f"endpoint must be one of {list(BATCH_ENDPOINTS)} (got {endpoint!r})",
                                "endpoint")
        if completion_window not in WINDOWS_S:
            raise JobRejected(f"completion_window must be one of {list(WINDOWS_S)} "
                                f"(got {completion_window!r})", "completion_window")
        try:
            f = self.files.get(input_file_id, tenant)
        except FileNotFound:
            raise JobRejected(f"input_file_id: no such file: {input_file_id!r}", "input_file_id") from None
        if f.purpose != "batch":
            raise JobRejected(f"input_file_id: file {input_file_id} was uploaded with purpose "
                                f"{f.purpose!r}; a batch reads files uploaded with purpose 'batch'",
                                "input_file_id")
        if f.data_format != endpoint:  # validated at upload: every line names one url
            raise JobRejected(f"input_file_id: the requests in {input_file_id} are for "
                                f"{f.data_format}, not for the batch's endpoint {endpoint}", "endpoint")
        batch_id = new_batch_id()
        with db.session(self.root) as s:
            s.add(db.BatchRow(id=batch_id, tenant=tenant, status="validating", endpoint=endpoint,
                              input_file_id=input_file_id, completion_window=completion_window,
                              spec=spec or {}, meta=metadata, total=f.rows or 0))
        if submit:
            try:
                ray_job_id = self.ray.submit(batch_id, self.root, module=RUNNER)
            except Exception as err:
                set_status(self.root, batch_id, "failed", errors=errors_list(
                    "launch_failed", f"could not start the batch's Ray job: {err}"))
                raise
            with db.session(self.root) as s:
                s.execute(update(db.BatchRow).where(db.BatchRow.id == batch_id)
                          .values(ray_job_id=ray_job_id))
        return self.get(batch_id, tenant)

    def _row(self, s: Any, batch_id: str, tenant: str) -> db.BatchRow:
        row = s.get(db.BatchRow, batch_id)
        if not owns(row, tenant):
            raise JobNotFound(f"no such batch: {batch_id!r}")
        return row

    def get(self, batch_id: str, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        with db.session(self.root) as s:
            row = self._row(s, batch_id, tenant)
            status, ray_job_id = row.status, row.ray_job_id
        if status in ACTIVE and ray_job_id:
            self._reconcile(batch_id, ray_job_id)
        with db.session(self.root) as s:
            return batch_to_openai(self._row(s, batch_id, tenant))

    def _reconcile(self, batch_id: str, ray_job_id: str) -> None:
        """A batch the database calls active whose Ray job has ended ended badly (or, if it
        was being cancelled, is cancelled)."""
        ray_status, message = self.ray.status(ray_job_id)
        if ray_status in (None, "PENDING", "RUNNING"):
            if ray_status is None and ("does not exist" in message or "404" in message):
                set_status(self.root, batch_id, "failed", errors=errors_list(
                    "job_lost", "the batch's Ray job is gone (was the cluster restarted?)"))
            return
        if set_status(self.root, batch_id, "cancelled", only_from=("cancelling",)):
            return
        why = message or f"the Ray job ended ({ray_status}) without reporting a result"
        set_status(self.root, batch_id, "failed", errors=errors_list("batch_failed", why[-2000:]))

    def list(self, tenant: str = DEFAULT_TENANT, after: str | None = None,
             limit: int = 20) -> tuple[list[dict[str, Any]], bool]:
        """Newest first; ``after`` is the last id of the previous page."""
        with db.session(self.root) as s:
            q = select(db.BatchRow).where(db.BatchRow.tenant == tenant)
            if after:
                anchor = self._row(s, after, tenant)
                q = q.where((db.BatchRow.created_ns < anchor.created_ns) |
                            ((db.BatchRow.created_ns == anchor.created_ns) & (db.BatchRow.id < anchor.id)))
            q = q.order_by(db.BatchRow.created_ns.desc(), db.BatchRow.id.desc()).limit(limit + 1)
            rows = list(s.scalars(q))
            ids = [(r.id, r.status, r.ray_job_id) for r in rows[:limit]]
        for batch_id, status, ray_job_id in ids:
            if status in ACTIVE and ray_job_id:
                self._reconcile(batch_id, ray_job_id)
        with db.session(self.root) as s:
            data = [batch_to_openai(s.get(db.BatchRow, i)) for i, _, _ in ids]
        return data, len(rows) > limit

    def cancel(self, batch_id: str, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        """Mark the batch cancelling; its runner stops within about a second, writes what
        finished into the output and error files and marks it cancelled."""
        with db.session(self.root) as s:
            self._row(s, batch_id, tenant)
        if not set_status(self.root, batch_id, "cancelling", only_from=CANCELLABLE):
            status = self.get(batch_id, tenant)["status"]
            if status in ("cancelling", "cancelled"):
                return self.get(batch_id, tenant)  # asking twice is no error
            raise JobConflict(f"batch {batch_id} is {status}: only a validating or "
                                "in-progress batch can be cancelled")
        return self.get(batch_id, tenant)


def errors_list(code: str, message: str, line: int | None = None) -> dict[str, Any]:
    """OpenAI's batch ``errors`` object (why a whole batch failed)."""
    return {"object": "list", "data": [{"code": code, "message": message, "param": None, "line": line}]}
