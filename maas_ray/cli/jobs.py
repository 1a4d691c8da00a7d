"""``maas jobs``: fine-tuning jobs from the terminal, and ``maas train finetune.yaml``.

The same records as ``/v1/fine_tuning/jobs`` (the project database under the
storage root), so a job started over HTTP shows up here and vice versa.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from maas_ray.cli.common import AddressOpt, StorageOpt, console, err_console, user_errors
from maas_ray.config.finetune import FineTuneSpec

app = typer.Typer(help="Fine-tuning jobs: list, inspect, follow, cancel.", no_args_is_help=True)

# Fine-tuning jobs' statuses and batches' (maas batch) alike.
_STATUS_STYLE = {"succeeded": "green", "completed": "green", "failed": "red", "cancelled": "yellow",
                 "cancelling": "yellow", "running": "cyan", "in_progress": "cyan", "finalizing": "cyan"}


def _when(ts: int | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _service(storage: str | None, address: str | None = None) -> Any:
    from maas_ray.finetune.jobs import JobService, RayJobs

    dashboard = address if address and address.startswith("http") else None
    return JobService(storage, RayJobs(dashboard))


def _status(status: str) -> str:
    style = _STATUS_STYLE.get(status)
    return f"[{style}]{status}[/]" if style else status


@app.command("ls")
@user_errors
def ls(storage: StorageOpt = None,
       limit: Annotated[int, typer.Option(help="Most jobs to list (newest first).")] = 20) -> None:
    """List fine-tuning jobs, newest first."""
    jobs, more = _service(storage).list(limit=limit)
    table = Table(title="fine-tuning jobs")
    table.add_column("id", no_wrap=True)  # ids are what users copy: never cut them
    for column in ("base model", "status", "fine-tuned model", "created", "finished"):
        table.add_column(column, overflow="fold")
    for job in jobs:
        table.add_row(job["id"], job["model"], _status(job["status"]), job["fine_tuned_model"] or "-",
                      _when(job["created_at"]), _when(job["finished_at"]))
    console.print(table)
    if more:
        console.print(f"(more: --limit {limit * 2})")


@app.command()
@user_errors
def show(job_id: Annotated[str, typer.Argument(help="ftjob-...")], storage: StorageOpt = None) -> None:
    """A job's details, its last events and its checkpoints."""
    from maas_ray.finetune.jobs import JobNotFound

    service = _service(storage)
    try:
        job = service.get(job_id)
    except JobNotFound as err:
        raise FileNotFoundError(str(err)) from None
    table = Table(show_header=False, title=job_id)
    for key in ("status", "model", "fine_tuned_model", "training_file", "validation_file", "seed",
                "trained_tokens"):
        table.add_row(key, _status(str(job[key])) if key == "status" else str(job[key]))
    table.add_row("method", job["method"]["type"])
    table.add_row("hyperparameters", ", ".join(f"{k}={v}" for k, v in job["hyperparameters"].items()))
    table.add_row("created", _when(job["created_at"]))
    table.add_row("finished", _when(job["finished_at"]))
    if job["error"]:
        table.add_row("error", f"[red]{job['error']['message']}[/]")
    console.print(table)
    events, _ = service.events(job_id, limit=10)
    for event in reversed(events):
        console.print(f"{_when(event['created_at'])}  {event['message']}", highlight=False)
    checkpoints, _ = service.checkpoints(job_id)
    for ckpt in checkpoints:
        console.print(f"checkpoint step {ckpt['step_number']}: {ckpt['metrics']}", highlight=False)


@app.command()
@user_errors
def cancel(job_id: Annotated[str, typer.Argument(help="ftjob-...")], storage: StorageOpt = None,
           address: AddressOpt = None) -> None:
    """Cancel a job: it stops within seconds and publishes nothing.

    With --address http://HOST:8265 (the Ray dashboard) its Ray job is also stopped
    at once; without, the job's driver sees the cancel in its database row.
    """
    from maas_ray.finetune.jobs import JobConflict, JobNotFound

    try:
        job = _service(storage, address).cancel(job_id)
    except (JobNotFound, JobConflict) as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False)
        raise typer.Exit(2) from None
    console.print(f"{job_id}: {_status(job['status'])}")


