"""Text generation, embedding and classification engines: plain Python, no Serve in them.

Serve replicas (``maas_ray.serve``) run them behind the HTTP routes, and Ray Data
workers can run the same code offline. Import cost matters in replicas, so heavy
modules (torch, transformers) load only when one of these names is first used.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from maas_ray.engines.classifier import TextClassifier
    from maas_ray.engines.embedder import Embedder
    from maas_ray.engines.engine import (EngineClosed, GenerationChunk, GenerationEngine,
                                           SamplingParams)
    from maas_ray.engines.llamacpp_engine import LlamaCppEngine
    from maas_ray.engines.transformers_engine import TransformersEngine

_WHERE = {
    "Embedder": "embedder",
    "EngineClosed": "engine",
    "GenerationChunk": "engine",
    "GenerationEngine": "engine",
    "LlamaCppEngine": "llamacpp_engine",
    "SamplingParams": "engine",
    "TextClassifier": "classifier",
    "TransformersEngine": "transformers_engine",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
