"""LoRA versions: stored as small adapters, served as merged models.

A LoRA fine-tune publishes only its adapter (a few MB instead of the base's
538 MB) plus the tokenizer; its card names the exact base version. Serving
merges the adapter into a copy of the base once per machine and caches the
result, so every engine (transformers, or llama.cpp through a GGUF export)
loads a plain Hugging Face folder. Replicas then hold merged weights per
model: memory is not shared between adapters of one base (yet).
"""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path

from maas_ray.registry.store import _CACHE, ModelVersion, Registry

logger = logging.getLogger(__name__)

LORA_FORMAT = "peft-lora"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                    "special_tokens_map.json", "vocab.txt", "sentence_bert_config.json")


def is_adapter(mv: ModelVersion) -> bool:
    return mv.card.get("format") == LORA_FORMAT


def model_dir(registry: Registry, mv: ModelVersion) -> Path:
    """A local Hugging Face folder for ``mv``: its own files, or for an adapter the
    merged model (built on first use, then cached)."""
    local = registry.local_dir(mv)
    if not is_adapter(mv):
        return local
    key = registry._cache_key(mv)  # noqa: SLF001 - same identity as the file cache
    merged = _CACHE / "merged" / mv.name / f"{mv.version}-{key}"
    if (merged / "config.json").is_file():
        return merged
    base = registry.get(mv.card["base_model"])
    base_dir = registry.local_dir(base)
    tmp = merged.with_name(f".{merged.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        merge_adapter(base_dir, local, tmp, task=mv.task, classes=mv.card.get("classes"))
        try:
            tmp.rename(merged)
        except OSError:  # another replica on this machine merged it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("merged LoRA %s into %s", mv.id, base.id)
    return merged


def merge_adapter(base_dir: Path, adapter_dir: Path, out: Path, task: str = "chat",
                  classes: list[str] | None = None) -> None:
    """Write base + adapter, merged, as a plain safetensors folder into ``out``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if task == "chat" else AutoModelForSequenceClassification
    kwargs = {"local_files_only": True, "trust_remote_code": False, "dtype": torch.float32}
    if classes:  # a classifier's head has one output per class, named as in training
        kwargs.update(num_labels=len(classes), id2label=dict(enumerate(classes)),
                      label2id={c: i for i, c in enumerate(classes)})
    base = cls.from_pretrained(str(base_dir), use_safetensors=True, **kwargs)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False).merge_and_unload()
    model.save_pretrained(str(out), safe_serialization=True)
    for name in _TOKENIZER_FILES:
        source = adapter_dir / name if (adapter_dir / name).is_file() else base_dir / name
        if source.is_file():
            shutil.copy2(source, out / name)
    if (base_dir / "generation_config.json").is_file():
        shutil.copy2(base_dir / "generation_config.json", out / "generation_config.json")
    for gguf in adapter_dir.glob("*.gguf"):  # exported at publish time from these same weights
        shutil.copy2(gguf, out / gguf.name)
