"""The training driver: spec → Ray Data splits → ``TorchTrainer`` → registry version."""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from maas_ray import storage
from maas_ray.config.specs import TrainSpec
from maas_ray.data import Preprocessor, feature_columns, fit_preprocessor, read_table, split_dataset
from maas_ray.models.tabular import FORMAT, WEIGHTS, TabularModel, build_module
from maas_ray.registry import ModelVersion, Registry
from maas_ray.registry.card_page import write_card_assets
from maas_ray.runtime import quiet_ray_data

logger = logging.getLogger(__name__)

# Below this size (the encoded training split, all workers together) each worker
# keeps its shard in memory after the first epoch instead of re-streaming it.
CACHE_SHARDS_MAX_BYTES = 512 * 2**20

EpochCallback = Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    version: ModelVersion
    metrics: dict[str, float]
    history: list[dict[str, Any]]
    run_name: str


def module_config(spec: TrainSpec, pre: Preprocessor) -> dict[str, Any]:
    return {
        "kind": spec.model.kind,
        "hidden_sizes": list(spec.model.hidden_sizes),
        "dropout": spec.model.dropout,
        "n_features": pre.n_features,
        "n_outputs": pre.n_outputs,
        "task": spec.task,
    }


def prepare_data(spec: TrainSpec) -> tuple[Preprocessor, dict[str, Any], Any]:
    """Read and split the table, fit preprocessing on train; returns (pre, datasets, raw test)."""
    raw = read_table(spec.data.source, spec.data.format)
    features = feature_columns(raw.schema(), spec.data.target, spec.data.features)
    cols = features + [spec.data.target]
    raw = raw.select_columns(cols)
    train, val, test = split_dataset(
        raw, spec.data.validation_fraction, spec.data.test_fraction, spec.data.split_seed
    )
    pre = fit_preprocessor(train, features, spec.data.target, spec.task, spec.data.standardize)

    def encode(ds: Any) -> Any:
        # Materialise the small encoded splits once so every epoch reads the object
        # store instead of re-reading and re-hashing the files.
        return ds.map_batches(pre.transform_batch, batch_format="pandas").materialize()

    return pre, {"train": encode(train), "validation": encode(val)}, test


def evaluate(model: TabularModel, test: Any, task: str, target: str) -> dict[str, float]:
    """Test metrics in the target's own units, streamed batch by batch."""
    sq, ab, n, correct, y_sum, y_sq = 0.0, 0.0, 0, 0, 0.0, 0.0
    for batch in test.iter_batches(batch_size=4096, batch_format="pandas"):
        if batch.empty:
            continue
        y = batch[target].to_numpy()
        pred = model.predict(batch[model.preprocessor.features].to_numpy(dtype=np.float64))
        n += len(y)
        if task == "regression":
            err = pred - y.astype(np.float64)
            sq += float(np.sum(err**2))
            ab += float(np.sum(np.abs(err)))
            y_sum += float(np.sum(y))
            y_sq += float(np.sum(y.astype(np.float64) ** 2))
        else:
            correct += int(np.sum(pred == y))
    if n == 0:
        return {}
    if task == "regression":
        var = y_sq / n - (y_sum / n) ** 2
        return {
            "test_mse": sq / n,
            "test_mae": ab / n,
            "test_r2": 1 - (sq / n) / var if var > 0 else float("nan"),
            "test_rows": n,
        }
    return {"test_accuracy": correct / n, "test_rows": n}


def run_training(
    spec: TrainSpec,
    storage_root: str | None = None,
    on_epoch: EpochCallback | None = None,
) -> TrainResult:
    """Train ``spec`` on the connected Ray cluster and publish the result."""
    from maas_ray.train.loop import train_loop_per_worker
    from maas_ray.train.progress import fit_with_progress, start_progress_log
    from maas_ray.train.trainer import torch_trainer

    quiet_ray_data()
    # Checkpoint reports wait for the controller's poll; 2 s (Ray's default) per
    # report dominates small jobs. Read by Ray Train when the trainer starts.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    root = storage.storage_root(storage_root)
    registry = Registry(root)
    started = time.time()
    pre, datasets, test = prepare_data(spec)
    run_name = spec.training.run_name or (
        f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    )
    progress = start_progress_log(run_name, spec.name)  # also exports job metrics
    config = {
        **spec.training.model_dump(exclude={"run_name", "max_failures"}),
        "task": spec.task,
        "module": module_config(spec, pre),
        "progress": progress,
        # Cache shards in worker memory when the whole training split is small.
        "cache_shards": datasets["train"].size_bytes() <= CACHE_SHARDS_MAX_BYTES,
    }
    trainer = torch_trainer(train_loop_per_worker, config, spec.scaling, run_name, root, datasets,
                            spec.training.max_failures)
    seen: list[dict[str, Any]] = []

    def on_event(event: dict[str, Any]) -> None:
        seen.append(event)
        if on_epoch:
            on_epoch(event)

    result = fit_with_progress(trainer, progress, on_event)
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} finished without a checkpoint")

    with result.checkpoint.as_directory() as folder:
        from safetensors.torch import load_file

        cfg = module_config(spec, pre)
        module = build_module(cfg)
        module.load_state_dict(load_file(str(Path(folder) / WEIGHTS)))
        history = _history_from(folder) or seen
    module.eval()
    model = TabularModel(module, cfg, pre)
    metrics = {k: v for k, v in (history[-1] if history else {}).items()
               if k not in ("epoch", "samples", "samples_per_s")}
    metrics.update(evaluate(model, test, spec.task, spec.data.target))
    card = {
        "task": spec.task,
        "format": FORMAT,
        "description": spec.description,
        "spec": spec.model_dump(mode="json"),
        "data": {"source": spec.data.source, "features": pre.features, "target": pre.target},
        "metrics": metrics,
        "loss_units": "standardised target" if spec.task == "regression" else "cross-entropy",
        "loss_curve": history,
        "training_time_s": round(time.time() - started, 2),
        "run": {"name": run_name, "storage": storage.join(root, "runs", run_name),
                # First epoch this call trained: > 0 when it resumed an earlier
                # attempt of the same run name from its latest checkpoint.
                "started_at_epoch": seen[0]["epoch"] if seen else spec.training.epochs},
        "n_features": pre.n_features,
        "classes": pre.classes,
    }
    with tempfile.TemporaryDirectory() as tmp:
        model.save(Path(tmp))
        write_card_assets(card, Path(tmp), spec.name)  # loss_curve.png + README.md
        version = registry.publish(spec.name, Path(tmp), card)
    return TrainResult(version, metrics, history, run_name)


def _history_from(folder: str) -> list[dict[str, Any]]:
    import json

    from maas_ray.train.loop import STATE

    path = Path(folder) / STATE
    return json.loads(path.read_text())["history"] if path.exists() else []
