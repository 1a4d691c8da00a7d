"""Which generation engine serves a chat model: its weight formats, the hardware, the app config.

``auto`` (the default) picks llama.cpp for a version that has GGUF weights on
a replica without a GPU (when llama-cpp-python is installed): on CPU it is
several times faster than transformers. Everything else — GPUs, versions
without a GGUF — goes to transformers. ``AppArgs.llm.engine`` changes the
default and ``AppArgs.llm.model_engines`` pins single models (by name or
``name:version``), e.g. to compare both engines on one model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from maas_ray.registry.gguf_export import gguf_file, weight_formats

if TYPE_CHECKING:
    from maas_ray.registry import ModelVersion, Registry
    from maas_ray.engines.engine import GenerationEngine

EngineChoice = Literal["auto", "transformers", "llama.cpp"]
Engine = Literal["transformers", "llama.cpp"]


class EngineUnavailable(ValueError):
    """The configured engine cannot serve this model version (the message says why)."""


@dataclass(frozen=True)
class EngineConfig:
    """The LLM deployment's engine settings (``AppArgs.llm``)."""

    engine: EngineChoice = "auto"
    model_engines: dict[str, EngineChoice] = field(default_factory=dict)
    max_batch_size: int = 16
    llama_cpp_threads: int | None = None
    max_request_share: float = 0.5
    adapter_cache_max_bytes: int = 256 * 2**20

    def requested(self, mv: ModelVersion) -> EngineChoice:
        """A pin for this exact version, else for the model name, else the default."""
        return self.model_engines.get(mv.id) or self.model_engines.get(mv.name) or self.engine


def choose_engine(mv: ModelVersion, requested: EngineChoice, gpu: bool, llama_cpp: bool) -> Engine:
    """The engine for ``mv``; :class:`EngineUnavailable` if ``requested`` cannot serve it."""
    gguf = gguf_file(mv.card)
    # Safetensors, or a LoRA adapter merged into its base at load: transformers reads both.
    hf = any(f != "gguf" for f in weight_formats(mv.card))
    if requested == "auto":
        if gguf and llama_cpp and (not gpu or not hf):
            return "llama.cpp"
        if hf:
            return "transformers"
        requested = "llama.cpp"  # GGUF only: say why llama.cpp cannot run it
    if requested == "llama.cpp":
        if not gguf:
            raise EngineUnavailable(
                f"model {mv.id!r} has no GGUF weights for the llama.cpp engine; add them with "
                f"`maas models export-gguf {mv.id}` or serve it with transformers")
        if not llama_cpp:
            from maas_ray.engines.llamacpp_engine import INSTALL_HINT

            raise EngineUnavailable(f"model {mv.id!r} needs the llama.cpp engine, which is not "
                                    f"installed: {INSTALL_HINT}")
        return "llama.cpp"
    if not hf:
        raise EngineUnavailable(f"model {mv.id!r} has only GGUF weights; the transformers engine "
                                "needs safetensors (import it with --weights both)")
    return "transformers"


def engine_loader(mv: ModelVersion, config: EngineConfig) -> Callable[[Path], GenerationEngine]:
    """What ``load_version`` calls with the version's local folder to build its engine."""
    from maas_ray.engines.llamacpp_engine import llama_cpp_available

    gpu = _has_gpu()
    engine = choose_engine(mv, config.requested(mv), gpu, llama_cpp_available())
    if engine == "llama.cpp":
        from maas_ray.engines.llamacpp_engine import LlamaCppEngine

        name = gguf_file(mv.card)
        return lambda path: LlamaCppEngine(path / str(name), tokenizer_dir=path,
                                           max_batch_size=config.max_batch_size,
                                           n_threads=config.llama_cpp_threads,
                                           max_request_share=config.max_request_share)
    from maas_ray.engines.transformers_engine import TransformersEngine

    device = "cuda" if gpu else "cpu"
    return lambda path: TransformersEngine(path, device=device, max_batch_size=config.max_batch_size,
                                           max_request_share=config.max_request_share,
                                           adapter_cache_max_bytes=config.adapter_cache_max_bytes)


def adapter_base(registry: Registry, mv: ModelVersion, config: EngineConfig) -> ModelVersion | None:
    """The base version whose engine serves LoRA chat version ``mv`` as an adapter, or None.

    When the transformers engine runs both the adapter and its base, the adapter joins
    the base's engine (:mod:`maas_ray.engines.adapters`): one base in memory for every
    fine-tune of it, rows of all of them in one batch. Otherwise (llama.cpp chosen for
    either, a GGUF-only base) the version is merged into its base and served alone."""
    from maas_ray.registry.adapters import is_adapter

    if not is_adapter(mv) or mv.task != "chat" or "base_model" not in mv.card:
        return None
    base = registry.get(mv.card["base_model"])
    llama_cpp = _llama_cpp_available()
    gpu = _has_gpu()
    try:
        engines = {choose_engine(v, config.requested(v), gpu, llama_cpp) for v in (mv, base)}
    except EngineUnavailable:
        return None
    return base if engines == {"transformers"} else None


def _llama_cpp_available() -> bool:
    from maas_ray.engines.llamacpp_engine import llama_cpp_available

    return llama_cpp_available()


def _has_gpu() -> bool:
    """GPUs Ray gave this replica (none outside Ray)."""
    import ray

    return ray.is_initialized() and bool(ray.get_gpu_ids())
