"""The tabular predictor deployment: registry versions loaded on demand, batched.

``@serve.multiplexed`` keeps up to ``MAX_MODELS_PER_REPLICA`` models per replica
(LRU) and routes a model's requests to replicas that already hold it;
``@serve.batch`` merges concurrent requests (any mix of models) into one forward
pass per model.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import numpy as np
from ray import serve

from maas_ray.models.tabular import TabularModel
from maas_ray.registry import Registry
from maas_ray.serve.loading import load_version
from maas_ray.serve.metrics import observe_batch, track_ongoing

MAX_MODELS_PER_REPLICA = int(os.environ.get("MAAS_MAX_MODELS_PER_REPLICA", "16"))


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
        self.predict_batch.set_max_batch_size(max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def get_model(self, model_id: str) -> TabularModel:
        return await load_version(self.registry, model_id, TabularModel.load)

    @track_ongoing("predictor")
    async def predict(self, model_id: str, rows: np.ndarray) -> dict[str, Any]:
        """Raw rows ``(B, F)`` of one model → predictions (and class probabilities)."""
        return await self.predict_batch(model_id, rows)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def predict_batch(self, model_ids: list[str], rows: list[np.ndarray]) -> list[dict[str, Any]]:
        out: list[dict[str, Any] | None] = [None] * len(rows)
        for model_id in dict.fromkeys(model_ids):
            idx = [i for i, m in enumerate(model_ids) if m == model_id]
            observe_batch("predictor", model_id, len(idx))
            model = await self.get_model(model_id)
            stacked = np.concatenate([rows[i] for i in idx], axis=0)
            # torch releases the GIL: keep the event loop free to gather the next batch.
            raw = await asyncio.to_thread(model.forward_raw, stacked)
            preds = model.preprocessor.inverse_y(raw)
            probs = None
            if model.preprocessor.task == "classification":
                e = np.exp(raw - raw.max(axis=-1, keepdims=True))
                probs = e / e.sum(axis=-1, keepdims=True)
            start = 0
            for i in idx:
                n = len(rows[i])
                item: dict[str, Any] = {"predictions": preds[start:start + n]}
                if probs is not None:
                    item["probabilities"] = probs[start:start + n]
                out[i] = item
                start += n
        return out  # type: ignore[return-value]
