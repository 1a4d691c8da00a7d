"""Ray Train jobs: data-parallel training loops and the driver that runs them."""

from maas_ray.train.run import TrainResult, run_training

__all__ = ["TrainResult", "run_training"]
