"""A tiny actor that carries per-epoch metrics from rank 0 to the driver.

``TorchTrainer.fit`` only returns at the end; the driver polls this actor to
draw a live progress display (and later, job events) while training runs.
"""

from __future__ import annotations

from typing import Any

import ray


@ray.remote(num_cpus=0)
class ProgressLog:
    def __init__(self) -> None:
        self._events: list[dict[str, Any]] = []

    def push(self, metrics: dict[str, Any]) -> None:
        self._events.append(metrics)

    def since(self, index: int) -> list[dict[str, Any]]:
        return self._events[index:]
