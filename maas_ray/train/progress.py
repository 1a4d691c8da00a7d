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


def start_progress_log(*args: Any) -> Any:
    """A :class:`ProgressLog` pinned to the driver's node.

    Left to Ray, the zero-CPU actor may land on any node; when that node is lost
    mid-training (the very failure elastic training survives), the driver's
    next poll would fail. The driver's own node lives as long as the driver.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return ProgressLog.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote(*args)
