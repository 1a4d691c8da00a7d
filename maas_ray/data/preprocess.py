"""Feature standardisation fitted on the training split, applied everywhere.

The fitted :class:`Preprocessor` is saved next to the weights in the registry, so
serving and batch prediction transform raw inputs exactly as training did.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import ray.data


@dataclass(frozen=True)
class Preprocessor:
    """Column order, standardisation statistics and class labels of one model."""

    features: list[str]
    target: str
    task: str  # "regression" | "classification"
    mean: list[float]
    std: list[float]
    target_mean: float = 0.0
    target_std: float = 1.0
    classes: list[Any] = field(default_factory=list)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def n_outputs(self) -> int:
        return len(self.classes) if self.task == "classification" else 1

    def transform_x(self, x: np.ndarray, dtype: type = np.float32) -> np.ndarray:
        """Raw features ``(B, F)`` → standardised ``(B, F)`` (float32 for training)."""
        x = np.asarray(x, dtype=np.float64)
        return ((x - np.asarray(self.mean)) / np.asarray(self.std)).astype(dtype)

    def transform_y(self, y: np.ndarray) -> np.ndarray:
        """Raw targets → float32 standardised targets (regression) or int64 class ids."""
        if self.task == "classification":
            index = {c: i for i, c in enumerate(self.classes)}
            return np.asarray([index[v] for v in y.tolist()], dtype=np.int64)
        return ((np.asarray(y, dtype=np.float64) - self.target_mean) / self.target_std).astype(np.float32)

    def inverse_y(self, out: np.ndarray) -> np.ndarray:
        """Model outputs back to the target's units (regression) or labels (classification)."""
        if self.task == "classification":
            return np.asarray(self.classes, dtype=object)[np.asarray(out).argmax(axis=-1)]
        return np.asarray(out, dtype=np.float64).reshape(-1) * self.target_std + self.target_mean

    def transform_batch(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        """A raw table batch → ``{"x": (B, F) float32, "y": (B,)}`` for training."""
        return {
            "x": self.transform_x(df[self.features].to_numpy(dtype=np.float64)),
            "y": self.transform_y(df[self.target].to_numpy()),
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Preprocessor:
        return cls(**raw)


def fit_preprocessor(
    train: ray.data.Dataset, features: list[str], target: str, task: str, standardize: bool = True
) -> Preprocessor:
    """Fit statistics on the training split with one streaming aggregation pass."""
    from ray.data.aggregate import Count, Mean, Std

    cols = features + ([target] if task == "regression" else [])
    aggs = [Count()] + [Mean(c) for c in cols] + [Std(c, ddof=0) for c in cols]
    stats = train.aggregate(*aggs)
    if not stats or not stats.get("count()"):
        raise ValueError("the training split is empty: check the data and split fractions")

    def safe_std(c: str) -> float:
        s = stats[f"std({c})"]
        # A constant column would divide by zero; leave it unscaled instead.
        return 1.0 if s is None or not math.isfinite(s) or s < 1e-12 else float(s)

    mean = [float(stats[f"mean({c})"]) if standardize else 0.0 for c in features]
    std = [safe_std(c) if standardize else 1.0 for c in features]
    classes: list[Any] = []
    t_mean, t_std = 0.0, 1.0
    if task == "classification":
        classes = sorted(train.unique(target), key=lambda v: (str(type(v)), v))
        classes = [c.item() if hasattr(c, "item") else c for c in classes]
        if len(classes) < 2:
            raise ValueError(f"classification needs at least 2 classes in {target!r}, found {classes}")
    elif standardize:
        t_mean, t_std = float(stats[f"mean({target})"]), safe_std(target)
    return Preprocessor(features, target, task, mean, std, t_mean, t_std, classes)
