"""Typed specs for every job, loaded from YAML or HTTP and validated once."""

from maas_ray.config.finetune import FineTuneSpec
from maas_ray.config.load import SpecError, load_any_spec, load_spec, parse_spec
from maas_ray.config.specs import (
    DataSpec,
    ModelSpec,
    ScalingSpec,
    TrainingSpec,
    TrainSpec,
)

__all__ = [
    "DataSpec",
    "FineTuneSpec",
    "ModelSpec",
    "ScalingSpec",
    "SpecError",
    "TrainSpec",
    "TrainingSpec",
    "load_any_spec",
    "load_spec",
    "parse_spec",
]
