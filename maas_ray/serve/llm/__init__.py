"""Text generation and embedding engines that run inside model replicas."""

from maas_ray.serve.llm.embedder import Embedder
from maas_ray.serve.llm.engine import GenerationChunk, GenerationEngine, SamplingParams
from maas_ray.serve.llm.transformers_engine import TransformersEngine

__all__ = ["Embedder", "GenerationChunk", "GenerationEngine", "SamplingParams", "TransformersEngine"]
