"""MiniLM embeddings/s, one sentence per request, side by side in one run.

    python benchmarks/embeddings.py [--total 512] [--concurrency 32]

(a) in-process ``Embedder`` at batch 32 (the ceiling), (b) a plain single-process
FastAPI + uvicorn server on the same ``Embedder``, (c) the maas Serve app
(``/v1/embeddings``, continuous batching in the embedding replica). One sentence
per HTTP request: the worst case for a service, every request pays the HTTP and
Serve hops. Prints each throughput, the app's mean batch (from its own metrics)
and issue 15's target ratio (app / in-process batch 32), checks the app's vectors
against in-process ones, and writes benchmarks/results/embeddings.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from pydantic import BaseModel

from predict_http import batch_counts, free_port, wait_healthy
from maas_ray.registry import Registry
from maas_ray.registry.importer import BASE_MODELS, import_hf_model

EMB = "all-minilm-l6-v2"
RESULTS = Path(__file__).parent / "results" / "embeddings.json"
TOPICS = ["the sea", "a lighthouse", "winter", "a robot", "the moon", "a market", "a river", "a cat"]


def sentences(n: int) -> list[str]:
    return [f"Sentence number {i} is about {TOPICS[i % len(TOPICS)]}." for i in range(n)]


def in_process(model_dir: str, total: int, batch: int) -> float:
    from maas_ray.engines import Embedder

    emb = Embedder(model_dir)
    texts = sentences(total)
    emb.embed(texts[:batch])  # warm-up
    start = time.perf_counter()
    for i in range(0, total, batch):
        emb.embed(texts[i:i + batch])
    return total / (time.perf_counter() - start)


class PlainRequest(BaseModel):
    model: str
    input: str


def plain_server(model_dir: str, port: int) -> None:
    """(b): the obvious single-process server a user would write."""
    import uvicorn
    from fastapi import FastAPI
    from maas_ray.engines import Embedder

    emb = Embedder(model_dir)
    app = FastAPI()

    @app.post("/v1/embeddings")
    def embed(req: PlainRequest) -> dict:  # sync def: FastAPI runs it in a thread pool
        vectors, tokens = emb.embed([req.input])
        return {"object": "list", "data": [{"object": "embedding", "index": 0,
                                            "embedding": vectors[0].tolist()}]}

    @app.get("/healthz")
    def health() -> dict:
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


async def service(url: str, total: int, concurrency: int) -> float:
    texts = iter(sentences(total))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def worker() -> None:
            for text in texts:
                r = await client.post("/v1/embeddings", json={"model": EMB, "input": text})
                r.raise_for_status()

        await asyncio.gather(*(client.post("/v1/embeddings", json={"model": EMB, "input": "warm-up"})
                               for _ in range(concurrency)))
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return total / (time.perf_counter() - start)


def check_vectors(url: str, model_dir: str, n: int = 32) -> float:
    """Smallest cosine between the app's vectors (sent together, so batched) and in-process ones."""
    from maas_ray.engines import Embedder

    texts = sentences(n)
    expected, _ = Embedder(model_dir).embed(texts)

    async def ask() -> np.ndarray:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            replies = await asyncio.gather(*(client.post("/v1/embeddings", json={"model": EMB, "input": t})
                                             for t in texts))
        return np.array([r.json()["data"][0]["embedding"] for r in replies])

    cosine = float((asyncio.run(ask()) * expected).sum(axis=1).min())
    if cosine < 0.999:
        raise SystemExit(f"the app's vectors differ from in-process ones (cosine {cosine:.4f})")
    return cosine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total", type=int, default=512, help="sentences per variant")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="maas-bench-")
    registry = Registry(root)
    src = BASE_MODELS[EMB]
    model_dir = str(registry.local_dir(import_hf_model(registry, EMB, src.folder(), src.task)))

    print("(a) in-process batch 32 ...", flush=True)
    result: dict = {"in_process_batch32_per_s": in_process(model_dir, args.total, 32)}

    print("(b) plain FastAPI + uvicorn ...", flush=True)
    port = free_port()
    proc = mp.get_context("spawn").Process(target=plain_server, args=(model_dir, port), daemon=True)
    proc.start()
    try:
        wait_healthy(f"http://127.0.0.1:{port}")
        result["plain_fastapi_per_s"] = asyncio.run(service(f"http://127.0.0.1:{port}", args.total,
                                                            args.concurrency))
    finally:
        proc.terminate()
        proc.join(10)

    import ray
    from ray import serve

    from maas_ray.serve.app import build_app

    print("(c) maas Serve app ...", flush=True)
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")  # mean batch read soon after
    ray.init(address="local", logging_level="ERROR", include_dashboard=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base = f"http://127.0.0.1:{port}"
        serve.run(build_app({"storage": root}), name="maas", route_prefix="/")
        metrics = f"http://127.0.0.1:{ray.nodes()[0]['MetricsExportPort']}/metrics"
        before = batch_counts(metrics, "embedder")
        result["maas_per_s"] = asyncio.run(service(base, args.total, args.concurrency))
        time.sleep(3)  # replicas push metrics every second here
        after = batch_counts(metrics, "embedder")
        result["maas_mean_batch"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
        result["maas_min_cosine"] = check_vectors(base, model_dir)
    finally:
        serve.shutdown()
        ray.shutdown()

    local, plain, maas = (result[k] for k in ("in_process_batch32_per_s", "plain_fastapi_per_s", "maas_per_s"))
    result.update(concurrency=args.concurrency, ratio_vs_in_process=maas / local, ratio_vs_plain=maas / plain,
                  load_average=[round(x, 1) for x in os.getloadavg()])
    print(f"\nembeddings/s, one sentence per request at concurrency {args.concurrency} "
          f"(load average {result['load_average']}):")
    print(f"  (a) in-process batch 32  {local:7.0f}")
    print(f"  (b) plain FastAPI        {plain:7.0f}")
    print(f"  (c) maas app             {maas:7.0f}   mean batch {result['maas_mean_batch']:.1f}, "
          f"{maas / plain:.2f}x (b)")
    print(f"issue 15 target 2: the app is {maas / local:.0%} of in-process batch-32 (>= 50%); "
          f"vectors within cosine {result['maas_min_cosine']:.5f} of in-process")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
