"""The driver of one batch: ``python -m maas_ray.batches.runner BATCH_ID``.

Runs as a Ray job (submitted by :class:`~maas_ray.batches.service.BatchService`).

1. **validating**: streams the input file once, checking each line's request as
   the online route would (:func:`maas_ray.batches.requests.check`); a bad one goes
   straight to the error file with its line number, a good one to a work file of
   validated requests (one JSON line each, with its line number and resolved model).
2. **in_progress**: Ray Data reads the work file and maps it through
   :class:`~maas_ray.batches.worker.BatchWorker` actors (an ``ActorPoolStrategy``);
   results stream back here, in input order, into the output and error files as they
   arrive, with ``request_counts`` updated about once a second.
3. **finalizing** → **completed**: the files are committed (listed) and named on the
   row. A cancel (the row turning ``cancelling``) stops the actors within about a
   second; what finished is kept, and the batch ends ``cancelled``.

Memory stays bounded whatever the file's size: lines stream in and results stream out.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from maas_ray import db, storage
from maas_ray.batches import requests
from maas_ray.batches.service import errors_list, set_counts, set_status, status_of
from maas_ray.finetune.files import FileStore, Upload
from maas_ray.registry import Registry
from maas_ray.serve.errors import APIError

logger = logging.getLogger(__name__)

COUNTS_EVERY_S = 1.0


class _Results:
    """The output and error files being written, and the counts so far."""

    def __init__(self, files: FileStore, batch_id: str, tenant: str) -> None:
        self.out = files.output(f"{batch_id}_output.jsonl", "batch_output", tenant)
        self.err = files.output(f"{batch_id}_error.jsonl", "batch_output", tenant)
        self.completed = self.failed = 0

    def ok(self, line: str) -> None:
        self.out.write(line.encode() + b"\n")
        self.completed += 1

    def error(self, line: str) -> None:
        self.err.write(line.encode() + b"\n")
        self.failed += 1

    def commit(self) -> dict[str, Any]:
        """List the files that have lines; an empty one is dropped (its id stays None)."""
        ids = {}
        for key, upload, n in (("output_file_id", self.out, self.completed),
                               ("error_file_id", self.err, self.failed)):
            if n:
                ids[key] = upload.commit().id
            else:
                upload.abort()
        return ids

    def abort(self) -> None:
        self.out.abort()
        self.err.abort()


def run_batch(batch_id: str, root: str | None = None) -> int:
    """Run a recorded batch to its end; returns a process exit code."""
    root = storage.storage_root(root)
    with db.session(root) as s:
        row = s.get(db.BatchRow, batch_id)
        if row is None:
            print(f"no such batch {batch_id}", file=sys.stderr)
            return 2
        tenant, endpoint, file_id, spec = row.tenant, row.endpoint, row.input_file_id, dict(row.spec)
    files = FileStore(root)
    results = _Results(files, batch_id, tenant)
    work = storage.join(root, "batches", batch_id, "requests.jsonl")
    try:
        good = _validate(files, Registry(root), file_id, endpoint, tenant, work, results)
        total = good + results.failed
        if set_status(root, batch_id, "in_progress", only_from=("validating",), total=total,
                      failed=results.failed):
            if good:
                _run(root, batch_id, endpoint, spec, work, results)
        if set_status(root, batch_id, "finalizing", only_from=("in_progress",),
                      completed=results.completed, failed=results.failed):
            ids = results.commit()
            set_status(root, batch_id, "completed", only_from=("finalizing",), **ids)
        else:  # cancelled meanwhile: keep what finished
            ids = results.commit()
            set_status(root, batch_id, "cancelled", only_from=("cancelling",), completed=results.completed,
                       failed=results.failed, **ids)
    except Exception as err:  # noqa: BLE001 - recorded on the batch, not lost in a log
        logger.exception("batch %s failed", batch_id)
        results.abort()
        set_status(root, batch_id, "failed", errors=errors_list(
            "batch_failed", f"{type(err).__name__}: {err}"[:2000]))
        return 1
    finally:
        _delete(work)
    return 0


def _validate(files: FileStore, registry: Registry, file_id: str, endpoint: str, tenant: str,
              work: str, results: _Results) -> int:
    """Check every line; write the good ones to ``work``, the bad ones to the error file.
    Returns how many were good."""
    fs, path = storage.filesystem(work)
    fs.create_dir(path.rsplit("/", 1)[0])
    good = 0
    with fs.open_output_stream(path) as out:
        for n, raw in enumerate(files.lines(file_id, tenant), start=1):
            if not raw.strip():
                continue
            line = json.loads(raw)  # the envelope was validated when the file was uploaded
            try:
                _, mv = requests.check(endpoint, line["body"], registry, tenant)
            except APIError as err:
                results.error(requests.error_line(n, line["custom_id"], err))
                continue
            out.write(json.dumps({"line": n, "custom_id": line["custom_id"], "model": mv.id,
                                  "body": line["body"]}, separators=(",", ":")).encode() + b"\n")
            good += 1
    return good


def _run(root: str, batch_id: str, endpoint: str, spec: dict[str, Any], work: str,
         results: _Results) -> None:
    """Ray Data over the work file; results into ``results`` until done or cancelled."""
    import ray.data

    from maas_ray.batches.worker import BatchWorker

    from maas_ray.runtime import quiet_ray_data

    quiet_ray_data()
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    fs, path = storage.filesystem(work)
    ds = ray.data.read_text(path, filesystem=fs, ray_remote_args={"num_cpus": 0.1}).map_batches(
        BatchWorker,
        fn_constructor_kwargs={"storage_root": root, "batch_id": batch_id, "endpoint": endpoint,
                               "spec": spec},
        batch_size=int(spec.get("rows_per_call", 64)),
        compute=ray.data.ActorPoolStrategy(size=int(spec.get("workers", 1))),
        num_cpus=float(spec.get("num_cpus", 0.5)),
        num_gpus=float(spec.get("num_gpus", 0)),
    )
    last = time.monotonic()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for line, custom_id, status, body in zip(batch["line"], batch["custom_id"],
                                                 batch["status_code"], batch["body"]):
            if int(status) == 200:
                results.ok(requests.output_line(str(custom_id), 200, json.loads(body)))
            else:
                results.error(requests.error_line(int(line), str(custom_id),
                                                  APIError(int(status), **json.loads(body))))
        if time.monotonic() - last >= COUNTS_EVERY_S:
            last = time.monotonic()
            set_counts(root, batch_id, completed=results.completed, failed=results.failed)
            if status_of(root, batch_id) != "in_progress":
                break  # cancelled: the actors drop what is left; stop reading


def _delete(uri: str) -> None:
    fs, path = storage.filesystem(uri)
    try:
        fs.delete_dir(path.rsplit("/", 1)[0])
    except (FileNotFoundError, OSError):
        pass


def run_joined(batch_id: str, storage_root: str | None = None) -> int:
    """:func:`run_batch` as a Ray job's driver: join the job's cluster first."""
    from maas_ray.finetune.runner import _join_cluster
    from maas_ray.runtime import ray_session

    _join_cluster()
    with ray_session(None):
        return run_batch(batch_id, storage_root)


def main(argv: list[str] | None = None) -> int:
    from maas_ray.finetune import runner  # the same entry point as a fine-tuning job's

    return runner.main(argv, run=run_joined, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
