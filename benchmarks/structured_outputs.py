"""What the structured-output mask costs: decode tok/s with and without a grammar, same prompt.

    python benchmarks/structured_outputs.py [--storage DIR] [--tokens 64] [--streams 1] [--rounds 3]

Both engines in-process on SmolLM2-135M (transformers on the safetensors, llama.cpp on the
registry's GGUF), greedy. "free": the prompt decoded with ``ignore_eos``; "json": the same
prompt under a JSON schema whose one string must be long (``minLength``), so both runs decode
exactly ``--tokens`` tokens and only the mask (computed by llguidance, applied to the logits
row, then ``consume``) differs. Runs alternate free/json ``--rounds`` times (side by side, so
machine load hits both alike); tok/s counts decode steps after the first token, median of
rounds, summed over ``--streams`` concurrent requests. Writes
``benchmarks/results/structured_outputs.json``.
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
from maas_ray.engines.constraints import json_grammar
from maas_ray.registry import Registry
from maas_ray.registry.importer import ensure_base_models

RESULTS = Path(__file__).resolve().parent / "results" / "structured_outputs.json"
SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 2000}},
          "required": ["story"], "additionalProperties": False}
PROMPT = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper, as JSON."}]


async def decode_tok_s(engine, ids: list[int], params: SamplingParams, streams: int) -> float:
    """Decode tokens per second over ``streams`` concurrent copies of the request."""
    async def one(i: int) -> tuple[float, float, int]:
        first = last = None
        count = 0
        async for chunk in engine.generate(ids, params, f"bench-{time.monotonic_ns()}-{i}"):
            last = time.perf_counter()
            first = first or last
            count = chunk.completion_tokens
        return first, last, count

    runs = await asyncio.gather(*(one(i) for i in range(streams)))
    start, end = min(r[0] for r in runs), max(r[1] for r in runs)
    tokens = sum(r[2] - 1 for r in runs)
    return tokens / (end - start)


def bench(engine, tokens: int, streams: int, rounds: int) -> dict:
    ids = engine.apply_chat_template(PROMPT)
    free = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    constrained = SamplingParams(max_tokens=tokens, temperature=0, grammar=json_grammar(SCHEMA))
    asyncio.run(decode_tok_s(engine, ids, constrained, 1))  # warm-up: the tokenizer index and grammar
    rows: dict[str, list[float]] = {"free": [], "json": []}
    for _ in range(rounds):
        rows["free"].append(asyncio.run(decode_tok_s(engine, ids, free, streams)))
        rows["json"].append(asyncio.run(decode_tok_s(engine, ids, constrained, streams)))
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {"tok_s": {k: round(v, 1) for k, v in med.items()}, "json_over_free": round(med["json"] / med["free"], 3),
            "rounds": {k: [round(x, 1) for x in v] for k, v in rows.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default=None, help="registry holding the base models (imported if missing)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    registry = Registry(args.storage or tempfile.mkdtemp(prefix="maas-so-bench-"))
    ensure_base_models(registry)
    folder = registry.local_dir(registry.get("smollm2-135m-instruct"))
    result = {"tokens": args.tokens, "streams": args.streams, "load_average": os.getloadavg()[0], "engines": {}}
    from maas_ray.engines import TransformersEngine

    with TransformersEngine(folder, max_batch_size=max(1, args.streams)) as engine:
        result["engines"]["transformers"] = bench(engine, args.tokens, args.streams, args.rounds)
    try:
        from maas_ray.engines import LlamaCppEngine

        with LlamaCppEngine(folder / "model.gguf", tokenizer_dir=folder, max_batch_size=max(1, args.streams),
                            self_check=False) as engine:
            result["engines"]["llama.cpp"] = bench(engine, args.tokens, args.streams, args.rounds)
    except ImportError:
        pass  # llama.cpp engine not installed
    result["load_average_after"] = os.getloadavg()[0]
    for name, row in result["engines"].items():
        print(f"{name:12s} free {row['tok_s']['free']:7.1f} tok/s   json {row['tok_s']['json']:7.1f} tok/s   "
              f"ratio {row['json_over_free']:.3f}")
    print(json.dumps(result, indent=2))
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
