"""Batch prediction: a registry version mapped over a table by an actor pool.

Each actor loads the model once (from the registry, so it works on any node)
and transforms pandas batches; results are written as Parquet, first into a
hidden temporary folder that is renamed into place, so a failed run never
leaves a half-written output behind.
"""

from __future__ import annotations

import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import ray.data

from maas_ray import storage
from maas_ray.data import DataError, read_table, require_numeric_columns
from maas_ray.models.tabular import TabularModel
from maas_ray.registry import Registry


@dataclass
class BatchResult:
    model: str
    rows: int
    output: str


class _Predict:
    """One actor of the pool: loads the model once, predicts many batches."""

    def __init__(self, storage_root: str, model_id: str, counter: Any = None) -> None:
        registry = Registry(storage_root)
        self.model = TabularModel.load(registry.local_dir(registry.get(model_id)))
        self.features = self.model.preprocessor.features
        self.counter = counter

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        if self.counter is not None:
            self.counter.add.remote(len(df))  # fire and forget: progress only
        rows = df[self.features].to_numpy(dtype=np.float64)
        df = df.copy()
        df["prediction"] = self.model.predict(rows)
        if self.model.preprocessor.task == "classification":
            probs = self.model.predict_proba(rows)
            for i, label in enumerate(self.model.preprocessor.classes):
                df[f"probability_{label}"] = probs[:, i]
        return df


def batch_predict(
    model_id: str,
    input_path: str,
    output_path: str,
    storage_root: str | None = None,
    concurrency: int = 2,
    batch_size: int = 4096,
    overwrite: bool = False,
    on_rows: Callable[[int], None] | None = None,
) -> BatchResult:
    """Predict every row of ``input_path`` (CSV/Parquet/JSONL) into Parquet at ``output_path``.

    ``on_rows(done)`` is called about twice a second with the rows predicted so far.
    """
    root = storage.storage_root(storage_root)
    registry = Registry(root)
    mv = registry.get(model_id)
    if mv.task not in ("regression", "classification"):
        raise DataError(f"model {mv.id} is a {mv.task!r} model; batch predict takes tabular models")
    features = list(mv.card.get("data", {}).get("features", []))
    ds = read_table(input_path)
    require_numeric_columns(ds.schema(), features)

    local = storage.is_local(output_path)
    final = Path(output_path).resolve() if local else None
    if final is not None and final.exists():
        if not overwrite:
            raise DataError(f"output {output_path!r} exists; pass --overwrite to replace it")
    target = str(final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")) if final else output_path

    counter = _RowCounter.remote() if on_rows else None
    out = ds.map_batches(
        _Predict,
        fn_constructor_kwargs={"storage_root": root, "model_id": mv.id, "counter": counter},
        batch_format="pandas",
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, concurrency)),
        num_cpus=0.5,
    )
    try:
        _run_reporting(lambda: out.write_parquet(target), counter, on_rows)
        rows = ray.data.read_parquet(target).count()
        if final is not None:
            if final.exists():
                shutil.rmtree(final) if final.is_dir() else final.unlink()
            Path(target).rename(final)
    finally:
        if counter is not None:
            ray.kill(counter)
        if final is not None:
            shutil.rmtree(target, ignore_errors=True)
    if on_rows:
        on_rows(rows)
    return BatchResult(mv.id, rows, str(final) if final else output_path)


@ray.remote(num_cpus=0)
class _RowCounter:
    """Rows predicted so far, summed over the pool's actors."""

    def __init__(self) -> None:
        self.rows = 0

    def add(self, n: int) -> None:
        self.rows += n

    def get(self) -> int:
        return self.rows


def _run_reporting(work: Callable[[], None], counter: Any, on_rows: Callable[[int], None] | None) -> None:
    """Run ``work`` in a thread, reporting the counter to ``on_rows`` while it runs."""
    if counter is None or on_rows is None:
        work()
        return
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            work()
        except BaseException as err:  # re-raised on the calling thread
            outcome["error"] = err

    thread = threading.Thread(target=run, name="maas-batch-predict", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)
        on_rows(ray.get(counter.get.remote()))
    if "error" in outcome:
        raise outcome["error"]
