"""Checkpoints as models: ``ft:{base}:{suffix}:{job_id}:ckpt-step-{N}``, as OpenAI serves them.

A fine-tuning job keeps its last few checkpoints (Ray Train's, under
``{storage}/runs/{job_id}/``), each a complete Hugging Face folder (weights or a LoRA
adapter, and the tokenizer) beside the state only a restart needs. When the job
publishes its model, the model's card lists them (:func:`describe`: step, epoch,
metrics, where, and a sha256 of every model file). Resolving a checkpoint's id reads
that card (:func:`checkpoint_version`): no weights are copied into ``models/``, the
checkpoint is checksummed like any version when it is loaded, and it belongs to whoever
owns the model (its card's ``tenant``), so every tenant check holds for it unchanged.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pyarrow.fs as pafs

from maas_ray import storage
from maas_ray.registry.refs import checkpoint_name
from maas_ray.registry.store import ModelNotFound, ModelVersion

# What a checkpoint's card takes from its model's card: what loading and serving read,
# who owns it, and where it came from. Weights files, GGUF exports, loss curves and
# final metrics are the published model's, not the checkpoint's.
_INHERITED = ("task", "format", "base_model", "architecture", "context_length", "owned_by",
              "tenant", "fine_tuning_job", "method", "hyperparameters", "seed", "data", "lora",
              "dpo", "classes", "spec")


class CheckpointNotKept(ModelNotFound):
    """A fine-tuned model that kept no checkpoint at that step. ``card`` is the model's,
    so a caller can tell its owner which steps were kept and everyone else nothing."""

    def __init__(self, message: str, card: dict[str, Any]) -> None:
        super().__init__(message)
        self.card = card


def describe(checkpoints: list[dict[str, Any]], scaffold: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The card entries of a job's kept checkpoints (``{"uri", "step", "epoch", ...metrics}``
    each, as training reports them), oldest first; ``scaffold`` names files that are not
    part of the model (optimizer state), which are neither checksummed nor needed."""
    out = []
    for ckpt in sorted(checkpoints, key=lambda c: c.get("step", 0)):
        fs, path = storage.filesystem(ckpt["uri"])
        files = {}
        for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
            name = info.path[len(path):].lstrip("/")
            if info.is_file and name not in scaffold and not name.startswith("."):
                files[name] = _sha256(fs, info.path)
        metrics = {k: ckpt[k] for k in ("train_loss", "valid_loss", "valid_accuracy") if k in ckpt}
        out.append({"step": int(ckpt.get("step", 0)), "epoch": int(ckpt.get("epoch", 0)),
                    "uri": ckpt["uri"], "metrics": metrics, "files": files})
    return out


def _sha256(fs: Any, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def kept_steps(card: dict[str, Any]) -> list[int]:
    return [int(c["step"]) for c in card.get("checkpoints", [])]


def checkpoint_version(model: ModelVersion, step: int) -> ModelVersion:
    """The checkpoint of ``model`` at ``step``, as a version of its own name (same version
    number); :class:`CheckpointNotKept` if the job did not keep that step."""
    name = checkpoint_name(model.name, step)
    for entry in model.card.get("checkpoints", []):
        if int(entry["step"]) == step:
            card = {k: model.card[k] for k in _INHERITED if k in model.card}
            card.update(name=name, created_at=model.card.get("created_at"), checkpoint_of=model.id,
                        checkpoint={"step": step, "epoch": entry.get("epoch")},
                        metrics=entry.get("metrics", {}), files=entry.get("files", {}))
            return ModelVersion(name, model.version, entry["uri"], card)
    kept = ", ".join(map(str, kept_steps(model.card))) or "none"
    raise CheckpointNotKept(f"model {model.id!r} kept no checkpoint at step {step} "
                            f"(kept steps: {kept})", model.card)
