"""A tiny actor that carries per-epoch metrics from rank 0 to the driver.

``TorchTrainer.fit`` only returns at the end; the driver polls this actor to
draw a live progress display (and later, job events) while training runs.
Named jobs also export each event as Prometheus metrics (:mod:`.metrics`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import ray

logger = logging.getLogger(__name__)


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


def fit_with_progress(trainer: Any, progress: Any, on_event: Callable[[dict[str, Any]], None] | None = None,
                      should_stop: Callable[[], bool] | None = None) -> Any:
    """``trainer.fit()`` in a thread while this thread relays ``progress`` events.

    ``should_stop`` is asked twice a second; when it says so, :class:`StopTraining`
    is raised here (the fit thread is a daemon: it ends with the driver). The
    progress actor is killed either way.
    """
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # re-raised on the calling thread
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="maas-train-fit", daemon=True)
    thread.start()
    seen = 0
    try:
        while thread.is_alive():
            thread.join(timeout=0.5)
            try:
                events = ray.get(progress.since.remote(seen)) if progress is not None else []
            except ray.exceptions.RayActorError:  # progress is lost; training goes on
                logger.warning("the progress actor died; training continues without live progress")
                progress, events = None, []
            for event in events:
                seen += 1
                if on_event:
                    on_event(event)
            if should_stop and should_stop():
                raise StopTraining("training was stopped on request")
    finally:
        if progress is not None:
            ray.kill(progress)
    if "error" in outcome:
        raise _explained(outcome["error"], trainer)
    return outcome["result"]


def _explained(err: BaseException, trainer: Any) -> BaseException:
    """Workers that never got their resources fail naming what they needed and what is free."""
    from maas_ray.train.resources import Need, explain_start_failure

    scaling = getattr(trainer, "scaling_config", None)
    if scaling is None:
        return err
    workers = scaling.num_workers
    cpus = (scaling.resources_per_worker or {}).get("CPU")
    return explain_start_failure(err, Need(cpus, workers if isinstance(workers, int) else workers[0]))


class StopTraining(RuntimeError):
    """``should_stop`` asked training to stop; nothing is published."""
