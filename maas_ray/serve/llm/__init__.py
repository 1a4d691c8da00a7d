"""Text generation and embedding engines that run inside model replicas.

Import cost matters in Serve replicas, so heavy modules (torch, transformers)
load only when one of these names is first used.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from maas_ray.serve.llm.classifier import TextClassifier
    from maas_ray.serve.llm.embedder import Embedder
    from maas_ray.serve.llm.engine import (EngineClosed, GenerationChunk, GenerationEngine,
                                           SamplingParams)
    from maas_ray.serve.llm.llamacpp_engine import LlamaCppEngine
    from maas_ray.serve.llm.transformers_engine import TransformersEngine

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