@app.command()
@user_errors
def logs(job_id: Annotated[str, typer.Argument(help="ftjob-...")], storage: StorageOpt = None,
         address: AddressOpt = None,
         ray_logs: Annotated[bool, typer.Option("--ray", help="Print the Ray job's driver log "
                                                "instead (needs the dashboard: --address http://...).")] = False) -> None:
    """A job's events, oldest first (or its Ray driver log with --ray)."""
    from maas_ray.finetune.jobs import JobNotFound

    service = _service(storage, address)
    try:
        job = service.get(job_id)
    except JobNotFound as err:
        raise FileNotFoundError(str(err)) from None
    if ray_logs:
        from maas_ray import db

        with db.session(service.root) as s:
            ray_job_id = s.get(db.JobRow, job_id).ray_job_id
        if not ray_job_id:
            raise FileNotFoundError(f"{job_id} ran in the foreground (maas train): it has no Ray job log")
        console.print(service.ray.logs(ray_job_id), markup=False, highlight=False)
        return
    events: list[dict[str, Any]] = []
    after = None
    while True:
        page, more = service.events(job_id, after=after, limit=1000)
        events += page
        if not more:
            break
        after = page[-1]["id"]
    for event in reversed(events):
        console.print(f"{_when(event['created_at'])}  {event['level']:5}  {event['message']}",
                      highlight=False, markup=False)
    console.print(f"status: {_status(job['status'])}")


def run_finetune_spec(spec: FineTuneSpec, storage: str | None, address: str | None, detach: bool) -> None:
    """``maas train finetune.yaml``: upload local data, record the job, run it here
    (with a progress bar) or, with ``detach``, as a Ray job on the cluster."""
    from maas_ray.finetune.files import FileStore
    from maas_ray.finetune.jobs import JobRejected
    from maas_ray.finetune.runner import run_job
    from maas_ray.runtime import ray_session

    files = FileStore(storage)
    update = {}
    for key in ("training_file", "validation_file"):
        value = getattr(spec, key)
        if value and not value.startswith("file-"):
            path = Path(value)
            if "://" in value or not path.is_file():
                raise FileNotFoundError(f"{key}: {value} is not a local file or an uploaded file id")
            with path.open("rb") as fh:  # streamed: FileStore.create reads it in chunks
                update[key] = files.create(path.name, fh, "fine-tune").id
    spec = spec.model_copy(update=update)
    service = _service(storage, address)
    with ray_session(address):
        try:
            job = service.create(spec, submit=detach)
        except JobRejected as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False)
            raise typer.Exit(2) from None
        how = f"{spec.method}, DPO beta {spec.dpo.beta}" if spec.dpo else spec.method
        console.print(f"fine-tuning job {job['id']} ({spec.base_model}, {how})")
        if detach:
            console.print(f"submitted as a Ray job; follow it with: maas jobs logs {job['id']}")
            return
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total} steps"), TextColumn("{task.fields[loss]}"),
                      TimeElapsedColumn(), console=console, disable=not console.is_terminal) as bar:
            task = bar.add_task(f"fine-tuning {spec.base_model}", total=None, loss="")

            def on_progress(event: dict[str, Any]) -> None:
                loss = f"loss {event['train_loss']:.4f}"
                if "valid_loss" in event:
                    loss += f"  val {event['valid_loss']:.4f}"
                bar.update(task, completed=event["step"], total=event["total_steps"], loss=loss)

            code = run_job(job["id"], storage, progress=on_progress)
    job = service.get(job["id"])
    if job["status"] != "succeeded":
        message = (job["error"] or {}).get("message", job["status"])
        err_console.print(f"[bold red]fine-tuning {job['status']}:[/] {message}", highlight=False)
        raise typer.Exit(2 if job["status"] == "failed" and "invalid" in str(job["error"]) else max(code, 1))
    console.print(f"published [bold]{job['fine_tuned_model']}[/]")
