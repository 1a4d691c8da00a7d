"""What prefix caching saves: time to first token of a request whose ~1,000-token prefix is cached.

    python benchmarks/prefix_cache.py [--storage DIR] [--rules 37] [--tokens 32] [--rounds 3]

Both engines in-process on SmolLM2-135M (transformers on the safetensors, llama.cpp on the
registry's GGUF), greedy, one request at a time. Two chat prompts share a system prompt of
``--rules`` few-shot rules (~20 tokens each) and differ in the user's question. Each round:
the cache is emptied, B runs uncached ("second, uncached"); the cache is emptied again, A runs
("first": a full prefill, which leaves its KV in the cache) and then B ("second": only the
question is prefilled). Ratios are of median TTFTs over ``--rounds`` rounds, and B's tokens
with and without the cache must be equal. Writes ``benchmarks/results/prefix_cache.json``
with the load average before and after (the machine is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from maas_ray.engines import SamplingParams
from maas_ray.registry import Registry
from maas_ray.registry.importer import ensure_base_models

RESULTS = Path(__file__).resolve().parent / "results" / "prefix_cache.json"


def system_prompt(rules: int) -> str:
    return "You are the help desk of a hardware store. " + " ".join(
        f"Rule {i}: when a customer asks about aisle {i}, say it holds item group {i} and is open." for i in
        range(1, rules + 1))


async def ttft(engine, ids: list[int], tokens: int) -> tuple[float, list[int]]:
    """(seconds to the first token, all tokens) of one greedy request."""
    params = SamplingParams(max_tokens=tokens, temperature=0)
    start, first, out = time.perf_counter(), None, []
    async for chunk in engine.generate(ids, params, f"bench-{time.monotonic_ns()}"):
        first = first or time.perf_counter() - start
        out += chunk.token_ids
    while engine.stats()["running"]:  # its KV reaches the cache just after the last chunk
        await asyncio.sleep(0.005)
    return first, out


def bench(engine, rules: int, tokens: int, rounds: int) -> dict:
    system = {"role": "system", "content": system_prompt(rules)}
    a = engine.apply_chat_template([system, {"role": "user", "content": "Where do I find aisle 12?"}])
    b = engine.apply_chat_template([system, {"role": "user", "content": "Is aisle 31 open today?"}])
    asyncio.run(ttft(engine, b[-64:], 2))  # warm-up: kernels, allocator
    rows: dict[str, list[float]] = {"first": [], "second": [], "second_uncached": []}
    equal = True
    for _ in range(rounds):
        engine.reset_prefix_cache()
        seconds, uncached = asyncio.run(ttft(engine, b, tokens))
        rows["second_uncached"].append(seconds)
        engine.reset_prefix_cache()
        rows["first"].append(asyncio.run(ttft(engine, a, tokens))[0])
        seconds, cached = asyncio.run(ttft(engine, b, tokens))
        rows["second"].append(seconds)
        equal = equal and cached == uncached
    stats = engine.prefix_cache_stats()
    engine.reset_prefix_cache()
    med = {k: statistics.median(v) for k, v in rows.items()}
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return {"prompt_tokens": {"a": len(a), "b": len(b), "shared": shared},
            "ttft_ms": {k: round(v * 1000, 1) for k, v in med.items()},
            "first_over_second": round(med["first"] / med["second"], 2),
            "uncached_over_cached": round(med["second_uncached"] / med["second"], 2),
            "outputs_equal": equal, "tokens_reused_per_hit": stats["prefix_cache_tokens_reused"] // max(
                1, stats["prefix_cache_hits"]),
            "rounds_ms": {k: [round(x * 1000, 1) for x in v] for k, v in rows.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default=None, help="registry holding the base models (imported if missing)")
    parser.add_argument("--rules", type=int, default=37, help="few-shot rules in the shared system prompt")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request (outputs compared)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    registry = Registry(args.storage or tempfile.mkdtemp(prefix="maas-pc-bench-"))
    ensure_base_models(registry)
    folder = registry.local_dir(registry.get("smollm2-135m-instruct"))
    result = {"rules": args.rules, "tokens": args.tokens, "rounds": args.rounds,
              "load_average": os.getloadavg()[0], "engines": {}}
    from maas_ray.engines import TransformersEngine
    from maas_ray.engines.llamacpp_engine import LlamaCppEngine, llama_cpp_available

    makers = {"transformers": lambda: TransformersEngine(folder, max_batch_size=4)}
    if llama_cpp_available():
        makers["llama.cpp"] = lambda: LlamaCppEngine(folder / "model.gguf", tokenizer_dir=folder,
                                                     max_batch_size=4, self_check=False)
    for name, make in makers.items():
        with make() as engine:
            result["engines"][name] = bench(engine, args.rules, args.tokens, args.rounds)
    result["load_average_after"] = os.getloadavg()[0]
    for name, row in result["engines"].items():
        ms = row["ttft_ms"]
        print(f"{name:12s} shared {row['prompt_tokens']['shared']:5d} tok   TTFT first {ms['first']:8.1f} ms   "
              f"second {ms['second']:7.1f} ms   (uncached {ms['second_uncached']:8.1f} ms)   "
              f"first/second {row['first_over_second']:5.2f}x   outputs equal {row['outputs_equal']}")
    print(json.dumps(result, indent=2))
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
