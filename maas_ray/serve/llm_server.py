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
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from maas_ray.auth.ledger import seconds_to_midnight
from maas_ray.engines.engine import SamplingParams
from maas_ray.registry import Registry
from maas_ray.serve.errors import APIError
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
    # A fine-tune goes to a replica that holds its base, first to one that loaded its adapter.
    request_router_config=RequestRouterConfig(
        request_router_class="maas_ray.serve.adapter_router.AdapterAffinityRouter",
        request_routing_stats_period_s=2.0),
)
class LLMServer:
    def __init__(self, storage_root: str, max_batch_size: int = 16, engine: str = "auto",
                 model_engines: dict[str, str] | None = None, llama_cpp_threads: int | None = None,
                 stream_interval_s: float = 0.05, request_timeout_s: float = 600.0,
                 max_request_share: float = 0.5, adapter_cache_mb: float = 256) -> None:
        from maas_ray.engines.selection import EngineConfig

        self.registry = Registry(storage_root)
        self.engines = EngineConfig(engine, dict(model_engines or {}), max_batch_size,  # type: ignore[arg-type]
                                    llama_cpp_threads, max_request_share, int(adapter_cache_mb * 2**20))
        self.stream_interval_s = stream_interval_s
        self.request_timeout_s = request_timeout_s
        # Engines serving adapters, by base id; Serve's multiplexer owns them (weak refs).
        self._adapter_engines: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()

    @serve.multiplexed(max_num_models_per_replica=MAX_LLMS_PER_REPLICA)
    async def get_engine(self, model_id: str) -> Any:
        """The model's engine; :class:`APIError` 400 for a model no engine here can run."""
        from maas_ray.engines.selection import EngineUnavailable, engine_loader

        try:
            loader = engine_loader(self.registry.get(model_id), self.engines)
            return await load_version(self.registry, model_id, loader)
        except EngineUnavailable as err:
            raise APIError(400, str(err), "model", "model_not_supported") from None

    async def engine_for(self, model_id: str) -> tuple[Any, str | None]:
        """(engine, adapter): a LoRA fine-tune served on its base's engine comes with its
        id as the adapter that requests name (:func:`~maas_ray.engines.selection.adapter_base`);
        any other model is its own engine, with None."""
        from maas_ray.engines.selection import adapter_base

        mv = self.registry.get(model_id)
        base = await asyncio.to_thread(adapter_base, self.registry, mv, self.engines)
        if base is None:
            return await self.get_engine(model_id), None
        engine = await self.get_engine(base.id)
        self._adapter_engines[base.id] = engine
        if not engine.has_adapter(mv.id):  # its files fetched and checksummed, off the event loop
            engine.add_adapter(mv.id, await asyncio.to_thread(self.registry.local_dir, mv))
        return engine, mv.id

    def record_routing_stats(self) -> dict[str, Any]:
        """What :class:`~maas_ray.serve.adapter_router.AdapterAffinityRouter` reads: the
        LoRA adapters this replica's engines hold now."""
        engines = [e for e in list(self._adapter_engines.values()) if not e.closed]
        return {"adapters": sorted({name for engine in engines for name in engine.adapters.loaded})}

    @meter_generation("llm")
    async def generate(self, model_id: str, prompt: str | list[dict[str, str]],
                       sampling: SamplingParams, options: GenerateOptions
                       ) -> AsyncIterator[dict[str, Any] | APIError]:
        """First yields ``{"prompt_tokens", "engine"}`` (the engine's ``info()``) or the
        :class:`APIError` the client gets, then text deltas. ``sampling`` comes from the
        request model; here it gets the ``max_tokens`` that fits the prompt and, unless the
        client streams, the engine's overall timeout."""
        try:
            engine, adapter = await self.engine_for(model_id)
            sampling = replace(sampling, adapter=adapter)
            ids, sampling = await admit(engine, model_id, prompt, sampling, options.tools,
                                        options.tokens_left, options.choices)
        except APIError as err:
            yield err
            return
        # A stream's client sees progress and can hang up; a non-streaming one cannot.
        sampling = replace(sampling, timeout_s=None if options.stream else self.request_timeout_s)
        yield {"prompt_tokens": len(ids), "engine": engine.info()}
        chunks = engine.generate(ids, sampling, request_id=uuid.uuid4().hex, group=options.group)
        async for chunk in paced(chunks, self.stream_interval_s):
            out = {"text": chunk.text, "finish_reason": chunk.finish_reason,
                   "completion_tokens": chunk.completion_tokens}
            if chunk.logprobs is not None:
                out["logprobs"] = wire_logprobs(engine.token_pieces, chunk.logprobs)
            yield out

    async def tokenize_prompt(self, model_id: str, prompt: str | list[dict[str, str]],
                              add_generation_prompt: bool = True) -> dict[str, Any] | APIError:
        """``/v1/tokenize``: ``{"tokens", "count", "max_model_len"}``, or the error."""
        try:
            engine, _ = await self.engine_for(model_id)
            ids = await tokenize(engine, prompt, add_generation_prompt)
        except APIError as err:
            return err
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.context_length}

    async def detokenize(self, model_id: str, tokens: list[int]) -> dict[str, Any] | APIError:
        """``/v1/detokenize``: ``{"prompt"}`` (special tokens spelt out), or the error for
        an id outside the vocabulary."""
        try:
            engine, _ = await self.engine_for(model_id)
        except APIError as err:
            return err
        vocab = len(engine.tokenizer)
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            return APIError(400, f"token ids {bad[:5]} are outside model {model_id!r}'s vocabulary "
                                 f"(0 to {vocab - 1})", "tokens", "invalid_value")
        text = await asyncio.to_thread(engine.tokenizer.decode, tokens, skip_special_tokens=False)
        return {"prompt": text}

    async def stats(self, model_id: str) -> dict[str, int]:
        """Running/waiting sequences of a model's engine (tests check freed slots)."""
        return (await self.engine_for(model_id))[0].stats()


