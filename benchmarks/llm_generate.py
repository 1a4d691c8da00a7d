"""SmolLM2 generation throughput on this machine, side by side in one run.

    python benchmarks/llm_generate.py [--new-tokens 128] [--levels 1 4 16]

(a) sequential in-process ``model.generate`` (one request at a time), (b) one
static in-process batch of 16 through ``generate`` (the ceiling), (c) the maas
Serve app over HTTP (streaming SSE) at 1, 4 and 16 concurrent streams. Reports
output tokens/s, time to first token, inter-token latency p50/p99 and the
ratios (c)/(a) and (c)/(b); then embeddings/s at concurrency 32 against an
in-process batched forward. Writes benchmarks/results/llm_generate.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch

from maas_ray.registry import Registry
from maas_ray.registry.importer import ensure_base_models

RESULTS = Path(__file__).parent / "results" / "llm_generate.json"
CHAT, EMB = "smollm2-135m-instruct", "all-minilm-l6-v2"
TOPICS = ["the sea", "a lighthouse", "winter", "a robot", "the moon", "a market", "a river", "a cat",
          "mountains", "a train", "autumn", "a library", "a storm", "a garden", "the desert", "a city"]


def prompts(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]}."}]
            for i in range(n)]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


class _Clock:
    """A transformers streamer that timestamps every generated step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._first = True

    def put(self, value) -> None:
        if self._first:  # generate() first puts the prompt
            self._first = False
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def in_process(model_dir: str, new_tokens: int, sequential: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    encode = lambda msgs: tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)  # noqa: E731
    out: dict = {}
    # (a) one request at a time
    tokens, wall, ttft, itl = 0, 0.0, [], []
    for msgs in prompts(sequential):
        batch = tok([encode(msgs)], return_tensors="pt")
        clock = _Clock()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           streamer=clock)
        wall += time.perf_counter() - start
        tokens += len(clock.times)
        ttft.append(clock.times[0] - start)
        itl += [b - a for a, b in zip(clock.times, clock.times[1:])]
    out["a_sequential"] = {"requests": sequential, "tokens": tokens, "tokens_per_s": tokens / wall,
                           "ttft_ms": 1000 * statistics.median(ttft), "itl_p50_ms": 1000 * pct(itl, 0.5),
                           "itl_p99_ms": 1000 * pct(itl, 0.99)}
    # (b) one static batch of 16
    batch = tok([encode(m) for m in prompts(16)], return_tensors="pt", padding=True)
    clock = _Clock()
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       streamer=clock, pad_token_id=tok.pad_token_id)
    wall = time.perf_counter() - start
    steps = [b - a for a, b in zip(clock.times, clock.times[1:])]
    out["b_static_batch16"] = {"requests": 16, "tokens": 16 * len(clock.times), "tokens_per_s": 16 * len(clock.times) / wall,
                               "ttft_ms": 1000 * (clock.times[0] - start), "itl_p50_ms": 1000 * pct(steps, 0.5),
                               "itl_p99_ms": 1000 * pct(steps, 0.99)}
    return out


async def stream_one(client: httpx.AsyncClient, url: str, msgs, new_tokens: int) -> dict:
    start = time.perf_counter()
    times: list[float] = []
    usage = None
    body = {"model": CHAT, "messages": msgs, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if any(c.get("delta", {}).get("content") for c in chunk["choices"]):
                times.append(time.perf_counter())
    return {"start": start, "times": times, "tokens": usage["completion_tokens"] if usage else len(times)}


async def service_level(base: str, concurrency: int, new_tokens: int) -> dict:
    url = f"{base}/v1/chat/completions"
    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        runs = await asyncio.gather(*(stream_one(client, url, m, new_tokens) for m in prompts(concurrency)))
        wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in runs)
    itl = [b - a for r in runs for a, b in zip(r["times"], r["times"][1:])]
    return {"concurrency": concurrency, "tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft_ms": 1000 * statistics.median(r["times"][0] - r["start"] for r in runs if r["times"]),
            "itl_p50_ms": 1000 * pct(itl, 0.5), "itl_p99_ms": 1000 * pct(itl, 0.99)}


