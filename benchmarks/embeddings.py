"""MiniLM embeddings/s: the service at concurrency 32 against in-process batches of 32.

    python benchmarks/embeddings.py --url http://127.0.0.1:8000 [--storage ~/.maas]

One sentence per HTTP request (the worst case for the service: every request
pays the HTTP and Serve hops; ``@serve.batch`` merges them in the replica).
Writes benchmarks/results/embeddings.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import httpx

from maas_ray.registry import Registry
from maas_ray.registry.importer import ensure_base_models

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


async def service(url: str, total: int, concurrency: int) -> float:
    texts = iter(sentences(total))
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async def worker() -> None:
            for text in texts:
                r = await client.post("/v1/embeddings", json={"model": EMB, "input": text})
                r.raise_for_status()

        await client.post("/v1/embeddings", json={"model": EMB, "input": "warm-up"})
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return total / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="base URL of a running service")
    parser.add_argument("--storage", default=None, help="registry with the base models")
    parser.add_argument("--total", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    registry = Registry(args.storage)
    ensure_base_models(registry)
    local = in_process(str(registry.local_dir(registry.get(EMB))), args.total, 32)
    served = asyncio.run(service(args.url, args.total, args.concurrency))
    result = {"in_process_batch32_per_s": local, f"service_c{args.concurrency}_per_s": served,
              "ratio": served / local}
    print(f"embeddings/s: in-process batch 32 {local:.0f}, service at concurrency "
          f"{args.concurrency} {served:.0f} ({served / local:.0%})")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
