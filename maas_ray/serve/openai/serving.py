"""The logic behind the OpenAI routes: prompts in, OpenAI-shaped answers out.

The request model builds each choice's frozen ``SamplingParams``; the model
deployment streams plain dicts back: first ``{"prompt_tokens": n}`` (or the
:class:`~maas_ray.serve.errors.APIError` for input the model cannot take, so a bad
request fails with a 4xx before any SSE starts), then one dict per decoded
delta ``{"text", "finish_reason", "completion_tokens"}``, with ``"logprobs"`` (one entry
per new token, in the chat shape) when the request asked for them.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from maas_ray.auth.middleware import report_usage, tokens_left
from maas_ray.registry import ModelVersion
from maas_ray.serve.calls import model_handle, replica_errors
from maas_ray.serve.context import ServiceContext
from maas_ray.serve.errors import APIError
from maas_ray.serve.llm_server import GenerateOptions
from maas_ray.engines.constraints import GrammarError, compile_grammar, json_schema
from maas_ray.engines.engine import RequestTimeout, SamplingParams
from maas_ray.serve.openai import protocol as p
from maas_ray.serve.openai.tools import ToolCallReader, prompt_tools, tools_grammar

CHAT_TASKS = ("chat",)
EMBEDDING_TASKS = ("embedding",)


def require_task(mv: ModelVersion, tasks: tuple[str, ...], route: str) -> None:
    if mv.task not in tasks:
        raise APIError(400, f"model {mv.id!r} is a {mv.task!r} model and cannot serve {route}",
                       "model", "model_not_supported")


def uses_tools(req: p.SamplingFields) -> bool:
    """Whether the answer may hold tool calls (chat with tools, tool_choice not "none")."""
    return isinstance(req, p.ChatCompletionRequest) and req.tool_mode() != "none"


async def request_grammar(req: p.SamplingFields) -> str | None:
    """The grammar the completion must follow (None: free text), from ``response_format`` and
    the tools, compiled here once (cached by text) so a schema llguidance cannot enforce is a
    400 naming the feature before it reaches an engine."""
    fmt = req.response_format
    answer = None
    if fmt is not None and fmt.type != "text":
        answer = json_schema(fmt.json_schema.json_schema if fmt.json_schema else None)
    lark = tools_grammar(req, answer) if uses_tools(req) else None  # type: ignore[arg-type]
    if lark is None and answer is not None:
        lark = f"start: {answer}"
    if lark is None:
        return None
    try:
        await asyncio.to_thread(compile_grammar, lark)
    except GrammarError as err:
        param = "tools" if uses_tools(req) else "response_format"
        raise APIError(400, f"{param} cannot be enforced: {err}", param, "invalid_value") from None
    return lark


def replica_key(mv: ModelVersion) -> str:
    """The model a chat request wants loaded on the replica it goes to: a LoRA fine-tune's
    base (fine-tunes are adapters on their base's engine, so replicas that hold the base
    take them all), otherwise the version itself."""
    from maas_ray.registry.adapters import is_adapter

    return str(mv.card["base_model"]) if is_adapter(mv) and "base_model" in mv.card else mv.id


async def open_stream(ctx: ServiceContext, mv: ModelVersion, prompt: Any, sampling: SamplingParams,
                      options: GenerateOptions) -> tuple[Any, int]:
    """Start one generation; return (the response stream, prompt token count)."""
    # Streams come back in small chunks, so only the arguments' size counts.
    handle = model_handle(ctx, "llm", replica_key(mv), prompt, sampling, options, stream=True)
    stream = handle.generate.remote(mv.id, prompt, sampling, options)
    timeout = ctx.settings.request_timeout_s
    with replica_errors(mv, timeout):
        first = await asyncio.wait_for(stream.__anext__(), timeout=timeout)
    if isinstance(first, APIError):
        stream.cancel()
        raise first
    if first.get("engine"):
        ctx.engines[mv.id] = first["engine"]
    return stream, int(first["prompt_tokens"])


async def open_all(ctx: ServiceContext, mv: ModelVersion, req: p.SamplingFields,
                   prompt: Any) -> list[tuple[Any, int]]:
    """Open the ``n`` choices' streams; if one fails, stop those already running."""
    opened: list[tuple[Any, int]] = []
    grammar = await request_grammar(req)
    options = GenerateOptions(
        group=p.new_id("req"), stream=req.stream, tokens_left=tokens_left(), choices=req.n,
        tools=prompt_tools(req) if isinstance(req, p.ChatCompletionRequest) else None)
    try:
        for i in range(req.n):
            opened.append(await open_stream(ctx, mv, prompt, req.sampling_params(i, grammar), options))
    except BaseException:
        for stream, _ in opened:
            stream.cancel()
        raise
    return opened


