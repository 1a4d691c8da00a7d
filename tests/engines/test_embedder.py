"""MiniLM embeddings match sentence-transformers' recipe computed independently
and rank sentences sensibly."""

from __future__ import annotations

import numpy as np
import torch

from maas_ray.registry.importer import BASE_MODELS
from maas_ray.engines import Embedder

EMB = "all-minilm-l6-v2"
SENTENCES = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today.",
             "The weather is lovely. " * 80]  # ~480 tokens: truncated to 256 like sentence-transformers


def _reference(texts: list[str]) -> np.ndarray:
    """all-MiniLM-L6-v2 by hand from the package's own folder: one text at a time (no
    padding), first 256 tokens, mean over tokens, unit length."""
    from transformers import AutoModel, AutoTokenizer

    folder = str(BASE_MODELS[EMB].folder())
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    out = []
    for text in texts:
        batch = tok(text, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state[0].numpy()  # (T, D)
        vec = hidden.mean(axis=0)
        out.append(vec / np.linalg.norm(vec))
    return np.stack(out)


def test_matches_reference_and_ranks_similar_sentences(llm_dirs: dict[str, str]) -> None:
    emb = Embedder(llm_dirs[EMB], batch_size=3)  # 4 texts: two forward passes
    assert (emb.pooling, emb.normalize, emb.max_length, emb.dimensions) == ("mean", True, 256, 384)
    vectors, tokens = emb.embed(SENTENCES)
    assert vectors.shape == (4, 384) and vectors.dtype == np.float32
    assert all(t > 3 for t in tokens) and tokens[3] == 256
    cosine = (vectors * _reference(SENTENCES)).sum(axis=1)
    assert cosine.min() >= 0.999, cosine
    sims = vectors[:3] @ vectors[:3].T
    assert sims[0, 1] > 0.5 > sims[0, 2] and sims[0, 1] > sims[1, 2]
    short, _ = emb.embed(SENTENCES[:1], dimensions=64)
    assert short.shape == (1, 64) and abs(np.linalg.norm(short) - 1) < 1e-5
    assert emb.embed([])[0].shape == (0, 384)
