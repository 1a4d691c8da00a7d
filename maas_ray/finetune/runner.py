"""The driver of one fine-tuning job: ``python -m maas_ray.finetune.runner JOB_ID``.

Runs as a Ray job (submitted by :class:`~maas_ray.finetune.jobs.JobService`)
or in the foreground (``maas train finetune.yaml``). It validates the files
against the base model, trains, publishes ``ft:{base}:{suffix}:{job_id}`` and
writes every step of the way into the job's row and events. A cancel (the
row turning ``cancelled``) stops training within a second and publishes
nothing; a model published in the instant a cancel lands is removed again.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from maas_ray import db, job_secrets, storage
from maas_ray.config.finetune import FineTuneSpec
from maas_ray.finetune.files import FileStore
from maas_ray.finetune.formats import DataFormatError, check_for_task, validate_lines
from maas_ray.finetune.jobs import (ACTIVE, GCS_ENV, JobService, add_event, fine_tuned_name,
                                    set_status)
from maas_ray.registry import ModelNotFound, Registry
from maas_ray.tenancy import resolve_model

logger = logging.getLogger(__name__)


def _event(root: str, job_id: str, message: str, type: str = "message",
           data: dict[str, Any] | None = None, level: str = "info") -> None:
    with db.session(root) as s:
        add_event(s, job_id, message, level=level, type=type, data=data)


def _validate_file(files: FileStore, tenant: str, file_id: str, param: str, task: str,
                   tokenizer: Any, max_len: int, preference: bool) -> list[str]:
    """Shape, task fit and per-example checks; returns the labels of a classification file."""
    import json

    from maas_ray.train.text_data import check_lm_example

    what = f"{param.replace('_', ' ')} {file_id}"
    try:
        summary = validate_lines(files.lines(file_id, tenant))
        check_for_task(summary, task, what, preference)
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{what}: not UTF-8 text ({err.reason})") from None
    except DataFormatError as err:
        raise DataFormatError(f"{what}: {err}") from None
    if summary.format == "classification":
        return summary.labels
    problems = []
    for n, line in enumerate(files.lines(file_id, tenant), start=1):
        if not line.strip():
            continue
        why = check_lm_example(tokenizer, json.loads(line), max_len)
        if why:
            problems.append(f"line {n}: {why}")
            if len(problems) == 5:
                break
    if problems:
        raise DataFormatError(f"{what}: " + "; ".join(problems))
    return []


def run_job(job_id: str, root: str | None = None, progress: Any = None) -> int:
    """Run a recorded job to its end; returns a process exit code."""
    from maas_ray.runtime import ray_session

    root = storage.storage_root(root)
    service = JobService(root)
    with db.session(root) as s:
        row = s.get(db.JobRow, job_id)
        if row is None:
            print(f"no such job {job_id}", file=sys.stderr)
            return 2
        spec = FineTuneSpec.model_validate(row.spec)
        tenant, status, seed = row.tenant, row.status, row.seed
    if status not in ACTIVE:
        print(f"job {job_id} is already {status}", file=sys.stderr)
        return 0
    registry = Registry(root)
    started = time.time()
    try:
        # Checked again here, as the row's tenant: a row made by any other path than
        # JobService.create must not train on another tenant's weights either.
        base = resolve_model(registry.get, spec.base_model, tenant)
        base_dir = registry.local_dir(base)
        _event(root, job_id, f"Validating training file: {spec.training_file}")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
        dpo = spec.dpo is not None
        labels = _validate_file(service.files, tenant, spec.training_file, "training_file",
                                base.task, tokenizer, spec.max_seq_length, dpo)
        if spec.validation_file:
            _validate_file(service.files, tenant, spec.validation_file, "validation_file",
                           base.task, tokenizer, spec.max_seq_length, dpo)
    except ModelNotFound as err:
        set_status(root, job_id, "failed", f"Job failed: base model: {err}",
                   error={"code": "model_not_found", "message": str(err), "param": "model"})
        return 1
    except DataFormatError as err:
        param = "validation_file" if "validation file" in str(err) else "training_file"
        set_status(root, job_id, "failed", f"Files failed validation: {err}",
                   error={"code": f"invalid_{param}", "message": str(err), "param": param})
        return 1
    except Exception as err:  # noqa: BLE001 - recorded on the job, not lost in a log
        set_status(root, job_id, "failed", f"Job failed: {err}",
                   error={"code": "validation_error", "message": str(err), "param": None})
        return 1
    if not set_status(root, job_id, "queued", "Files validated; job queued for training"):
        return 0  # cancelled meanwhile

    last_check = [0.0, False]

    def should_stop() -> bool:
        if time.time() - last_check[0] >= 1.0:
            last_check[0] = time.time()
            last_check[1] = service.status_of(job_id) not in ACTIVE
        return bool(last_check[1])

    def on_progress(event: dict[str, Any]) -> None:
        set_status(root, job_id, "running", "Fine-tuning started", only_from=("queued",))
        if event.get("epoch_end"):
            text = f"Epoch {event['epoch'] + 1}/{spec.hyperparameters.n_epochs}: training loss={event['train_loss']:.4f}"
            if "valid_loss" in event:
                text += f", validation loss={event['valid_loss']:.4f}"
            if "valid_accuracy" in event:
                text += f", validation accuracy={event['valid_accuracy']:.3f}"
            data = {k: event[k] for k in ("step", "epoch", "train_loss", "valid_loss",
                                          "valid_accuracy", "total_steps") if k in event}
            data["full_valid_loss"] = event.get("valid_loss")
            _event(root, job_id, text, type="metrics", data=data)
        else:
            _event(root, job_id, f"Step {event['step']}/{event['total_steps']}: "
                   f"training loss={event['train_loss']:.4f}", type="metrics",
                   data={k: event[k] for k in ("step", "total_steps", "train_loss", "epoch")})
        if progress is not None:
            progress(event)

    from maas_ray.train.finetune import FineTuneCancelled, run_finetune
    from maas_ray.train.resources import InsufficientResources

    def on_resources(message: str) -> None:  # while queued: what it waits for, what it got
        _event(root, job_id, message)

    name = fine_tuned_name(spec.base_model, spec.suffix, job_id)
    try:
        _join_cluster()
        with ray_session(None), tempfile.TemporaryDirectory(prefix="maas-ft-") as tmp:
            result = run_finetune(
                spec, base, base_dir,
                train_uri=service.files.get(spec.training_file, tenant).uri,
                valid_uri=service.files.get(spec.validation_file, tenant).uri if spec.validation_file else None,
                run_name=job_id, out_dir=Path(tmp) / "model", storage_root=root, labels=labels,
                seed=seed, on_progress=on_progress, should_stop=should_stop, on_resources=on_resources)
            if should_stop():
                raise FineTuneCancelled("cancelled before publishing")
            version = _publish(registry, name, result, spec, base, job_id, seed, started, tenant)
    except FineTuneCancelled:
        logger.info("job %s cancelled", job_id)
        return 0
    except InsufficientResources as err:
        set_status(root, job_id, "failed", f"Job failed: {err}",
                   error={"code": "insufficient_resources", "message": str(err), "param": None})
        return 1
    except Exception as err:  # noqa: BLE001
        logger.exception("job %s failed", job_id)
        set_status(root, job_id, "failed", f"Job failed: {type(err).__name__}: {err}",
                   error={"code": "training_error", "message": f"{type(err).__name__}: {err}"[:2000],
                          "param": None})
        return 1
    _record_checkpoints(root, job_id, result.checkpoints)
    done = set_status(root, job_id, "succeeded", None, only_from=("queued", "running"),
                      fine_tuned_model=name, trained_tokens=result.trained_tokens,
                      metrics=result.metrics)
    if not done:  # a cancel landed while publishing: take the model back
        registry.remove(version.id)
        return 0
    _event(root, job_id, f"New fine-tuned model created: {name}")
    _event(root, job_id, "The job has successfully completed")
    return 0


def _join_cluster(attempts: int = 4) -> None:
    """As a Ray job, join the job's cluster, retrying: a busy head can take longer than
    ``ray.init``'s connect timeout to answer, and one slow answer must not fail a job."""
    import ray

    from maas_ray.runtime import joins

    address = joins(None)
    if ray.is_initialized() or not address:
        return  # in the foreground (maas train) or a local run: ray_session handles it
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address, logging_level=logging.WARNING)
            return
        except ConnectionError:
            if attempt == attempts:
                raise
            logger.warning("could not reach the Ray cluster at %s (attempt %d); retrying", address, attempt)
            time.sleep(2.0 * attempt)


