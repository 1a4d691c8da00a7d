"""Embedding deployment: registry embedding models on demand, continuously batched.

Concurrent requests (any mix of models) are merged into one forward pass per
model (:class:`~maas_ray.serve.batcher.ContinuousBatcher`); pooling and
normalisation match sentence-transformers.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import numpy as np
from ray import serve

from maas_ray.auth.ledger import seconds_to_midnight
from maas_ray.registry import Registry
from maas_ray.serve.batcher import ContinuousBatcher
from maas_ray.serve.errors import APIError
from maas_ray.serve.loading import load_version
from maas_ray.serve.metrics import observe_batch, track_ongoing

MAX_EMBEDDERS_PER_REPLICA = int(os.environ.get("MAAS_MAX_EMBEDDERS_PER_REPLICA", "2"))


@serve.deployment(max_ongoing_requests=128, max_queued_requests=1024, ray_actor_options={"num_cpus": 0.25})
class EmbeddingServer:
    def __init__(self, storage_root: str, max_batch_size: int = 32,
                 batch_wait_timeout_s: float = 0.01) -> None:
        self.registry = Registry(storage_root)
        self.batcher: ContinuousBatcher[tuple[str, list[str], int | None], dict[str, Any]] = \
            ContinuousBatcher(self.embed_batch, max_batch_size, batch_wait_timeout_s)

    @serve.multiplexed(max_num_models_per_replica=MAX_EMBEDDERS_PER_REPLICA)
    async def get_model(self, model_id: str) -> Any:
        """An Embedder, or a TextClassifier for fine-tuned classifiers (same encoders)."""
        from maas_ray.engines import Embedder, TextClassifier

        task = (await asyncio.to_thread(self.registry.get, model_id)).task
        return await load_version(self.registry, model_id,
                                  TextClassifier if task == "text-classification" else Embedder)

    @track_ongoing("embedder")
    async def classify(self, model_id: str, texts: list[str],
                       tokens_left: int | None = None) -> dict[str, Any] | APIError:
        """Labels and probabilities, and the tokens read (metered); ``tokens_left``: the API
        key's daily budget, which the texts must fit or they are not run."""
        model = await self.get_model(model_id)
        tokens = await asyncio.to_thread(count_tokens, model, texts)
        if tokens_left is not None and tokens > tokens_left:
            return over_budget(tokens, tokens_left, "inputs")
        labels, probs = await asyncio.to_thread(model.classify, texts)
        return {"predictions": labels, "probabilities": probs, "classes": model.classes,
                "prompt_tokens": tokens}

    @track_ongoing("embedder")
    async def embed(self, model_id: str, texts: list[str], dimensions: int | None,
                    tokens_left: int | None = None) -> dict[str, Any] | APIError:
        model = await self.get_model(model_id)
        if dimensions is not None and dimensions > model.dimensions:
            return APIError(400, f"dimensions={dimensions} exceeds the model's {model.dimensions}",
                            "dimensions", "invalid_value")
        if tokens_left is not None:  # counted before the forward pass, which costs far more
            tokens = await asyncio.to_thread(count_tokens, model, texts)
            if tokens > tokens_left:
                return over_budget(tokens, tokens_left, "input")
        return await self.batcher.submit((model_id, texts, dimensions))

    async def embed_batch(self, items: list[tuple[str, list[str], int | None]]
                          ) -> list[dict[str, Any] | Exception]:
        """One forward pass per model over all its requests' texts; a model that fails to
        load or run fails only its own requests."""
        out: list[dict[str, Any] | Exception] = [RuntimeError("not answered")] * len(items)
        for model_id in dict.fromkeys(m for m, _, _ in items):
            idx = [i for i, (m, _, _) in enumerate(items) if m == model_id]
            try:
                model = await self.get_model(model_id)
                observe_batch("embedder", model_id, len(idx))
                flat = [t for i in idx for t in items[i][1]]
                # In a thread: torch releases the GIL, so the event loop keeps taking requests.
                vectors, tokens = await asyncio.to_thread(model.embed, flat, None)  # (N, D), [N]
            except Exception as err:
                for i in idx:
                    out[i] = err
                continue
            start = 0
            for i in idx:
                n, dims = len(items[i][1]), items[i][2]
                vecs = vectors[start:start + n]
                if dims:  # Matryoshka-style truncation, renormalised
                    vecs = vecs[:, :dims]
                    vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True).clip(min=1e-12)
                out[i] = {"embeddings": vecs, "prompt_tokens": int(sum(tokens[start:start + n]))}
                start += n
        return out


def count_tokens(model: Any, texts: list[str]) -> int:
    """Tokens the model reads for ``texts``, after truncation (as it runs them)."""
    if not texts:
        return 0
    ids = model.tokenizer(texts, truncation=True, max_length=model.max_length)["input_ids"]
    return sum(len(row) for row in ids)


def over_budget(tokens: int, tokens_left: int, param: str) -> APIError:
    return APIError(429, f"the input has {tokens} tokens, more than the API key's daily budget has "
                         f"left ({tokens_left})", param, "insufficient_quota",
                    {"Retry-After": str(seconds_to_midnight())})
