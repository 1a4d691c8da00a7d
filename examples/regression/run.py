"""The seed's case end to end: train with SGD + MSE on 2 workers, check against lstsq.

    python examples/regression/run.py            # embedded local Ray
    RAY_ADDRESS=auto python examples/regression/run.py

Passes when the model's test MSE is within 5% of the closed-form least-squares
solution (numpy.linalg.lstsq, with intercept) fitted on the same training split.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from maas_ray.config import load_spec
from maas_ray.data import read_table, split_dataset
from maas_ray.runtime import ray_session
from maas_ray.train import TrainResult, run_training

SPEC = Path(__file__).with_name("spec.yaml")
TOLERANCE = 0.05


def closed_form_test_mse(spec_path: Path = SPEC) -> float:
    """Test MSE of ordinary least squares on the spec's own train/test split."""
    spec = load_spec(spec_path)
    d = spec.data
    train, _, test = split_dataset(read_table(d.source), d.validation_fraction, d.test_fraction, d.split_seed)
    # The example's table is tiny (442 rows), so the reference pulls it into pandas.
    train_df, test_df = train.to_pandas(), test.to_pandas()
    features = [c for c in train_df.columns if c != d.target]

    def design(df):  # (N, F + 1) with an intercept column
        return np.c_[df[features].to_numpy(dtype=np.float64), np.ones(len(df))]

    w, *_ = np.linalg.lstsq(design(train_df), train_df[d.target].to_numpy(dtype=np.float64), rcond=None)
    err = design(test_df) @ w - test_df[d.target].to_numpy(dtype=np.float64)
    return float(np.mean(err**2))


def check(result: TrainResult, reference_mse: float) -> float:
    """Raise unless the trained model's test MSE is within TOLERANCE of the reference."""
    mse = result.metrics["test_mse"]
    ratio = mse / reference_mse
    if ratio > 1 + TOLERANCE:
        raise AssertionError(f"test MSE {mse:.1f} is {ratio - 1:.1%} worse than lstsq {reference_mse:.1f}")
    return ratio


def main(storage: str | None = None) -> TrainResult:
    spec = load_spec(SPEC)
    result = run_training(spec, storage, on_epoch=lambda e: print(
        f"epoch {e['epoch']:3d}  train {e['train_loss']:.4f}  val {e['val_loss']:.4f}"))
    reference = closed_form_test_mse()
    ratio = check(result, reference)
    print(f"{result.version.id}: test MSE {result.metrics['test_mse']:.1f}, "
          f"lstsq {reference:.1f}, ratio {ratio:.3f} (must be <= {1 + TOLERANCE})")
    return result


if __name__ == "__main__":
    with ray_session():
        main(sys.argv[1] if len(sys.argv) > 1 else None)