def _publish(registry: Registry, name: str, result: Any, spec: FineTuneSpec, base: Any,
             job_id: str, seed: int, started: float, tenant: str) -> Any:
    from maas_ray.registry.card_page import write_card_assets
    from maas_ray.registry.checkpoints import describe
    from maas_ray.train.finetune_loop import SCAFFOLD

    lora = spec.method == "lora"
    task = "chat" if base.task == "chat" else "text-classification"
    curve = result.steps + [{k: v for k, v in h.items() if k != "train_loss"} for h in result.history]
    card: dict[str, Any] = {
        "task": task,
        "format": "peft-lora" if lora else "hf-transformers",
        "base_model": base.id,
        "architecture": base.card.get("architecture"),
        "context_length": base.card.get("context_length"),
        "owned_by": tenant,  # the tenant whose job made it (base models: "maas", shared)
        "tenant": tenant,
        "fine_tuning_job": job_id,
        "method": spec.method,
        "hyperparameters": spec.hyperparameters.model_dump(),
        "seed": seed,
        "data": {"training_file": spec.training_file, "validation_file": spec.validation_file},
        "metrics": result.metrics,
        "trained_tokens": result.trained_tokens,
        "loss_curve": sorted(curve, key=lambda p: (p.get("step", 0), "valid_loss" in p)),
        "training_time_s": round(time.time() - started, 2),
        "spec": spec.model_dump(mode="json"),
    }
    if lora:
        card["lora"] = spec.lora.model_dump()
    # Each kept checkpoint is servable as {name}:ckpt-step-{N} (maas_ray.registry.checkpoints).
    card["checkpoints"] = describe(result.checkpoints, SCAFFOLD)
    if spec.dpo:
        card["dpo"] = spec.dpo.model_dump()
    if task == "text-classification":
        import json

        config = json.loads((result.folder / "config.json").read_text())
        card["classes"] = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    if spec.export_gguf and task == "chat":
        card = _with_gguf(registry, result.folder, card, base, spec.export_gguf, lora)
    write_card_assets(card, result.folder, name)
    return registry.publish(name, result.folder, card)


