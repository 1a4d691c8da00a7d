"""The tabular predictor deployment: registry versions loaded on demand, batched.

``@serve.multiplexed`` keeps up to ``MAX_MODELS_PER_REPLICA`` models per replica
(LRU) and routes a model's requests to replicas that already hold it; a
:class:`~maas_ray.serve.batcher.ContinuousBatcher` merges concurrent requests
(any mix of models and versions) into one forward pass per model.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import numpy as np
from ray import serve

from maas_ray.models.tabular import TabularModel
from maas_ray.registry import Registry
from maas_ray.serve.batcher import ContinuousBatcher
from maas_ray.serve.loading import load_version
from maas_ray.serve.metrics import observe_batch, track_ongoing

MAX_MODELS_PER_REPLICA = int(os.environ.get("MAAS_MAX_MODELS_PER_REPLICA", "16"))
Answer = dict[str, Any] | Exception  # one request's predictions, or what failed it


@serve.deployment(
    # Batches only fill if enough requests reach a replica (ray-project/ray#43288).
    max_ongoing_requests=256,
    max_queued_requests=2048,  # then 503 + Retry-After
    ray_actor_options={"num_cpus": 0.25},
)
class Predictor:
    def __init__(self, storage_root: str, max_batch_size: int = 64,
                 batch_wait_timeout_s: float = 0.005) -> None:
        self.registry = Registry(storage_root)
        self.batcher: ContinuousBatcher[tuple[str, np.ndarray], dict[str, Any]] = ContinuousBatcher(
            self.predict_batch, max_batch_size, batch_wait_timeout_s)

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def get_model(self, model_id: str) -> TabularModel:
        return await load_version(self.registry, model_id, TabularModel.load)

    @track_ongoing("predictor")
    async def predict(self, model_id: str, rows: np.ndarray) -> dict[str, Any]:
        """Raw rows ``(B, F)`` of one model → predictions (and class probabilities)."""
        return await self.batcher.submit((model_id, rows))

    async def predict_batch(self, items: list[tuple[str, np.ndarray]]) -> list[Answer]:
        """One forward pass per model over all its requests' rows; a model that fails to
        load or run, or rows it cannot take, fail only their own requests."""
        out: list[Answer] = [RuntimeError("not answered")] * len(items)
        for model_id in dict.fromkeys(m for m, _ in items):
            idx = [i for i, (m, _) in enumerate(items) if m == model_id]
            try:  # e.g. a version removed from the registry meanwhile
                answers = await self._forward(model_id, [items[i][1] for i in idx])
            except Exception as err:
                answers = [err] * len(idx)
            for i, answer in zip(idx, answers):
                out[i] = answer
        return out

    async def _forward(self, model_id: str, requests: list[np.ndarray]) -> list[Answer]:
        model = await self.get_model(model_id)
        answers: list[Answer] = [RuntimeError("not answered")] * len(requests)
        fit = []
        for j, rows in enumerate(requests):  # the ingress checks shapes; a direct caller may not
            if rows.ndim == 2 and rows.shape[1] == model.n_features:
                fit.append(j)
            else:
                answers[j] = ValueError(f"model {model_id!r} expects rows of {model.n_features} "
                                        f"features, got shape {tuple(rows.shape)}")
        if not fit:
            return answers
        observe_batch("predictor", model_id, len(fit))
        # In a thread: torch releases the GIL, so the event loop keeps taking requests.
        raw = await asyncio.to_thread(model.forward_raw,
                                      np.concatenate([requests[j] for j in fit], axis=0))  # (N, out)
        preds = model.preprocessor.inverse_y(raw)
        probs = None
        if model.preprocessor.task == "classification":
            e = np.exp(raw - raw.max(axis=-1, keepdims=True))
            probs = e / e.sum(axis=-1, keepdims=True)
        start = 0
        for j in fit:
            n = len(requests[j])
            item: dict[str, Any] = {"predictions": preds[start:start + n]}
            if probs is not None:
                item["probabilities"] = probs[start:start + n]
            answers[j] = item
            start += n
        return answers
