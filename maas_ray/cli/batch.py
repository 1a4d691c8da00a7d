"""``maas batch``: the Batch API from the terminal.

A batch is a JSONL file of requests to one endpoint, one per line::

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}],
              "max_tokens": 32, "temperature": 0}}

``maas batch create requests.jsonl`` uploads it and starts it as a Ray job on the cluster;
``maas batch get ID`` shows its progress and ``--output results.jsonl`` saves its answers.
The same records as ``/v1/batches`` (the project database under the storage root), so a
batch created over HTTP shows up here and vice versa.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from maas_ray.cli.common import AddressOpt, StorageOpt, console, err_console, user_errors
from maas_ray.cli.jobs import _status, _when

HELP = """Batch API: run a JSONL file of requests as a Ray job, offline,
on the same engines as the online service.

Each line is one request to one endpoint (chat, completions, embeddings):

  {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
   "body": {"model": "smollm2-135m-instruct", "max_tokens": 32,
            "messages": [{"role": "user", "content": "Hi"}]}}

  maas batch create requests.jsonl   upload, check each line, start it
  maas batch list                    batches, newest first, with progress
  maas batch get ID --output answers.jsonl --errors errors.jsonl
  maas batch cancel ID               stop it; answers so far are kept

Answers are OpenAI's batch output lines ({"custom_id", "response":
{"status_code", "body"}}); failed requests go to the error file with
their line number. Over HTTP: /v1/batches (the openai SDK's batches).
"""

app = typer.Typer(help=HELP, no_args_is_help=True, rich_markup_mode=None)

def _service(storage: str | None, address: str | None = None) -> Any:
    from maas_ray.batches.service import BatchService
    from maas_ray.finetune.jobs import RayJobs

    dashboard = address if address and address.startswith("http") else None
    return BatchService(storage, RayJobs(dashboard))


def _counts(batch: dict[str, Any]) -> str:
    c = batch["request_counts"]
    return f"{c['completed']}/{c['total']} done, {c['failed']} failed"


def _fail(err: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {err}", highlight=False)
    raise typer.Exit(2) from None


@app.command()
@user_errors
def create(
    requests: Annotated[Path, typer.Argument(help="JSONL file of requests (or an uploaded file id, "
                                             "file-...).", exists=False)],
    endpoint: Annotated[str | None, typer.Option(help="/v1/chat/completions, /v1/completions or "
                                                  "/v1/embeddings (default: the lines' url).")] = None,
    storage: StorageOpt = None,
    address: AddressOpt = None,
) -> None:
    """Upload a JSONL file of requests and run it as a batch.

    With --address the batch is a Ray job on that cluster (follow it with
    maas batch get); without, it runs here on a local Ray until it ends.
    Lines are checked as the file uploads: a bad line stops here, with
    its line number. Each request's body is checked as the batch runs;
    a bad one goes to the batch's error file alone.
    """
    from maas_ray.finetune.jobs import JobRejected
    from maas_ray.finetune.files import FileRejected, FileStore
    from maas_ray.runtime import ray_session

    files = FileStore(storage)
    if str(requests).startswith("file-"):
        stored = files.get(str(requests))
    else:
        if not requests.is_file():
            raise FileNotFoundError(f"{requests} is not a file or an uploaded file id")
        try:
            with requests.open("rb") as fh:  # streamed and validated line by line
                stored = files.create(requests.name, fh, "batch")
        except FileRejected as err:
            _fail(err)
    service = _service(storage, address)
    detach = address is not None  # a cluster outlives this command; an embedded Ray does not
    with ray_session(address):
        try:
            batch = service.create(stored.id, endpoint or str(stored.data_format), submit=detach)
        except JobRejected as err:
            _fail(err)
        console.print(f"batch {batch['id']} ({stored.rows} requests to {batch['endpoint']})")
        if detach:
            console.print(f"submitted as a Ray job; follow it with: maas batch get {batch['id']}")
            return
        from maas_ray.batches.runner import run_batch

        with console.status("running the batch on the local Ray"):
            run_batch(batch["id"], service.root)
    get(batch["id"], storage)


@app.command("list")
@user_errors
def list_(storage: StorageOpt = None,
          limit: Annotated[int, typer.Option(help="Most batches to list (newest first).")] = 20) -> None:
    """List batches, newest first."""
    batches, more = _service(storage).list(limit=limit)
    table = Table(title="batches")
    table.add_column("id", no_wrap=True)  # ids are what users copy: never cut them
    for column in ("endpoint", "status", "requests", "created", "finished"):
        table.add_column(column, overflow="fold")
    for b in batches:
        finished = b["completed_at"] or b["failed_at"] or b["cancelled_at"]
        table.add_row(b["id"], b["endpoint"], _status(b["status"]), _counts(b), _when(b["created_at"]),
                      _when(finished))
    console.print(table)
    if more:
        console.print(f"(more: --limit {limit * 2})")


@app.command()
@user_errors
def get(batch_id: Annotated[str, typer.Argument(help="batch_...")], storage: StorageOpt = None,
        output: Annotated[Path | None, typer.Option(help="Save the output file's lines (the "
                                                    "answers) here.")] = None,
        errors: Annotated[Path | None, typer.Option(help="Save the error file's lines (failed "
                                                    "requests, with their line numbers) here.")] = None) -> None:
    """A batch's status, counts and files; --output/--errors save its results."""
    from maas_ray.finetune.jobs import JobNotFound
    from maas_ray.finetune.files import FileStore

    service = _service(storage)
    try:
        batch = service.get(batch_id)
    except JobNotFound as err:
        raise FileNotFoundError(str(err)) from None
    table = Table(show_header=False, title=batch_id)
    table.add_row("status", _status(batch["status"]))
    for key in ("endpoint", "input_file_id", "output_file_id", "error_file_id"):
        table.add_row(key, str(batch[key] or "-"))
    table.add_row("requests", _counts(batch))
    for key in ("created_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at",
                "cancelling_at", "cancelled_at"):
        if batch[key]:
            table.add_row(key.removesuffix("_at"), _when(batch[key]))
    for error in (batch["errors"] or {}).get("data", []):
        table.add_row("error", f"[red]{error['message']}[/]")
    console.print(table)
    files = FileStore(service.root)
    for path, key in ((output, "output_file_id"), (errors, "error_file_id")):
        if path is None:
            continue
        if not batch[key]:
            raise FileNotFoundError(f"{batch_id} has no {key.removesuffix('_id').replace('_', ' ')} "
                                    f"(status {batch['status']})")
        with path.open("wb") as fh:
            for chunk in files.open(batch[key]):
                fh.write(chunk)
        console.print(f"saved {key.removesuffix('_file_id')} lines to {path}")


@app.command()
@user_errors
def cancel(batch_id: Annotated[str, typer.Argument(help="batch_...")], storage: StorageOpt = None) -> None:
    """Cancel a batch: it stops within seconds; answers already made are kept in its files."""
    from maas_ray.finetune.jobs import JobConflict, JobNotFound

    try:
        batch = _service(storage).cancel(batch_id)
    except (JobNotFound, JobConflict) as err:
        _fail(err)
    console.print(f"{batch_id}: {_status(batch['status'])}")
