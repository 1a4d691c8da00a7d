"""Model definitions shared by training, the registry and serving."""

from maas_ray.models.tabular import TabularModel, build_module

__all__ = ["TabularModel", "build_module"]
