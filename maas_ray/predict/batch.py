"""Batch prediction: a registry version mapped over a table by an actor pool.

Each actor loads the model once (from the registry, so it works on any node)
and transforms pandas batches; results are written as Parquet, first into a
hidden temporary folder that is renamed into place, so a failed run never
leaves a half-written output behind.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

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

    def __init__(self, storage_root: str, model_id: str) -> None:
        registry = Registry(storage_root)
        self.model = TabularModel.load(registry.local_dir(registry.get(model_id)))
        self.features = self.model.preprocessor.features

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
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
) -> BatchResult:
    """Predict every row of ``input_path`` (CSV/Parquet/JSONL) into Parquet at ``output_path``."""
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

    out = ds.map_batches(
        _Predict,
        fn_constructor_kwargs={"storage_root": root, "model_id": mv.id},
        batch_format="pandas",
        batch_size=batch_size,
        concurrency=(1, max(1, concurrency)),
        num_cpus=0.5,
    )
    try:
        out.write_parquet(target)
        import ray.data

        rows = ray.data.read_parquet(target).count()
        if final is not None:
            if final.exists():
                shutil.rmtree(final) if final.is_dir() else final.unlink()
            Path(target).rename(final)
    finally:
        if final is not None:
            shutil.rmtree(target, ignore_errors=True)
    return BatchResult(mv.id, rows, str(final) if final else output_path)
