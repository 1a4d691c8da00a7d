"""MiniLM embeddings match a reference mean-pooled computation and rank sentences sensibly."""

from __future__ import annotations

import numpy as np
import torch

from maas_ray.registry.importer import BASE_MODELS
from maas_ray.serve.llm import Embedder

SENTENCES = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today."]


def _reference(texts: list[str]) -> np.ndarray:
    """sentence-transformers' recipe, computed independently from the package's own folder."""
    from transformers import AutoModel, AutoTokenizer

    folder = str(BASE_MODELS["all-minilm-l6-v2"].folder())
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    out = []
    for text in texts:  # one at a time: no padding involved
        batch = tok(text, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state[0].numpy()  # (T, D)
        vec = hidden.mean(axis=0)
        out.append(vec / np.linalg.norm(vec))
    return np.stack(out)


def test_matches_reference_and_ranks_similar_sentences(base_models: dict[str, str]) -> None:
    emb = Embedder(base_models["all-minilm-l6-v2"])
    vectors, tokens = emb.embed(SENTENCES)
    assert vectors.shape == (3, 384) and all(t > 3 for t in tokens)
    ref = _reference(SENTENCES)
    cosine = (vectors * ref).sum(axis=1)
    assert cosine.min() >= 0.999, cosine
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
    short, _ = emb.embed(SENTENCES[:1], dimensions=64)
    assert short.shape == (1, 64) and abs(np.linalg.norm(short) - 1) < 1e-5
