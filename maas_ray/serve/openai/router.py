"""``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``, ``/v1/tokenize``,
``/v1/detokenize``.

vLLM and llama-server serve tokenize/detokenize at the root; here they live under ``/v1``,
so the one rule "everything under /v1 and /v2 needs a key" (:mod:`maas_ray.auth.middleware`)
covers them and tenants see only their own models there too. vLLM clients point their
base URL at ``/v1``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from maas_ray.serve.context import get_context
from maas_ray.serve.errors import documented
from maas_ray.serve.openai import protocol as p
from maas_ray.serve.openai import serving

router = APIRouter(prefix="/v1", tags=["openai"], responses=documented(404))

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# With "stream": true the answer is server-sent events instead of one JSON body.
_STREAMS = {200: {"content": {"text/event-stream": {}}}}


@router.post("/chat/completions", response_model=None, responses=_STREAMS)
async def chat_completions(req: p.ChatCompletionRequest) -> Any:
    ctx = get_context()
    mv = ctx.resolve(req.model)
    serving.require_task(mv, serving.CHAT_TASKS, "/v1/chat/completions")
    messages = [m.prompt() for m in req.messages]
    if req.stream:
        events = await serving.stream_sse(ctx, mv, req, messages, chat=True)
        return StreamingResponse(events, media_type="text/event-stream", headers=_SSE_HEADERS)
    return await serving.complete(ctx, mv, req, messages, chat=True)


@router.post("/completions", response_model=None, responses=_STREAMS)
async def completions(req: p.CompletionRequest) -> Any:
    ctx = get_context()
    mv = ctx.resolve(req.model)
    serving.require_task(mv, serving.CHAT_TASKS, "/v1/completions")
    if req.stream:
        events = await serving.stream_sse(ctx, mv, req, req.prompt_text(), chat=False)
        return StreamingResponse(events, media_type="text/event-stream", headers=_SSE_HEADERS)
    return await serving.complete(ctx, mv, req, req.prompt_text(), chat=False)


@router.post("/embeddings")
async def embeddings(req: p.EmbeddingRequest) -> dict[str, Any]:
    ctx = get_context()
    mv = ctx.resolve(req.model)
    serving.require_task(mv, serving.EMBEDDING_TASKS, "/v1/embeddings")
    return await serving.embed(ctx, mv, req)


@router.post("/tokenize")
async def tokenize(req: p.TokenizeRequest) -> p.TokenizeResponse:
    """A prompt's token ids as the model's chat or completion route would count them."""
    ctx = get_context()
    mv = ctx.resolve(req.model)
    serving.require_task(mv, serving.CHAT_TASKS, "/v1/tokenize")
    return p.TokenizeResponse(**await serving.tokenize(ctx, mv, req))


@router.post("/detokenize")
async def detokenize(req: p.DetokenizeRequest) -> p.DetokenizeResponse:
    """Token ids back to text (special tokens spelt out); an id outside the vocabulary is a 400."""
    ctx = get_context()
    mv = ctx.resolve(req.model)
    serving.require_task(mv, serving.CHAT_TASKS, "/v1/detokenize")
    return p.DetokenizeResponse(**await serving.detokenize(ctx, mv, req))
