"""Chat/completion deployment: registry chat models on demand, continuous batching.

Each replica keeps up to ``MAX_LLMS_PER_REPLICA`` engines (LRU via
``@serve.multiplexed``); each engine runs iteration-level batching over every
request routed to it, so concurrent requests share decode steps. The engine
(transformers or llama.cpp) is picked per model by :mod:`.llm.selection`.

Prompts are tokenized in a worker thread (:func:`tokenize`), never on the
replica's event loop, and a prompt too long for the context in any
tokenization is refused before it is tokenized.
"""

from __future__ import annotations

import asyncio
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
# The longest stop string: each request builds a matching table as long as its stops
# (linear, but on the event loop), and no sensible stop string comes near this.
MAX_STOP_CHARS = 4096


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
                 stream_interval_s: float = 0.05, request_timeout_s: float = 600.0,
                 max_request_share: float = 0.5) -> None:
        from maas_ray.engines.selection import EngineConfig

        self.registry = Registry(storage_root)
        self.engines = EngineConfig(engine, dict(model_engines or {}), max_batch_size,  # type: ignore[arg-type]
                                    llama_cpp_threads, max_request_share)
        self.stream_interval_s = stream_interval_s
        self.request_timeout_s = request_timeout_s

    @serve.multiplexed(max_num_models_per_replica=MAX_LLMS_PER_REPLICA)
    async def get_engine(self, model_id: str) -> Any:
        from maas_ray.engines.selection import engine_loader

        loader = engine_loader(self.registry.get(model_id), self.engines)
        return await load_version(self.registry, model_id, loader)

    @meter_generation("llm")
    async def generate(self, model_id: str, prompt: str | list[dict[str, str]],
                       params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """First yields ``{"prompt_tokens", "engine"}`` (the engine's ``info()``) or
        ``{"error"}``, then text deltas. ``params["tools"]``: the chat's tools, rendered
        with the messages (:mod:`~maas_ray.engines.tool_format`). ``params["group"]`` names the client request
        (its ``n`` choices share it, for fair admission); unless ``params["stream"]``,
        the engine aborts the request after ``request_timeout_s`` with
        :class:`~maas_ray.engines.engine.RequestTimeout`."""
        from maas_ray.engines import SamplingParams
        from maas_ray.engines.selection import EngineUnavailable

        try:
            engine = await self.get_engine(model_id)
        except EngineUnavailable as err:
            yield {"error": str(err), "param": "model", "code": "model_not_supported"}
            return
        stops = list(params.get("stop") or [])
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            yield {"error": f"stop strings may have at most {MAX_STOP_CHARS} characters", "param": "stop",
                   "code": "invalid_value"}
            return
        try:
            ids = await tokenize(engine, prompt, tools=params.get("tools"))
        except PromptTooLong as err:
            yield {"error": str(err), "param": "messages" if isinstance(prompt, list) else "prompt",
                   "code": "context_length_exceeded"}
            return
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
        max_tokens = max_tokens or min(DEFAULT_MAX_TOKENS, room)
        if params.get("tokens_left") is not None:  # the key's daily budget, shared by n choices
            share = (params["tokens_left"] - len(ids)) // max(1, params.get("choices", 1))
            if share < 1:
                yield {"error": f"the prompt's {len(ids)} tokens and at least one per choice exceed "
                                f"what the API key's daily budget has left ({params['tokens_left']})",
                       "code": "insufficient_quota", "status": 429}
                return
            max_tokens = min(max_tokens, share)  # cut at the budget: finish_reason "length"
        sampling = SamplingParams(
            max_tokens=max_tokens,
            temperature=params.get("temperature", 1.0),
            top_p=params.get("top_p", 1.0),
            stop=stops,
            seed=params.get("seed"),
            logprobs=params.get("logprobs"),
            grammar=params.get("grammar"),
            # A stream's client sees progress and can hang up; a non-streaming one cannot.
            timeout_s=None if params.get("stream") else self.request_timeout_s,
        )
        yield {"prompt_tokens": len(ids), "engine": engine.info()}
        chunks = engine.generate(ids, sampling, request_id=uuid.uuid4().hex, group=params.get("group"))
        async for chunk in paced(chunks, self.stream_interval_s):
            out = {"text": chunk.text, "finish_reason": chunk.finish_reason,
                   "completion_tokens": chunk.completion_tokens}
            if chunk.logprobs is not None:
                out["logprobs"] = wire_logprobs(engine.token_pieces, chunk.logprobs)
            yield out

    async def tokenize_prompt(self, model_id: str, prompt: str | list[dict[str, str]],
                              add_generation_prompt: bool = True) -> dict[str, Any]:
        """``/v1/tokenize``: ``{"tokens", "count", "max_model_len"}``, or ``{"error"}``."""
        from maas_ray.engines.selection import EngineUnavailable

        try:
            engine = await self.get_engine(model_id)
            ids = await tokenize(engine, prompt, add_generation_prompt)
        except EngineUnavailable as err:
            return {"error": str(err), "param": "model", "code": "model_not_supported"}
        except PromptTooLong as err:
            return {"error": str(err), "param": "messages" if isinstance(prompt, list) else "prompt",
                    "code": "context_length_exceeded"}
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.context_length}

    async def detokenize(self, model_id: str, tokens: list[int]) -> dict[str, Any]:
        """``/v1/detokenize``: ``{"prompt"}`` (special tokens spelt out), or ``{"error"}`` for
        an id outside the vocabulary."""
        from maas_ray.engines.selection import EngineUnavailable

        try:
            engine = await self.get_engine(model_id)
        except EngineUnavailable as err:
            return {"error": str(err), "param": "model", "code": "model_not_supported"}
        vocab = len(engine.tokenizer)
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            return {"error": f"token ids {bad[:5]} are outside model {model_id!r}'s vocabulary "
                             f"(0 to {vocab - 1})", "param": "tokens", "code": "invalid_value"}
        text = await asyncio.to_thread(engine.tokenizer.decode, tokens, skip_special_tokens=False)
        return {"prompt": text}

    async def stats(self, model_id: str) -> dict[str, int]:
        """Running/waiting sequences of a model's engine (tests check freed slots)."""
        return (await self.get_engine(model_id)).stats()


