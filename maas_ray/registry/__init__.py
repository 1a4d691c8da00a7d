"""Versioned models under ``{storage}/models/{name}/{version}/``."""

from maas_ray.registry.refs import InvalidModelName, ModelRef
from maas_ray.registry.store import ModelNotFound, ModelVersion, Registry, TamperedModel

__all__ = [
    "InvalidModelName",
    "ModelNotFound",
    "ModelRef",
    "ModelVersion",
    "Registry",
    "TamperedModel",
]