async def collect(stream: Any) -> tuple[str, str, int, list[dict[str, Any]]]:
    """(text, finish_reason, completion tokens, logprob entries in the chat shape)."""
    text, finish, count, logprobs = [], "stop", 0, []
    async for chunk in stream:
        text.append(chunk.get("text", ""))
        count = chunk.get("completion_tokens", count)
        finish = chunk.get("finish_reason") or finish
        logprobs += chunk.get("logprobs") or []
    return "".join(text), finish, count, logprobs


def chat_logprobs(req: p.SamplingFields, entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A chat choice's ``logprobs`` (None unless the request asked for them)."""
    return {"content": entries, "refusal": None} if req.logprob_count() is not None else None  # type: ignore[attr-defined]


def completion_logprobs(req: p.SamplingFields, entries: list[dict[str, Any]],
                        offset: int = 0) -> dict[str, Any] | None:
    """The legacy completions shape of chat-shaped entries: parallel lists, each position's
    top tokens as ``{token: logprob}`` with the chosen token always among them (so up to
    ``logprobs + 1`` keys, as OpenAI documents), ``text_offset`` in characters of the
    completion's text from ``offset``."""
    if req.logprob_count() is None:  # type: ignore[attr-defined]
        return None
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    tops = [{t["token"]: t["logprob"] for t in e["top_logprobs"]} | {e["token"]: e["logprob"]} for e in entries]
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": tops, "text_offset": offsets}


async def complete(ctx: ServiceContext, mv: ModelVersion, req: p.SamplingFields,
                   prompt: Any, chat: bool) -> dict[str, Any]:
    """Non-streaming chat/completion with ``n`` choices."""
    opened = await open_all(ctx, mv, req, prompt)
    tasks = [asyncio.ensure_future(collect(stream)) for stream, _ in opened]
    limit = ctx.settings.llm.request_timeout_s
    try:
        # The model server aborts the sequences after llm.request_timeout_s (RequestTimeout);
        # waiting longer here is only the backstop for a replica that stopped answering.
        results = await asyncio.wait_for(asyncio.gather(*tasks), limit + ctx.settings.request_timeout_s)
    except BaseException as err:  # a choice failed or timed out, or the client left: free every slot
        for (stream, _), task in zip(opened, tasks):
            task.cancel()
            stream.cancel()
        if isinstance(err, (RequestTimeout, TimeoutError)):
            raise APIError(504, f"the request did not finish within {limit:g} s (llm.request_timeout_s) "
                           "and was stopped; ask for fewer max_tokens or choices, or stream the response",
                           code="timeout") from None
        raise
    return answer(mv, req, results, opened[0][1], chat)


def answer(mv: ModelVersion, req: p.SamplingFields, results: list[tuple[str, str, int, list[Any]]],
           prompt_tokens: int, chat: bool) -> dict[str, Any]:
    """The chat.completion / text_completion body from each choice's (text, finish, tokens,
    logprobs): one shape for the online route and the Batch API's workers."""
    completion_tokens = sum(r[2] for r in results)
    if chat:
        choices = []
        for i, (text, finish, _, logprobs) in enumerate(results):
            message = {"role": "assistant", "content": text}
            if uses_tools(req):
                reader = ToolCallReader()
                reader.feed(text, final=True)
                message, finish = reader.message(), reader.finish_reason(finish)
            choices.append({"index": i, "message": message, "finish_reason": finish,
                            "logprobs": chat_logprobs(req, logprobs)})
        obj, rid = "chat.completion", p.new_id("chatcmpl")
    else:
        choices = [{"index": i, "text": text, "finish_reason": finish,
                    "logprobs": completion_logprobs(req, logprobs)}
                   for i, (text, finish, _, logprobs) in enumerate(results)]
        obj, rid = "text_completion", p.new_id("cmpl")
    return {"id": rid, "object": obj, "created": p.now(), "model": mv.id, "choices": choices,
            "usage": p.usage(prompt_tokens, completion_tokens)}


async def stream_sse(ctx: ServiceContext, mv: ModelVersion, req: p.SamplingFields,
                     prompt: Any, chat: bool) -> AsyncIterator[str]:
    """Open every choice's stream first (so input errors are 4xx), then yield SSE."""
    return _sse(mv, req, await open_all(ctx, mv, req, prompt), chat)


async def _sse(mv: ModelVersion, req: p.SamplingFields, opened: list[tuple[Any, int]],
               chat: bool) -> AsyncIterator[str]:
    rid = p.new_id("chatcmpl" if chat else "cmpl")
    created = p.now()
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    queue: asyncio.Queue = asyncio.Queue()
    counts = [0] * len(opened)
    offsets = [0] * len(opened)  # characters each choice has sent (completions' text_offset)
    readers = [ToolCallReader() for _ in opened] if uses_tools(req) else None

    async def pump(index: int, stream: Any) -> None:
        try:
            async for chunk in stream:
                await queue.put((index, chunk))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, (s, _) in enumerate(opened)]
    try:
        if chat:  # OpenAI sends the role first
            for i in range(len(opened)):
                yield _event(p.chat_chunk(rid, mv.id, created, [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]))
        live = len(opened)
        while live:
            index, chunk = await queue.get()
            if chunk is None:
                live -= 1
                continue
            counts[index] = chunk.get("completion_tokens", counts[index])
            finish = chunk.get("finish_reason")
            text = chunk.get("text", "")
            entries = chunk.get("logprobs") or []
            if chat:
                # Tool calls: the text becomes content and tool_calls deltas, one event each
                # (OpenAI's shape); the logprobs ride on the first, the finish on the last.
                if readers is not None:
                    deltas = readers[index].feed(text, final=finish is not None)
                    finish = readers[index].finish_reason(finish) if finish else None
                else:
                    deltas = [{"content": text}] if text else []
                if not deltas and (finish or entries):
                    deltas = [{}]
                for k, delta in enumerate(deltas):
                    yield _event(p.chat_chunk(rid, mv.id, created, [
                        {"index": index, "delta": delta, "finish_reason": finish if k == len(deltas) - 1 else None,
                         "logprobs": chat_logprobs(req, entries if k == 0 else [])}]))
                continue
            logprobs = completion_logprobs(req, entries, offsets[index])
            if entries:
                offsets[index] = logprobs["text_offset"][-1] + len(entries[-1]["token"])
            # Tokens whose text is held back (half a character, a possible stop string)
            # still carry their logprobs.
            if text or finish or entries:
                yield _event({"id": rid, "object": "text_completion", "created": created, "model": mv.id,
                              "choices": [{"index": index, "text": text, "finish_reason": finish,
                                           "logprobs": logprobs}]})
        if include_usage:
            usage = p.usage(opened[0][1], sum(counts))
            if chat:
                yield _event(p.chat_chunk(rid, mv.id, created, [], usage))
            else:
                yield _event({"id": rid, "object": "text_completion", "created": created,
                              "model": mv.id, "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"
    finally:
        # Metered whether or not the client asked for usage, and up to where it stopped reading.
        report_usage(opened[0][1] if opened else 0, sum(counts))
        # Client gone or done: stop every generation so its batch slot is freed.
        for (stream, _), task in zip(opened, tasks):
            task.cancel()
            stream.cancel()


def _event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def embed(ctx: ServiceContext, mv: ModelVersion, req: p.EmbeddingRequest) -> dict[str, Any]:
    texts = req.texts()
    handle = model_handle(ctx, "embedder", mv.id, texts, items=len(texts))
    timeout = ctx.settings.request_timeout_s
    with replica_errors(mv, timeout):
        result = await asyncio.wait_for(handle.embed.remote(mv.id, texts, req.dimensions, tokens_left()),
                                        timeout)
    if isinstance(result, APIError):
        raise result
    vectors = np.asarray(result["embeddings"], dtype=np.float32)  # (N, D)
    data = []
    for i, vec in enumerate(vectors):
        value: Any = (base64.b64encode(vec.astype("<f4").tobytes()).decode()
                      if req.encoding_format == "base64" else vec.tolist())
        data.append({"object": "embedding", "index": i, "embedding": value})
    tokens = int(result["prompt_tokens"])
    return {"object": "list", "data": data, "model": mv.id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


async def tokenize(ctx: ServiceContext, mv: ModelVersion, req: p.TokenizeRequest) -> dict[str, Any]:
    """``/v1/tokenize`` on the model's own replica (its engine holds the tokenizer)."""
    if req.messages is not None:
        prompt: Any = [m.prompt() for m in req.messages]
    else:
        prompt = req.prompt
    return await _call(ctx, mv, "tokenize_prompt", prompt, req.add_generation_prompt)


async def detokenize(ctx: ServiceContext, mv: ModelVersion, req: p.DetokenizeRequest) -> dict[str, Any]:
    return await _call(ctx, mv, "detokenize", req.tokens)


async def _call(ctx: ServiceContext, mv: ModelVersion, method: str, *args: Any) -> dict[str, Any]:
    # Token ids back take at most about 3 bytes per character sent.
    handle = model_handle(ctx, "llm", replica_key(mv), *args)
    timeout = ctx.settings.request_timeout_s
    with replica_errors(mv, timeout):
        result = await asyncio.wait_for(getattr(handle, method).remote(mv.id, *args), timeout)
    if isinstance(result, APIError):
        raise result
    return result