async def embeddings_service(base: str, concurrency: int, total: int) -> float:
    sentences = [f"Sentence number {i} about {TOPICS[i % len(TOPICS)]}." for i in range(total)]
    it = iter(sentences)
    async with httpx.AsyncClient(timeout=120) as client:
        async def worker() -> None:
            for s in it:
                r = await client.post(f"{base}/v1/embeddings", json={"model": EMB, "input": s})
                r.raise_for_status()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return total / (time.perf_counter() - start)


def embeddings_in_process(model_dir: str, total: int) -> float:
    from maas_ray.serve.llm import Embedder

    emb = Embedder(model_dir)
    sentences = [f"Sentence number {i} about {TOPICS[i % len(TOPICS)]}." for i in range(total)]
    start = time.perf_counter()
    for i in range(0, total, 32):
        emb.embed(sentences[i:i + 32])
    return total / (time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--sequential", type=int, default=2, help="requests measured for (a)")
    parser.add_argument("--storage", default=None, help="registry holding the base models (imported if missing)")
    args = parser.parse_args()
    registry = Registry(args.storage or tempfile.mkdtemp(prefix="maas-llm-bench-"))
    dirs = {mv.name: str(registry.local_dir(mv)) for mv in ensure_base_models(registry)}
    results: dict = {"new_tokens": args.new_tokens, "torch_threads": torch.get_num_threads()}

    print("(a)/(b) in-process generate ...", flush=True)
    results.update(in_process(dirs[CHAT], args.new_tokens, args.sequential))
    print("embeddings in-process ...", flush=True)
    results["embeddings_in_process_per_s"] = embeddings_in_process(dirs[EMB], 256)

    import ray
    from ray import serve

    from maas_ray.runtime import quiet_ray_data
    from maas_ray.serve.app import build_app

    ray.init(address="local", logging_level="ERROR", include_dashboard=False)
    quiet_ray_data()
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"storage": registry.root, "llm": {"max_batch_size": 16}}), name="maas", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        asyncio.run(service_level(base, 1, 4))  # warm-up: loads the model into the replica
        results["c_service"] = []
        for level in args.levels:
            print(f"(c) service, {level} concurrent streams ...", flush=True)
            results["c_service"].append(asyncio.run(service_level(base, level, args.new_tokens)))
        asyncio.run(embeddings_service(base, 8, 32))  # warm-up
        results["embeddings_service_c32_per_s"] = asyncio.run(embeddings_service(base, 32, 256))
    finally:
        serve.shutdown()
        ray.shutdown()
    report(results)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {RESULTS}")


def report(r: dict) -> None:
    a, b = r["a_sequential"]["tokens_per_s"], r["b_static_batch16"]["tokens_per_s"]
    print(f"\n{'variant':<28}{'tok/s':>8}{'TTFT ms':>9}{'ITL p50':>9}{'ITL p99':>9}{'vs (a)':>8}{'vs (b)':>8}")
    rows = [("(a) sequential generate", r["a_sequential"]), ("(b) static batch 16", r["b_static_batch16"])]
    rows += [(f"(c) service x{x['concurrency']}", x) for x in r["c_service"]]
    for name, x in rows:
        print(f"{name:<28}{x['tokens_per_s']:>8.1f}{x['ttft_ms']:>9.0f}{x['itl_p50_ms']:>9.1f}"
              f"{x['itl_p99_ms']:>9.1f}{x['tokens_per_s'] / a:>7.2f}x{x['tokens_per_s'] / b:>7.0%}")
    print(f"\nembeddings/s: service at concurrency 32 {r['embeddings_service_c32_per_s']:.0f}, "
          f"in-process batch 32 {r['embeddings_in_process_per_s']:.0f} "
          f"({r['embeddings_service_c32_per_s'] / r['embeddings_in_process_per_s']:.0%})")


if __name__ == "__main__":
    main()
