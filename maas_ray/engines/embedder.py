"""Sentence embeddings the way sentence-transformers computes them.

For all-MiniLM-L6-v2 that is: truncate to 256 tokens (``sentence_bert_config``,
not BERT's 512), mean-pool the last hidden state over real tokens
(``1_Pooling``), then L2-normalise (``2_Normalize``). The importer copies those
config files next to the weights; a plain HF folder without them gets mean
pooling + normalisation, the common recipe.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

_POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                  "pooling_mode_max_tokens": "max"}


def _read_json(path: Path) -> dict | list | None:
    return json.loads(path.read_text()) if path.is_file() else None


class Embedder:
    """An encoder model plus its pooling; ``embed`` is thread-safe (no state)."""

    def __init__(self, model_dir: Path | str, device: str = "cpu", batch_size: int = 64) -> None:
        from transformers import AutoModel, AutoTokenizer

        folder = Path(model_dir)
        kwargs = {"local_files_only": True, "trust_remote_code": False}
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
        self.model = AutoModel.from_pretrained(str(folder), use_safetensors=True, **kwargs).to(device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.dimensions = int(self.model.config.hidden_size)

        limits = [getattr(self.model.config, "max_position_embeddings", None),
                  getattr(self.tokenizer, "model_max_length", None)]
        st_config = _read_json(folder / "sentence_bert_config.json") or {}
        limits.append(st_config.get("max_seq_length"))
        self.max_length = int(min(v for v in limits if v))

        pooling = _read_json(folder / "1_Pooling" / "config.json") or {"pooling_mode_mean_tokens": True}
        modes = [mode for key, mode in _POOLING_MODES.items() if pooling.get(key)]
        if len(modes) != 1:
            raise ValueError(f"{folder}: unsupported pooling config {pooling}")
        self.pooling = modes[0]
        modules = _read_json(folder / "modules.json")
        self.normalize = modules is None or any(
            m.get("type", "").endswith("Normalize") for m in modules)  # type: ignore[union-attr]
        logger.info("embedder %s: %s pooling, normalize=%s, max_length=%d",
                    folder, self.pooling, self.normalize, self.max_length)

    @torch.inference_mode()
    def embed(self, texts: list[str], dimensions: int | None = None) -> tuple[np.ndarray, list[int]]:
        """``texts`` → (``(N, D)`` float32 vectors, tokens per text after truncation).

        ``dimensions`` keeps the first D components (then re-normalises), as
        OpenAI's ``dimensions`` parameter does.
        """
        vectors, counts = [], []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state  # (N, T, D)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (N, T, 1)
            if self.pooling == "mean":
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (N, D)
            elif self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                pooled = hidden.masked_fill(mask == 0, float("-inf")).amax(1)
            if dimensions is not None:
                pooled = pooled[:, :dimensions]
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            vectors.append(pooled.float().cpu().numpy())
            counts += batch["attention_mask"].sum(1).tolist()
        width = self.dimensions if dimensions is None else min(dimensions, self.dimensions)
        out = np.concatenate(vectors) if vectors else np.zeros((0, width), dtype=np.float32)
        return out, counts
