"""Fine-tuning jobs (``/v1/fine_tuning/jobs``, ``maas jobs``): records, launch, cancel, reconcile.

A job is a database row plus a Ray job (Ray's job submission API) whose driver
runs :mod:`maas_ray.finetune.runner`. The row is the truth clients read; the
runner moves it through OpenAI's lifecycle (validating_files → queued →
running → succeeded | failed | cancelled). Because the Ray job is independent
of the HTTP replica that created it, restarting the Serve app does not touch a
running job; and reading a job reconciles the row with Ray's view, so a driver
that died without saying so (OOM, node lost) shows as failed, not running.
"""

from __future__ import annotations

import logging
import os
import secrets
import shlex
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update

from maas_ray import db, job_secrets, storage
from maas_ray.config.finetune import FineTuneSpec
from maas_ray.finetune.files import FileNotFound, FileStore
from maas_ray.finetune.formats import DataFormatError, FileSummary, check_for_task
from maas_ray.registry import ModelNotFound, Registry
from maas_ray.registry.refs import is_version
from maas_ray.tenancy import DEFAULT_TENANT, owns, resolve_model

logger = logging.getLogger(__name__)

TERMINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("validating_files", "queued", "running")
DASHBOARD_ENV = "MAAS_RAY_DASHBOARD"
SUBMIT_PATIENCE_S = 60.0
GCS_ENV = job_secrets.GCS_ENV  # the cluster a job's driver must join
_ENV_LOCK = threading.Lock()  # RayJobs.client hides a vague RAY_ADDRESS for a moment


class JobNotFound(LookupError):
    """No such job (for this tenant)."""


class JobRejected(ValueError):
    """A job request that cannot run; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class JobConflict(RuntimeError):
    """The request conflicts with the job's state (e.g. cancelling a finished job)."""


def new_job_id() -> str:
    return f"ftjob-{secrets.token_hex(12)}"


def fine_tuned_name(base: str, suffix: str | None, job_id: str) -> str:
    """``ft:{base}:{suffix}:{job_id}``; a versioned base id keeps only its name."""
    base_name = base.rsplit(":", 1)[0] if is_version(base.rsplit(":", 1)[-1]) else base
    base_name = base_name.split(":")[1] if base_name.startswith("ft:") else base_name
    return f"ft:{base_name}:{suffix or 'custom'}:{job_id}"


