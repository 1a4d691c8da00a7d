"""Chat/completion deployment: registry chat models on demand, continuous batching.

Each replica keeps up to ``MAX_LLMS_PER_REPLICA`` engines (LRU via
``@serve.multiplexed``); each engine runs iteration-level batching over every
request routed to it, so concurrent requests share decode steps. The engine
(transformers or llama.cpp) is picked per model by :mod:`.llm.selection`.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from maas_ray.registry import Registry
from maas_ray.serve.loading import load_version
from maas_ray.serve.metrics import meter_generation

MAX_LLMS_PER_REPLICA = int(os.environ.get("MAAS_MAX_LLMS_PER_REPLICA", "2"))
# A request without max_tokens generates at most this many (and never past the context).
DEFAULT_MAX_TOKENS = int(os.environ.get("MAAS_DEFAULT_MAX_TOKENS", "256"))


@serve.deployment(
    # Continuous batching only helps if many requests reach the replica at once
    # (Serve's default of 5 would cap the batch; ray-project/ray#43288).
    max_ongoing_requests=64,
    # Bounded queues: past them a caller gets 503 + Retry-After, not an ever-longer wait.
    max_queued_requests=256,
    # Fractional so the whole app fits a 2-core laptop next to a training job;
    # raise it (or add GPUs) in apps/maas.yaml for real deployments.
    ray_actor_options={"num_cpus": 0.5},
)
class LLMServer:
    def __init__(self, storage_root: str, max_batch_size: int = 16, engine: str = "auto",
                 model_engines: dict[str, str] | None = None, llama_cpp_threads: int | None = None,
                 stream_interval_s: float = 0.05) -> None:
        from maas_ray.serve.llm.selection import EngineConfig

        self.registry = Registry(storage_root)
        self.engines = EngineConfig(engine, dict(model_engines or {}), max_batch_size,  # type: ignore[arg-type]
                                    llama_cpp_threads)
        self.stream_interval_s = stream_interval_s

    @serve.multiplexed(max_num_models_per_replica=MAX_LLMS_PER_REPLICA)
    async def get_engine(self, model_id: str) -> Any:
        from maas_ray.serve.llm.selection import engine_loader

        loader = engine_loader(self.registry.get(model_id), self.engines)
        return await load_version(self.registry, model_id, loader)

    @meter_generation("llm")
    async def generate(self, model_id: str, prompt: str | list[dict[str, str]],
                       params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """First yields ``{"prompt_tokens", "engine"}`` (the engine's ``info()``) or
        ``{"error"}``, then text deltas."""
        from maas_ray.serve.llm import SamplingParams
        from maas_ray.serve.llm.selection import EngineUnavailable

        try:
            engine = await self.get_engine(model_id)
        except EngineUnavailable as err:
            yield {"error": str(err), "param": "model", "code": "model_not_supported"}
            return
        ids = engine.apply_chat_template(prompt) if isinstance(prompt, list) else engine.encode(prompt)
        room = engine.context_length - len(ids)
        max_tokens = params.get("max_tokens")
        if room <= 0:
            yield {"error": f"the prompt has {len(ids)} tokens; model {model_id!r} takes at most "
                            f"{engine.context_length - 1}", "param": "messages",
                   "code": "context_length_exceeded"}
            return
        if max_tokens is not None and max_tokens > room:
            yield {"error": f"max_tokens={max_tokens} plus the prompt's {len(ids)} tokens exceeds "
                            f"the context length {engine.context_length}", "param": "max_tokens",
                   "code": "context_length_exceeded"}
            return
        sampling = SamplingParams(
            max_tokens=max_tokens or min(DEFAULT_MAX_TOKENS, room),
            temperature=params.get("temperature", 1.0),
            top_p=params.get("top_p", 1.0),
            stop=list(params.get("stop") or []),
            seed=params.get("seed"),
        )
        yield {"prompt_tokens": len(ids), "engine": engine.info()}
        chunks = engine.generate(ids, sampling, request_id=uuid.uuid4().hex)
        async for chunk in paced(chunks, self.stream_interval_s):
            yield {"text": chunk.text, "finish_reason": chunk.finish_reason,
                   "completion_tokens": chunk.completion_tokens}

    async def stats(self, model_id: str) -> dict[str, int]:
        """Running/waiting sequences of a model's engine (tests check freed slots)."""
        return (await self.get_engine(model_id)).stats()


async def paced(chunks: AsyncIterator[Any], interval_s: float) -> AsyncIterator[Any]:
    """The first chunk at once, then at most one per ``interval_s``: chunks decoded in
    between are merged (same text, same token ids). The last one is never held."""
    from maas_ray.serve.llm.batching import merge

    held: list[Any] = []
    last = -interval_s
    try:
        async for chunk in chunks:
            held.append(chunk)
            now = time.monotonic()
            if chunk.finish_reason is not None or now - last >= interval_s:
                yield merge(held)
                held, last = [], now
        if held:
            yield merge(held)
    finally:  # the client went away: the engine frees the sequence now, not at garbage collection
        await chunks.aclose()
