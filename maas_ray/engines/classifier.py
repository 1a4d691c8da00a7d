"""Text classifiers (fine-tuned encoders): texts → labels and class probabilities.

Served by the embedding deployment, which already holds encoders of the same
size and shape; the label names come from the model's own ``id2label``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class TextClassifier:
    """A sequence-classification model and its tokenizer; ``classify`` is stateless."""

    def __init__(self, model_dir: Path | str, device: str = "cpu", batch_size: int = 64) -> None:
        import json

        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(model_dir)
        kwargs = {"local_files_only": True, "trust_remote_code": False}
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
        self.model = AutoModelForSequenceClassification.from_pretrained(str(folder), use_safetensors=True, **kwargs).to(device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size
        config = self.model.config
        self.classes = [config.id2label[i] for i in range(config.num_labels)]
        limits = [getattr(config, "max_position_embeddings", None),
                  getattr(self.tokenizer, "model_max_length", None)]
        st_config = folder / "sentence_bert_config.json"
        if st_config.is_file():
            limits.append(json.loads(st_config.read_text()).get("max_seq_length"))
        self.max_length = int(min(v for v in limits if v))

    @torch.inference_mode()
    def classify(self, texts: list[str]) -> tuple[list[str], np.ndarray]:
        """(labels, probabilities (N, C)) for ``texts``; long texts are truncated."""
        probs = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            probs.append(torch.softmax(self.model(**enc).logits.float(), dim=-1).cpu().numpy())
        p = np.concatenate(probs) if probs else np.zeros((0, len(self.classes)))
        return [self.classes[i] for i in p.argmax(axis=1)], p