def method_to_openai(spec: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's ``method`` of a stored spec: ``supervised`` (full), ``lora`` (ours), or
    ``dpo`` (with ``lora`` options inside when it trained adapters)."""
    hp = spec.get("hyperparameters", {})
    lora = spec.get("method", "full") == "lora"
    if spec.get("dpo"):
        options: dict[str, Any] = {"hyperparameters": {**hp, **spec["dpo"]}}
        if lora:
            options["lora"] = spec.get("lora", {})
        return {"type": "dpo", "dpo": options}
    kind = "lora" if lora else "supervised"
    return {"type": kind, kind: {"hyperparameters": hp}}


def job_to_openai(row: db.JobRow) -> dict[str, Any]:
    spec = row.spec
    hp = spec.get("hyperparameters", {})
    return {
        "id": row.id,
        "object": "fine_tuning.job",
        "created_at": row.created_at,
        "finished_at": row.finished_at,
        "model": row.model,
        "fine_tuned_model": row.fine_tuned_model,
        "organization_id": row.tenant,
        "status": row.status,
        "error": row.error,
        "hyperparameters": hp,
        "method": method_to_openai(spec),
        "training_file": row.training_file,
        "validation_file": row.validation_file,
        "result_files": [],
        "trained_tokens": row.trained_tokens,
        "seed": row.seed,
        "user_provided_suffix": row.suffix,
        "estimated_finish": None,
        "integrations": [],
        "metadata": None,
    }


def event_to_openai(row: db.EventRow) -> dict[str, Any]:
    return {"id": f"ftevent-{row.id:012d}", "object": "fine_tuning.job.event",
            "created_at": int(row.created_at), "level": row.level, "type": row.type,
            "message": row.message, "data": row.data or {}}


def checkpoint_to_openai(row: db.CheckpointRow, job: db.JobRow) -> dict[str, Any]:
    return {"id": row.id, "object": "fine_tuning.job.checkpoint", "created_at": row.created_at,
            "fine_tuning_job_id": row.job_id, "step_number": row.step,
            "fine_tuned_model_checkpoint": f"{job.fine_tuned_model or job.id}:ckpt-step-{row.step}",
            "metrics": row.metrics}


def add_event(s: Any, job_id: str, message: str, level: str = "info", type: str = "message",
              data: dict[str, Any] | None = None) -> None:
    s.add(db.EventRow(job_id=job_id, message=message, level=level, type=type, data=data,
                      created_at=time.time()))


def set_status(root: str, job_id: str, status: str, message: str | None = None,
               only_from: tuple[str, ...] = ACTIVE, **fields: Any) -> bool:
    """Move a job to ``status`` if it is still in ``only_from``; False if it was not
    (e.g. a cancel got there first). Terminal states stamp ``finished_at``."""
    if status in TERMINAL:
        fields.setdefault("finished_at", int(time.time()))
    with db.session(root) as s:
        done = s.execute(update(db.JobRow).where(db.JobRow.id == job_id,
                                                 db.JobRow.status.in_(only_from))
                         .values(status=status, **fields)).rowcount
        if done and message:
            add_event(s, job_id, message, level="error" if status == "failed" else "info")
    return bool(done)


@dataclass
class RayJobs:
    """Ray's job submission API, found the way a driver or replica can."""

    address: str | None = None

    def client(self) -> Any:
        from ray.job_submission import JobSubmissionClient

        url = self.dashboard_url()
        # Ray's client lets $RAY_ADDRESS override the address it is given. Where that says
        # only "a Ray on this machine" (`local`, as an embedded `maas up` may run under, and
        # its replicas inherit), the client goes looking for one and, with several Rays on
        # the machine, fails or finds another; the URL found above is this cluster's.
        with _ENV_LOCK:
            vague = os.environ.get("RAY_ADDRESS", "").strip() in ("", "local", "auto")
            hidden = os.environ.pop("RAY_ADDRESS", None) if vague else None
            try:
                return JobSubmissionClient(url)
            finally:
                if hidden is not None:
                    os.environ["RAY_ADDRESS"] = hidden

    def dashboard_url(self) -> str:
        url = self.address or os.environ.get(DASHBOARD_ENV)
        if not url and os.environ.get("RAY_ADDRESS", "").startswith("http"):
            url = os.environ["RAY_ADDRESS"]
        if not url:
            import ray
            from ray._private import ray_constants
            from ray.experimental.internal_kv import _internal_kv_get

            if not ray.is_initialized():
                raise RuntimeError("no Ray dashboard address: pass --address or set "
                                   f"{DASHBOARD_ENV}/RAY_ADDRESS to http://HOST:8265")
            raw = _internal_kv_get(ray_constants.DASHBOARD_ADDRESS,
                                   namespace=ray_constants.KV_NAMESPACE_DASHBOARD)
            if not raw:
                raise RuntimeError("this Ray cluster runs without its dashboard, which Ray's job "
                                   "submission API needs (start Ray with include_dashboard=True)")
            url = raw.decode()
        return url if "://" in url else f"http://{url}"

    def submit(self, job_id: str, root: str, module: str = "maas_ray.finetune.runner") -> str:
        """Run ``python -m {module} {job_id}`` as a Ray job (batches run their own runner)."""
        # Credentials never go into the job's environment, which the dashboard shows:
        # job_env passes them through the GCS (see maas_ray.job_secrets).
        env = {"MAAS_HOME": root, **job_secrets.job_env()}
        import ray

        if ray.is_initialized():
            # Ray hands the driver a RAY_ADDRESS it finds through files and process lists
            # shared by every Ray on the machine, which can name another cluster; say ours.
            env[GCS_ENV] = ray.get_runtime_context().gcs_address
        entrypoint = f"{shlex.quote(sys.executable)} -m {module} {job_id}"
        client = self.client()
        deadline = time.monotonic() + SUBMIT_PATIENCE_S
        while True:
            try:
                # The driver only waits on Ray: it reserves no CPU (Ray's default, said
                # here on purpose), so a small cluster keeps its CPUs for the job's workers.
                return client.submit_job(entrypoint=entrypoint, submission_id=f"maas-{job_id}",
                                         runtime_env={"env_vars": env}, metadata={"maas_job": job_id},
                                         entrypoint_num_cpus=0)
            except RuntimeError as err:
                # A node's job agent registers a few seconds after Ray starts (longer on a busy
                # machine); the job server says so and asks to retry.
                if "No available agent" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def status(self, ray_job_id: str) -> tuple[str | None, str]:
        """(Ray's status name, its message); (None, why) when Ray does not know the job."""
        try:
            info = self.client().get_job_info(ray_job_id)
        except Exception as err:  # noqa: BLE001 - unknown job, or the dashboard is away
            return None, str(err)
        return str(getattr(info.status, "value", info.status)), info.message or ""

    def stop(self, ray_job_id: str) -> None:
        self.client().stop_job(ray_job_id)

    def logs(self, ray_job_id: str) -> str:
        return self.client().get_job_logs(ray_job_id)


class JobService:
    """Fine-tuning jobs of one storage root, scoped to a tenant."""

    def __init__(self, root: str | None = None, ray_jobs: RayJobs | None = None) -> None:
        self.root = storage.storage_root(root)
        self.files = FileStore(self.root)
        self.registry = Registry(self.root)
        self.ray = ray_jobs or RayJobs()

    # -- creating -------------------------------------------------------------
    def create(self, spec: FineTuneSpec, tenant: str = DEFAULT_TENANT, submit: bool = True) -> dict[str, Any]:
        """Check references, record the job, and submit its Ray job (unless ``submit`` is
        False: the caller runs :func:`maas_ray.finetune.runner.run_job` itself)."""
        try:  # another tenant's fine-tuned model is no base: its weights are theirs
            base = resolve_model(self.registry.get, spec.base_model, tenant)
        except ModelNotFound as err:
            raise JobRejected(f"base model: {err}", "model") from None
        if base.card.get("format") == "peft-lora":
            raise JobRejected(f"{base.id} is a LoRA adapter; fine-tune its base model instead",
                              "model")
        if base.task not in ("chat", "embedding", "text-classification"):
            raise JobRejected(f"{base.id} is a {base.task} model, which cannot be fine-tuned "
                              "this way (use a training spec)", "model")
        for param, file_id in (("training_file", spec.training_file),
                               ("validation_file", spec.validation_file)):
            if file_id is None:
                continue
            try:
                f = self.files.get(file_id, tenant)
            except FileNotFound:
                raise JobRejected(f"{param}: no such file: {file_id!r}", param) from None
            if f.data_format:  # validated at upload: its format must suit the model now
                try:
                    check_for_task(FileSummary(f.data_format, f.rows or 0), base.task,  # type: ignore[arg-type]
                                   param.replace("_", " "), spec.dpo is not None)
                except DataFormatError as err:
                    raise JobRejected(str(err), param) from None
        job_id = new_job_id()
        seed = spec.seed if spec.seed is not None else secrets.randbelow(2**31)
        spec = spec.model_copy(update={"seed": seed})
        with db.session(self.root) as s:
            s.add(db.JobRow(id=job_id, tenant=tenant, model=spec.base_model, status="validating_files",
                            spec=spec.model_dump(mode="json"), training_file=spec.training_file,
                            validation_file=spec.validation_file, suffix=spec.suffix, seed=seed))
            s.flush()  # the row first: events reference it
            add_event(s, job_id, f"Created fine-tuning job: {job_id}")
        if submit:
            try:
                ray_job_id = self.ray.submit(job_id, self.root)
            except Exception as err:
                set_status(self.root, job_id, "failed", f"Could not start the Ray job: {err}",
                           error={"code": "launch_failed", "message": str(err), "param": None})
                raise
            with db.session(self.root) as s:
                s.execute(update(db.JobRow).where(db.JobRow.id == job_id).values(ray_job_id=ray_job_id))
        return self.get(job_id, tenant)

    # -- reading --------------------------------------------------------------
    def _row(self, s: Any, job_id: str, tenant: str) -> db.JobRow:
        row = s.get(db.JobRow, job_id)
        if not owns(row, tenant):
            raise JobNotFound(f"no such fine-tuning job: {job_id!r}")
        return row

    def get(self, job_id: str, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        with db.session(self.root) as s:
            row = self._row(s, job_id, tenant)
            status, ray_job_id = row.status, row.ray_job_id
        if status in ACTIVE and ray_job_id:
            self._reconcile(job_id, ray_job_id)
        with db.session(self.root) as s:
            return job_to_openai(self._row(s, job_id, tenant))

    def _reconcile(self, job_id: str, ray_job_id: str) -> None:
        """A job the database calls active whose Ray job has ended ended badly."""
        ray_status, message = self.ray.status(ray_job_id)
        if ray_status is None:
            if "does not exist" in message or "404" in message or "not found" in message.lower():
                set_status(self.root, job_id, "failed", "The Ray job is gone (was the cluster restarted?)",
                           error={"code": "job_lost", "message": "the Ray job is gone", "param": None})
            return  # dashboard unreachable: leave the row as it is
        if ray_status in ("PENDING", "RUNNING"):
            return
        if ray_status == "STOPPED":
            set_status(self.root, job_id, "cancelled", "The Ray job was stopped")
            return
        why = message or f"the Ray job ended ({ray_status}) without reporting a result"
        set_status(self.root, job_id, "failed", f"Job failed: {why}",
                   error={"code": "job_failed", "message": why[-2000:], "param": None})

    def list(self, tenant: str = DEFAULT_TENANT, after: str | None = None, limit: int = 20) -> tuple[list[dict[str, Any]], bool]:
        """Newest first; ``after`` is the last id of the previous page."""
        with db.session(self.root) as s:
            q = select(db.JobRow).where(db.JobRow.tenant == tenant)
            if after:
                anchor = s.get(db.JobRow, after)
                if not owns(anchor, tenant):
                    raise JobNotFound(f"no such fine-tuning job: {after!r}")
                q = q.where((db.JobRow.created_ns < anchor.created_ns) |
                            ((db.JobRow.created_ns == anchor.created_ns) & (db.JobRow.id < anchor.id)))
            q = q.order_by(db.JobRow.created_ns.desc(), db.JobRow.id.desc()).limit(limit + 1)
            rows = list(s.scalars(q))
            ids = [(r.id, r.status, r.ray_job_id) for r in rows[:limit]]
        for job_id, status, ray_job_id in ids:
            if status in ACTIVE and ray_job_id:
                self._reconcile(job_id, ray_job_id)
        with db.session(self.root) as s:
            data = [job_to_openai(s.get(db.JobRow, i)) for i, _, _ in ids]
        return data, len(rows) > limit

    def events(self, job_id: str, tenant: str = DEFAULT_TENANT, after: str | None = None,
               limit: int = 20) -> tuple[list[dict[str, Any]], bool]:
        """Newest first, as OpenAI lists them."""
        with db.session(self.root) as s:
            self._row(s, job_id, tenant)
            q = select(db.EventRow).where(db.EventRow.job_id == job_id)
            if after:
                try:
                    q = q.where(db.EventRow.id < int(after.removeprefix("ftevent-")))
                except ValueError:
                    raise JobRejected(f"after: not an event id: {after!r}", "after") from None
            rows = list(s.scalars(q.order_by(db.EventRow.id.desc()).limit(limit + 1)))
            return [event_to_openai(r) for r in rows[:limit]], len(rows) > limit

    def checkpoints(self, job_id: str, tenant: str = DEFAULT_TENANT, limit: int = 10) -> tuple[list[dict[str, Any]], bool]:
        with db.session(self.root) as s:
            job = self._row(s, job_id, tenant)
            rows = list(s.scalars(select(db.CheckpointRow).where(db.CheckpointRow.job_id == job_id)
                                  .order_by(db.CheckpointRow.step.desc()).limit(limit + 1)))
            return [checkpoint_to_openai(r, job) for r in rows[:limit]], len(rows) > limit

    # -- cancelling -----------------------------------------------------------
    def cancel(self, job_id: str, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        """Mark cancelled first (so the runner never publishes), then stop the Ray job."""
        with db.session(self.root) as s:
            row = self._row(s, job_id, tenant)
            status, ray_job_id = row.status, row.ray_job_id
        if status in TERMINAL or not set_status(self.root, job_id, "cancelled", "Job cancelled by request"):
            raise JobConflict(f"job {job_id} has already {self.get(job_id, tenant)['status']}: "
                              "only a validating, queued or running job can be cancelled")
        if ray_job_id:
            try:
                self.ray.stop(ray_job_id)
            except Exception as err:  # noqa: BLE001 - the runner also watches the row
                logger.warning("could not stop Ray job %s: %s", ray_job_id, err)
        return self.get(job_id, tenant)

    def status_of(self, job_id: str) -> str:
        with db.session(self.root) as s:
            row = s.get(db.JobRow, job_id)
            return row.status if row else "missing"
