"""The Ray Data actor that runs a batch's requests through the serving engines.

Each actor (``map_batches`` with an ``ActorPoolStrategy``) loads the models it
meets once, with the engine the online service would pick
(:func:`~maas_ray.engines.selection.engine_loader`, :class:`~maas_ray.engines.Embedder`),
and runs every request of a Ray Data batch at once, so the engine decodes them
together (continuous batching, ``BatchArgs.max_batch_size`` sequences). These
actors are not the Serve replicas: live traffic keeps its own engines and latency.

Per request it does what the online path does between route and engine (the
prompt's checks in :class:`~maas_ray.serve.llm_server.LLMServer.generate`, the
answer's shape in :mod:`maas_ray.serve.openai.serving`), so a greedy request gives
the same answer in a batch as online.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa

from maas_ray.batches import requests
from maas_ray.batches.service import status_of
from maas_ray.registry import ModelVersion, Registry
from maas_ray.serve.errors import APIError
from maas_ray.serve.openai import protocol as p

STOP_CHECK_S = 1.0  # how often a running call looks for a cancel
OUTPUT = pa.schema([("line", pa.int64()), ("custom_id", pa.string()), ("status_code", pa.int64()),
                    ("body", pa.string())])


class BatchWorker:
    """A Ray Data class UDF: rows of ``{"text": one validated request line}`` in, rows of
    ``{"line", "custom_id", "status_code", "body"}`` out (``body`` as JSON text: the answer,
    or for a 4xx ``{"message", "param", "code"}``)."""

    def __init__(self, storage_root: str, batch_id: str, endpoint: str, spec: dict[str, Any]) -> None:
        from maas_ray.engines.selection import EngineConfig

        self.root, self.batch_id, self.endpoint = storage_root, batch_id, endpoint
        self.registry = Registry(storage_root)
        self.engines = EngineConfig(spec.get("engine", "auto"), dict(spec.get("model_engines") or {}),
                                    int(spec.get("max_batch_size", 32)), spec.get("llama_cpp_threads"),
                                    max_request_share=1.0)  # one batch: no one to be fair to
        self.models: dict[str, Any] = {}
        self.loop = asyncio.new_event_loop()  # one loop for the actor: engines stream into it

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        rows = [json.loads(text) for text in batch["text"]]
        out: dict[str, list[Any]] = {name: [] for name in OUTPUT.names}
        if status_of(self.root, self.batch_id) == "in_progress":  # else cancelled: drop the rest
            for row, (status, body) in self.loop.run_until_complete(self._run_all(rows)):
                if isinstance(body, APIError):  # plain fields across the hop; the runner words it
                    body = {"message": body.message, "param": body.param, "code": body.code}
                out["line"].append(row["line"])
                out["custom_id"].append(row["custom_id"])
                out["status_code"].append(status)
                out["body"].append(json.dumps(body, separators=(",", ":")))
        # A fixed schema: an empty (cancelled) block must concatenate with the others.
        return pa.table(out, schema=OUTPUT)

    async def _run_all(self, rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], tuple[int, Any]]]:
        """Every row at once; on a cancel, the rows that finished."""
        tasks = [asyncio.ensure_future(self._one(row)) for row in rows]
        pending = set(tasks)
        while pending:
            _, pending = await asyncio.wait(pending, timeout=STOP_CHECK_S)
            if pending and await asyncio.to_thread(status_of, self.root, self.batch_id) != "in_progress":
                for task in pending:
                    task.cancel()  # the engine frees the sequence as its iterator closes
                await asyncio.gather(*pending, return_exceptions=True)
                break
        return [(row, task.result()) for row, task in zip(rows, tasks)
                if task.done() and not task.cancelled()]

    async def _one(self, row: dict[str, Any]) -> tuple[int, Any]:
        req = requests.parse(self.endpoint, row["body"])
        try:
            mv = await asyncio.to_thread(self.registry.get, row["model"])
            if self.endpoint == "/v1/embeddings":
                return 200, await self._embed(mv, req)
            return 200, await self._complete(mv, req, chat=self.endpoint == "/v1/chat/completions")
        except APIError as err:
            return err.status, err

    async def _model(self, mv: ModelVersion) -> Any:
        """The model's engine (or embedder), loaded once however many requests wait for it."""
        if mv.id not in self.models:
            self.models[mv.id] = asyncio.ensure_future(self._load(mv))
        return await asyncio.shield(self.models[mv.id])

    async def _load(self, mv: ModelVersion) -> Any:
        from maas_ray.registry.adapters import model_dir

        if self.endpoint == "/v1/embeddings":
            from maas_ray.engines import Embedder as loader
        else:
            from maas_ray.engines.selection import EngineUnavailable, engine_loader

            try:
                loader = engine_loader(mv, self.engines)  # type: ignore[assignment]
            except EngineUnavailable as err:
                raise APIError(400, str(err), "model", "model_not_supported") from None
        path = await asyncio.to_thread(model_dir, self.registry, mv)
        return await asyncio.to_thread(loader, path)

    async def _complete(self, mv: ModelVersion, req: Any, chat: bool) -> dict[str, Any]:
        from maas_ray.serve.llm_server import admit, wire_logprobs
        from maas_ray.serve.openai.serving import answer

        engine = await self._model(mv)
        prompt: Any = [m.prompt() for m in req.messages] if chat else req.prompt_text()
        ids, fitted = await admit(engine, mv.id, prompt, req.sampling_params())
        group = uuid.uuid4().hex

        async def choice(i: int) -> tuple[str, str, int, list[dict[str, Any]]]:
            params = replace(req.sampling_params(i), max_tokens=fitted.max_tokens)
            text, finish, count, logprobs = [], "stop", 0, []
            async for chunk in engine.generate(ids, params, request_id=uuid.uuid4().hex, group=group):
                text.append(chunk.text)
                count, finish = chunk.completion_tokens, chunk.finish_reason or finish
                if chunk.logprobs is not None:
                    logprobs += wire_logprobs(engine.token_pieces, chunk.logprobs)
            return "".join(text), finish, count, logprobs

        results = await asyncio.gather(*(choice(i) for i in range(req.n)))
        return answer(mv, req, results, len(ids), chat)

    async def _embed(self, mv: ModelVersion, req: p.EmbeddingRequest) -> dict[str, Any]:
        model = await self._model(mv)
        if req.dimensions is not None and req.dimensions > model.dimensions:
            raise APIError(400, f"dimensions={req.dimensions} exceeds the model's {model.dimensions}",
                           "dimensions", "invalid_value")
        vectors, tokens = await asyncio.to_thread(model.embed, req.texts(), None)  # (N, D), [N]
        if req.dimensions:  # as the online server: truncate the normalised vectors, renormalise
            vectors = vectors[:, :req.dimensions]
            vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)
        data = []
        for i, vec in enumerate(vectors):
            value: Any = (base64.b64encode(vec.astype("<f4").tobytes()).decode()
                          if req.encoding_format == "base64" else vec.tolist())
            data.append({"object": "embedding", "index": i, "embedding": value})
        return {"object": "list", "data": data, "model": mv.id,
                "usage": {"prompt_tokens": int(sum(tokens)), "total_tokens": int(sum(tokens))}}
