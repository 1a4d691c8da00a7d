"""The fine-tuning driver: JSONL → Ray Data tokenization → ``TorchTrainer`` → a model folder.

Called by the fine-tuning job runner (a Ray job) and by ``maas train
finetune.yaml``; it trains and returns a publishable folder, and leaves
naming, publishing and bookkeeping to the caller.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from maas_ray import storage
from maas_ray.config.finetune import FineTuneSpec
from maas_ray.registry import ModelVersion
from maas_ray.runtime import quiet_ray_data
from maas_ray.train.progress import StopTraining
from maas_ray.train.resources import DATA_CPUS, Need, wait_actors_gone, wait_for_cpus

ProgressCallback = Callable[[dict[str, Any]], None]

# Files up to this size are tokenized by the driver, which has loaded the tokenizer to validate
# them already. Through Ray Data each file costs a read task and a tokenizer actor, that is a
# worker process importing transformers and loading the tokenizer once more: 20-40 s on a busy
# 2-core machine, for what the driver does in well under a second.
TOKENIZE_IN_DRIVER_MAX_BYTES = 4 * 2**20

# Files of a base model folder that a classifier fine-tuned from it keeps
# (sentence-transformers' max_seq_length, read by serving).
_KEEP_FROM_BASE = ("sentence_bert_config.json",)


FineTuneCancelled = StopTraining  # ``should_stop`` said stop: nothing to publish


@dataclass
class FineTuneResult:
    folder: Path
    """A local folder holding the model (or adapter) and tokenizer, ready to publish."""
    metrics: dict[str, float]
    history: list[dict[str, Any]]
    steps: list[dict[str, Any]]
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    trained_tokens: int = 0


def objective_for(base: ModelVersion, spec: FineTuneSpec) -> str:
    """What the loop optimises: ``dpo`` (preference pairs), ``lm`` (target tokens) or
    ``classification``."""
    if base.task != "chat":
        return "classification"
    return "dpo" if spec.dpo is not None else "lm"


def read_lines(uri: str) -> Any:
    """A Ray Dataset of a JSONL file's lines (``text`` column), any storage.

    Read tasks take :data:`DATA_CPUS`, not Ray Data's default of 1: beside a running
    app a small machine has less than one CPU free, and a 1-CPU read never starts there.
    """
    import ray.data

    fs, path = storage.filesystem(uri)
    return ray.data.read_text(path, filesystem=fs, num_cpus=DATA_CPUS)


def _size(uri: str) -> int:
    fs, path = storage.filesystem(uri)
    return fs.get_file_info(path).size or 0


def tokenize_small_file(uri: str, udf: Any) -> Any:
    """A Ray Dataset of a small JSONL file tokenized here by ``udf`` (one of the Ray Data UDFs
    of :mod:`maas_ray.train.text_data`): the same columns and block layout as through Ray Data."""
    import numpy as np
    import ray.data
    from ray.data.block import BlockAccessor

    fs, path = storage.filesystem(uri)
    with fs.open_input_stream(path) as f:
        lines = f.read().decode("utf-8").splitlines()
    block = BlockAccessor.batch_to_block(udf({"text": np.asarray(lines, dtype=object)}))
    return ray.data.from_blocks([block])


def run_finetune(
    spec: FineTuneSpec,
    base: ModelVersion,
    base_dir: Path,
    train_uri: str,
    valid_uri: str | None,
    run_name: str,
    out_dir: Path,
    storage_root: str | None = None,
    labels: list[str] | None = None,
    seed: int = 0,
    on_progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_resources: Callable[[str], None] | None = None,
) -> FineTuneResult:
    """Train on the connected Ray cluster; the model lands in ``out_dir``.

    Waits at most ``spec.scaling.resource_wait_s`` in all for CPUs (``on_resources``
    hears what for, and what the workers got) and raises
    :class:`~maas_ray.train.resources.InsufficientResources` when they stay taken.
    """
    import ray
    import ray.train
    from ray.data import ActorPoolStrategy

    from maas_ray.train.finetune_loop import SCAFFOLD, finetune_loop_per_worker
    from maas_ray.train.progress import fit_with_progress, start_progress_log
    from maas_ray.train.text_data import TokenizeClassification, TokenizeLM, TokenizePreference
    from maas_ray.train.trainer import torch_trainer

    quiet_ray_data()
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    root = storage.storage_root(storage_root)
    objective = objective_for(base, spec)
    if objective == "classification" and not labels:
        raise ValueError("a classifier needs the training file's labels")

    if objective in ("lm", "dpo"):
        udf = TokenizeLM if objective == "lm" else TokenizePreference
        kwargs = {"model_dir": str(base_dir)}
    else:
        udf, kwargs = TokenizeClassification, {"model_dir": str(base_dir), "labels": labels,
                                               "max_len": spec.max_seq_length}
    uris = [train_uri] + ([valid_uri] if valid_uri else [])
    here = udf(**kwargs) if all(_size(u) <= TOKENIZE_IN_DRIVER_MAX_BYTES for u in uris) else None

    def tokenized(uri: str) -> Any:
        if here is not None:
            return tokenize_small_file(uri, here)
        return read_lines(uri).map_batches(udf, fn_constructor_kwargs=kwargs, batch_size=256,
                                           compute=ActorPoolStrategy(size=1),
                                           num_cpus=DATA_CPUS).materialize()

    wait_s = spec.scaling.resource_wait_s
    if here is None:
        started = time.monotonic()
        # A read task and the tokenizer actor run side by side.
        wait_for_cpus(Need(DATA_CPUS, 2, "data task"), wait_s, on_resources)
        wait_s = max(0.0, wait_s - (time.monotonic() - started))  # one budget for both waits
    datasets = {"train": tokenized(train_uri)}
    if valid_uri:
        datasets["validation"] = tokenized(valid_uri)
    # The tokenizer actors hold their CPUs until they exit; the workers are sized after.
    wait_actors_gone("MapWorker(")
    train_rows = datasets["train"].count()
    progress = start_progress_log(run_name, base.name)  # also exports the job's metrics
    config = {
        "objective": objective,
        "base_dir": str(base_dir),
        "method": spec.method,
        "lora": {**spec.lora.model_dump(), "target_modules": spec.lora.target_modules},
        "labels": labels or [],
        "beta": spec.dpo.beta if spec.dpo else 0.0,
        "learning_rate": spec.learning_rate(base.task),
        "n_epochs": spec.hyperparameters.n_epochs,
        "batch_size": spec.hyperparameters.batch_size,
        "gradient_accumulation_steps": spec.gradient_accumulation_steps,
        "checkpoint_every_epochs": spec.checkpoint_every_epochs,
        "seed": seed,
        "use_gpu": spec.scaling.use_gpu,
        "has_validation": valid_uri is not None,
        "train_rows": train_rows,
        "progress": progress,
    }
    trainer = torch_trainer(
        finetune_loop_per_worker, config, spec.scaling, run_name, root, datasets, max_failures=1,
        on_resources=on_resources, wait_s=wait_s,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=3),
        # Validation rows are split across workers too, and summed with all_reduce.
        dataset_config=ray.train.DataConfig(datasets_to_split="all"))
    events: list[dict[str, Any]] = []

    def on_event(event: dict[str, Any]) -> None:
        events.append(event)
        if on_progress:
            on_progress(event)

    result = fit_with_progress(trainer, progress, on_event, should_stop)
    if result.checkpoint is None:
        raise RuntimeError(f"fine-tuning run {run_name} finished without a checkpoint")
    history = [e for e in events if e.get("epoch_end")]
    steps = [e for e in events if not e.get("epoch_end")]
    # Ray names a checkpoint by its path inside the run's filesystem: on an object store
    # that path lacks the scheme that makes it a storage URI again.
    scheme = "" if storage.is_local(root) else root.split("://", 1)[0] + "://"
    checkpoints = [{"uri": scheme + ckpt.path, **metrics}
                   for ckpt, metrics in (result.best_checkpoints or [])]
    with result.checkpoint.as_directory() as folder:
        out_dir.mkdir(parents=True, exist_ok=True)
        for item in Path(folder).iterdir():
            if item.name not in SCAFFOLD and item.is_file():
                shutil.copy2(item, out_dir / item.name)
    for name in _KEEP_FROM_BASE:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out_dir / name)
            for ckpt in checkpoints:  # kept checkpoints are served as models too
                fs, path = storage.filesystem(ckpt["uri"])
                pafs.copy_files(str(base_dir / name), f"{path}/{name}",
                                source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    last = history[-1] if history else {}
    metrics = {k: v for k, v in last.items()
               if k in ("train_loss", "valid_loss", "valid_accuracy", "step")}
    return FineTuneResult(out_dir, metrics, [{k: v for k, v in h.items() if k != "epoch_end"}
                                            for h in history],
                          steps, checkpoints, int(sum(h.get("trained_tokens", 0) for h in history)))