@dataclass(frozen=True)
class GenerateOptions:
    """How the server runs one choice of a request, beside its :class:`SamplingParams`."""

    group: str
    """Names the client request: its ``n`` choices share it, for fair admission."""
    stream: bool = False
    """A streaming client sees progress and can hang up, so it gets no overall timeout."""
    tokens_left: int | None = None
    """The API key's daily token budget left (None: unlimited), shared by the n choices."""
    choices: int = 1
    tools: list[dict[str, Any]] | None = None
    """The chat's tools, rendered with the messages (:mod:`~maas_ray.engines.tool_format`)."""


class PromptTooLong(APIError):
    """The prompt cannot fit the model's context, whatever its tokens (it was not tokenized)."""

    def __init__(self, message: str, param: str = "prompt") -> None:
        super().__init__(400, message, param, "context_length_exceeded")


async def admit(engine: Any, model_id: str, prompt: str | list[dict[str, Any]],
                sampling: SamplingParams, tools: list[dict[str, Any]] | None = None,
                tokens_left: int | None = None, choices: int = 1
                ) -> tuple[list[int], SamplingParams]:
    """The prompt's token ids and ``sampling`` with the ``max_tokens`` it may have: what the
    client asked for, or as many as fit the context (at most ``DEFAULT_MAX_TOKENS``), cut at
    its share of the API key's daily budget. :class:`APIError` (400 or 429) for a prompt
    the model cannot take. The online server and the Batch API's workers both admit here."""
    param = "messages" if isinstance(prompt, list) else "prompt"
    ids = await tokenize(engine, prompt, tools=tools)
    room = engine.context_length - len(ids)
    max_tokens = sampling.max_tokens
    if room <= 0:
        raise APIError(400, f"the prompt has {len(ids)} tokens; model {model_id!r} takes at most "
                            f"{engine.context_length - 1}", param, "context_length_exceeded")
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"max_tokens={max_tokens} plus the prompt's {len(ids)} tokens exceeds "
                            f"the context length {engine.context_length}", "max_tokens",
                       "context_length_exceeded")
    max_tokens = max_tokens or min(DEFAULT_MAX_TOKENS, room)
    if tokens_left is not None:
        share = (tokens_left - len(ids)) // max(1, choices)
        if share < 1:
            raise APIError(429, f"the prompt's {len(ids)} tokens and at least one per choice exceed "
                                f"what the API key's daily budget has left ({tokens_left})", None,
                           "insufficient_quota", {"Retry-After": str(seconds_to_midnight())})
        max_tokens = min(max_tokens, share)  # cut at the budget: finish_reason "length"
    return ids, replace(sampling, max_tokens=max_tokens)


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
                            f"{engine.context_length} tokens, which no prompt over {limit} characters fits",
                            "prompt" if isinstance(prompt, str) else "messages")
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
    from maas_ray.engines.sequence import merge

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
