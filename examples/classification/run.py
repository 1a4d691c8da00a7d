"""Tabular classification end to end: an MLP on the breast cancer data.

    python examples/classification/run.py

Passes when test accuracy on the held-out split is at least 0.95.
"""

from __future__ import annotations

import sys
from pathlib import Path

from maas_ray.config import load_spec
from maas_ray.runtime import ray_session
from maas_ray.train import TrainResult, run_training

SPEC = Path(__file__).with_name("spec.yaml")
MIN_ACCURACY = 0.95


def main(storage: str | None = None) -> TrainResult:
    result = run_training(load_spec(SPEC), storage)
    accuracy = result.metrics["test_accuracy"]
    print(f"{result.version.id}: test accuracy {accuracy:.3f} on {result.metrics['test_rows']} rows")
    if accuracy < MIN_ACCURACY:
        raise AssertionError(f"test accuracy {accuracy:.3f} is below {MIN_ACCURACY}")
    return result


if __name__ == "__main__":
    with ray_session():
        main(sys.argv[1] if len(sys.argv) > 1 else None)
