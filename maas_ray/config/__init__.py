"""Typed specs for every job, loaded from YAML or HTTP and validated once."""

from maas_ray.config.load import SpecError, load_spec, parse_spec
from maas_ray.config.specs import (
    DataSpec,
    ModelSpec,
    ScalingSpec,
    TrainingSpec,
    TrainSpec,
)

__all__ = [
    "DataSpec",
    "ModelSpec",
    "ScalingSpec",
    "SpecError",
    "TrainSpec",
    "TrainingSpec",
    "load_spec",
    "parse_spec",
]