class PromptTooLong(ValueError):
    """The prompt cannot fit the model's context, whatever its tokens (it was not tokenized)."""


async def tokenize(engine: Any, prompt: str | list[dict[str, Any]], add_generation_prompt: bool = True,
                   tools: list[dict[str, Any]] | None = None) -> list[int]:
    """The prompt's token ids (chat messages through the chat template), computed in a
    worker thread so the replica's event loop keeps serving other requests meanwhile.

    A prompt of more characters than ``engine.max_prompt_chars`` (its context times
    the most characters one token stands for) has more tokens than the context
    holds: :class:`PromptTooLong`, without tokenizing it. Body limits allow
    megabytes; tokenizing those would be seconds of work to refuse.
    """
    chars = len(prompt) if isinstance(prompt, str) else sum(len(m.get("content") or "") for m in prompt)
    limit = getattr(engine, "max_prompt_chars", None)
    if limit is not None and chars > limit:
        raise PromptTooLong(f"the prompt has {chars} characters; the model's context holds "
                            f"{engine.context_length} tokens, which no prompt over {limit} characters fits")
    if isinstance(prompt, str):
        return await asyncio.to_thread(engine.encode, prompt)
    return await asyncio.to_thread(engine.apply_chat_template, prompt, add_generation_prompt, tools)


def wire_logprobs(pieces: Any, entries: list[Any]) -> list[dict[str, Any]]:
    """Engine :class:`~maas_ray.engines.engine.TokenLogprob` entries in OpenAI's chat shape
    (``{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}``);
    ``pieces``: token id → (text, bytes) (:class:`~maas_ray.engines.logprobs.TokenPieces`)."""
    def one(token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = pieces(token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}

    return [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]


async def paced(chunks: AsyncIterator[Any], interval_s: float) -> AsyncIterator[Any]:
    """The first chunk at once, then at most one per ``interval_s``: chunks decoded in
    between are merged (same text, same token ids). The last one is never held."""
    from maas_ray.engines.batching import merge

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
