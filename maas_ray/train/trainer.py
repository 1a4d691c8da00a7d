"""Building a ``TorchTrainer`` from a spec's scaling section: one place for both loops."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from maas_ray import storage
from maas_ray.config.specs import ScalingSpec


def torch_trainer(loop: Callable[[dict[str, Any]], None], config: dict[str, Any], scaling: ScalingSpec,
                  run_name: str, root: str, datasets: dict[str, Any], max_failures: int,
                  **run_options: Any) -> Any:
    """A ``TorchTrainer`` whose checkpoints live under ``{root}/runs/{run_name}``.

    Checkpoints go through the same filesystem as the registry, so ``s3://`` roots
    honour ``AWS_ENDPOINT_URL`` and credentials exactly as the registry does.
    ``run_options`` go to ``RunConfig`` (e.g. ``checkpoint_config``); a
    ``dataset_config`` key goes to the trainer.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    runs_uri = storage.join(root, "runs")
    runs_fs, runs_path = (None, runs_uri) if storage.is_local(root) else storage.filesystem(runs_uri)
    dataset_config = run_options.pop("dataset_config", None)
    return TorchTrainer(
        loop,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.ray_num_workers(),
            elastic_resize_monitor_interval_s=scaling.elastic_resize_interval_s,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker, **scaling.resources_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=runs_path,
            storage_filesystem=runs_fs,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            **run_options,
        ),
        datasets=datasets,
        **({"dataset_config": dataset_config} if dataset_config is not None else {}),
    )
