"""A tiny actor that carries per-epoch metrics from rank 0 to the driver.

``TorchTrainer.fit`` only returns at the end; the driver polls this actor to
draw a live progress display (and later, job events) while training runs.
Named jobs also export each event as Prometheus metrics (:mod:`.metrics`).
"""

from __future__ import annotations

from typing import Any

import ray


@ray.remote(num_cpus=0)
class ProgressLog:
    def __init__(self, run: str | None = None, model: str | None = None) -> None:
        self._events: list[dict[str, Any]] = []
        self._labels = (run, model) if run and model else None

    def push(self, metrics: dict[str, Any]) -> None:
        self._events.append(metrics)
        if self._labels:
            from maas_ray.train.metrics import record_progress

            record_progress(*self._labels, metrics)

    def since(self, index: int) -> list[dict[str, Any]]:
        return self._events[index:]
