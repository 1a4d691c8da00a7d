"""Building a ``TorchTrainer`` from a spec's scaling section: one place for both loops."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from maas_ray import storage
from maas_ray.config.specs import ScalingSpec
from maas_ray.train.resources import Need, cluster_cpus, fmt_cpus, startup_retries, wait_for_cpus


def torch_trainer(loop: Callable[[dict[str, Any]], None], config: dict[str, Any], scaling: ScalingSpec,
                  run_name: str, root: str, datasets: dict[str, Any], max_failures: int,
                  on_resources: Callable[[str], None] | None = None, wait_s: float | None = None,
                  **run_options: Any) -> Any:
    """A ``TorchTrainer`` whose checkpoints live under ``{root}/runs/{run_name}``, sized to
    the cluster: it returns once the workers fit (at most ``wait_s`` seconds, default
    ``scaling.resource_wait_s``; ``on_resources`` hears what it waits for, then what the
    workers got) and raises :class:`~maas_ray.train.resources.InsufficientResources` when
    they do not.

    Checkpoints go through the same filesystem as the registry, so ``s3://`` roots
    honour ``AWS_ENDPOINT_URL`` and credentials exactly as the registry does.
    ``run_options`` go to ``RunConfig`` (e.g. ``checkpoint_config``); a
    ``dataset_config`` key goes to the trainer.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    wait_s = scaling.resource_wait_s if wait_s is None else wait_s
    need = Need(scaling.cpus_per_worker, scaling.min_workers())
    cpus = wait_for_cpus(need, wait_s, on_resources)
    if on_resources:
        workers = "1 worker" if need.count == 1 else f"{need.count} workers"
        on_resources(f"Training with {workers} × {fmt_cpus(cpus)} CPU; {cluster_cpus().describe()}")
    elastic = not isinstance(scaling.num_workers, int)
    runs_uri = storage.join(root, "runs")
    runs_fs, runs_path = (None, runs_uri) if storage.is_local(root) else storage.filesystem(runs_uri)
    dataset_config = run_options.pop("dataset_config", None)
    # Ray Train's preemption watcher (observability of draining nodes; restarts do not need
    # it) is built with worker handles as constructor arguments, and Ray logs an error line
    # for that on every run (ray-project/ray#53727). Off unless the user turns it on; Ray
    # Train passes RAY_TRAIN_* variables from here to its controller.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    return TorchTrainer(
        loop,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.ray_num_workers(),
            elastic_resize_monitor_interval_s=scaling.elastic_resize_interval_s,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": cpus, **scaling.resources_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=runs_path,
            storage_filesystem=runs_fs,
            failure_config=ray.train.FailureConfig(
                max_failures=max_failures,
                # A worker group that cannot be placed is a controller failure, retried
                # without end by default: a fixed-size run gives up after about wait_s.
                # Elastic runs keep Ray's default: settling for fewer workers, and waiting
                # for nodes to return, is what they are for.
                **({} if elastic or not _has_controller_limit(ray.train.FailureConfig)
                   else {"controller_failure_limit": startup_retries(wait_s)})),
            **run_options,
        ),
        datasets=datasets,
        **({"dataset_config": dataset_config} if dataset_config is not None else {}),
    )


def _has_controller_limit(config_cls: type) -> bool:
    """Ray Train v2's FailureConfig has ``controller_failure_limit``; v1's does not."""
    import dataclasses

    return dataclasses.is_dataclass(config_cls) and any(
        f.name == "controller_failure_limit" for f in dataclasses.fields(config_cls))
