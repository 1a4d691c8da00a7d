"""Embedding deployment: registry embedding models on demand, ``@serve.batch``.

Concurrent requests (any mix of models) are merged into one forward pass per
model; pooling and normalisation match sentence-transformers.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from ray import serve

from maas_ray.registry import Registry
from maas_ray.serve.loading import load_version
from maas_ray.serve.metrics import observe_batch, track_ongoing

MAX_EMBEDDERS_PER_REPLICA = int(os.environ.get("MAAS_MAX_EMBEDDERS_PER_REPLICA", "2"))


@serve.deployment(max_ongoing_requests=128, max_queued_requests=1024, ray_actor_options={"num_cpus": 0.25})
class EmbeddingServer:
    def __init__(self, storage_root: str, max_batch_size: int = 32,
                 batch_wait_timeout_s: float = 0.01) -> None:
        self.registry = Registry(storage_root)
        self.embed_batch.set_max_batch_size(max_batch_size)
        self.embed_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.multiplexed(max_num_models_per_replica=MAX_EMBEDDERS_PER_REPLICA)
    async def get_model(self, model_id: str) -> Any:
        """An Embedder, or a TextClassifier for fine-tuned classifiers (same encoders)."""
        from maas_ray.engines import Embedder, TextClassifier

        task = (await asyncio.to_thread(self.registry.get, model_id)).task
        return await load_version(self.registry, model_id,
                                  TextClassifier if task == "text-classification" else Embedder)

    @track_ongoing("embedder")
    async def classify(self, model_id: str, texts: list[str],
                       tokens_left: int | None = None) -> dict[str, Any]:
        """Labels and probabilities, and the tokens read (metered); ``tokens_left``: the API
        key's daily budget, which the texts must fit or they are not run."""
        model = await self.get_model(model_id)
        tokens = await asyncio.to_thread(count_tokens, model, texts)
        if tokens_left is not None and tokens > tokens_left:
            return over_budget(tokens, tokens_left)
        labels, probs = await asyncio.to_thread(model.classify, texts)
        return {"predictions": labels, "probabilities": probs, "classes": model.classes,
                "prompt_tokens": tokens}

    @track_ongoing("embedder")
    async def embed(self, model_id: str, texts: list[str], dimensions: int | None,
                    tokens_left: int | None = None) -> dict[str, Any]:
        model = await self.get_model(model_id)
        if dimensions is not None and dimensions > model.dimensions:
            return {"error": f"dimensions={dimensions} exceeds the model's {model.dimensions}",
                    "param": "dimensions"}
        if tokens_left is not None:  # counted before the forward pass, which costs far more
            tokens = await asyncio.to_thread(count_tokens, model, texts)
            if tokens > tokens_left:
                return over_budget(tokens, tokens_left)
        return await self.embed_batch(model_id, texts, dimensions)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def embed_batch(self, model_ids: list[str], texts: list[list[str]],
                          dimensions: list[int | None]) -> list[dict[str, Any]]:
        out: list[dict[str, Any] | None] = [None] * len(texts)
        for model_id in dict.fromkeys(model_ids):
            idx = [i for i, m in enumerate(model_ids) if m == model_id]
            observe_batch("embedder", model_id, len(idx))
            model = await self.get_model(model_id)
            flat = [t for i in idx for t in texts[i]]
            vectors, tokens = await asyncio.to_thread(model.embed, flat, None)  # (N, D), [N]
            start = 0
            for i in idx:
                n = len(texts[i])
                vecs = vectors[start:start + n]
                if dimensions[i]:  # Matryoshka-style truncation, renormalised
                    import numpy as np

                    vecs = vecs[:, : dimensions[i]]
                    vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True).clip(min=1e-12)
                out[i] = {"embeddings": vecs, "prompt_tokens": int(sum(tokens[start:start + n]))}
                start += n
        return out  # type: ignore[return-value]


def count_tokens(model: Any, texts: list[str]) -> int:
    """Tokens the model reads for ``texts``, after truncation (as it runs them)."""
    if not texts:
        return 0
    ids = model.tokenizer(texts, truncation=True, max_length=model.max_length)["input_ids"]
    return sum(len(row) for row in ids)


def over_budget(tokens: int, tokens_left: int) -> dict[str, Any]:
    return {"error": f"the input has {tokens} tokens, more than the API key's daily budget has "
                     f"left ({tokens_left})", "code": "insufficient_quota", "status": 429}