def _with_gguf(registry: Registry, folder: Path, card: dict[str, Any], base: Any, outtype: str,
               lora: bool) -> dict[str, Any]:
    """Add ``model.gguf`` for the llama.cpp engine; an adapter is merged with its base first."""
    from maas_ray.registry.gguf_export import GGUF_FILE, attach_gguf, export_gguf

    if not lora:
        return attach_gguf(folder, card, outtype)  # type: ignore[arg-type]
    from maas_ray.registry.adapters import merge_adapter

    with tempfile.TemporaryDirectory(prefix="maas-merge-") as merged:
        merge_adapter(registry.local_dir(base), folder, Path(merged))
        export_gguf(Path(merged), folder / GGUF_FILE, outtype)  # type: ignore[arg-type]
    return dict(card, formats=["peft-lora", "gguf"], gguf={"file": GGUF_FILE, "outtype": outtype})


def _record_checkpoints(root: str, job_id: str, checkpoints: list[dict[str, Any]]) -> None:
    """List the kept checkpoints and drop their optimizer state (only a restart needs it)."""
    from maas_ray.train.finetune_loop import OPTIMIZER

    with db.session(root) as s:
        for i, ckpt in enumerate(sorted(checkpoints, key=lambda c: c.get("step", 0))):
            metrics = {k: ckpt[k] for k in ("train_loss", "valid_loss", "valid_accuracy") if k in ckpt}
            s.add(db.CheckpointRow(id=f"ftckpt-{job_id.removeprefix('ftjob-')[:16]}{i:03d}", job_id=job_id,
                                   step=int(ckpt.get("step", 0)), epoch=int(ckpt.get("epoch", 0)),
                                   metrics=metrics, uri=ckpt["uri"]))
    for ckpt in checkpoints:
        if storage.is_local(ckpt["uri"]):
            (Path(ckpt["uri"]) / OPTIMIZER).unlink(missing_ok=True)


def main(argv: list[str] | None = None, run: Callable[[str, str | None], int] | None = None,
         description: str | None = None) -> int:
    """A Ray job's entry point; ``run(job_id, storage)`` runs it (default :func:`run_job`;
    a batch's runner passes its own)."""
    parser = argparse.ArgumentParser(description=description or __doc__.splitlines()[0])
    parser.add_argument("job_id")
    parser.add_argument("--storage", default=None, help="storage root (default $MAAS_HOME)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if os.environ.get(GCS_ENV):  # the submitter's own cluster beats what Ray guessed
        os.environ["RAY_ADDRESS"] = os.environ[GCS_ENV]
    try:
        return (run or run_job)(args.job_id, args.storage)
    finally:
        job_secrets.drop()


if __name__ == "__main__":
    sys.exit(main())

