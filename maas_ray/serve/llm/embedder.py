"""Sentence embeddings: mean pooling over real tokens, then L2 normalisation.

This is what sentence-transformers does for all-MiniLM-L6-v2 (its
``1_Pooling`` config is mean pooling, followed by a ``Normalize`` module).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class Embedder:
    def __init__(self, model_dir: Path | str) -> None:
        from transformers import AutoModel, AutoTokenizer

        kwargs = {"local_files_only": True, "trust_remote_code": False}
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), **kwargs)
        self.model = AutoModel.from_pretrained(str(model_dir), **kwargs).eval()
        self.dimensions = int(self.model.config.hidden_size)
        limit = getattr(self.model.config, "max_position_embeddings", 512)
        self.max_length = min(int(self.tokenizer.model_max_length or limit), int(limit))

    @torch.inference_mode()
    def embed(self, texts: list[str], dimensions: int | None = None) -> tuple[np.ndarray, list[int]]:
        """``texts`` → (``(N, D)`` float32 unit vectors, tokens per text)."""
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        hidden = self.model(**batch).last_hidden_state  # (N, T, D)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (N, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (N, D)
        if dimensions is not None:
            pooled = pooled[:, :dimensions]
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.float().numpy(), batch["attention_mask"].sum(1).tolist()
