"""What serving many LoRA fine-tunes on one base costs: memory and tokens/s.

    python benchmarks/adapters.py [--storage DIR] [--adapters 8] [--streams 16] [--tokens 32] [--rounds 3]

One transformers engine in process on SmolLM2-135M (what an LLMServer replica runs).
``--adapters`` rank-8 LoRA adapters on the fine-tune defaults' target modules
(q/k/v/o_proj) are made with peft, with random A and B (their values do not change
the cost), and saved as a fine-tune job saves them.

- **Memory**: the process's resident set (VmRSS) after a ``--streams`` run on the
  base alone, then after every adapter was loaded and a run over all of them.
  The check: RSS with adapters <= (RSS of the base + adapters x adapter size) x 1.15.
- **Throughput**: ``--streams`` greedy requests of ``--tokens`` new tokens at once,
  on the base alone, then spread round-robin over the adapters (the rows of one
  batch name different adapters); rounds alternate, medians compared.
- **A new adapter's first request**: time to the first token of a request for an
  adapter the engine has never loaded (reading and attaching it included), against
  the base's, on the warm engine.

Writes ``benchmarks/results/adapters.json`` with the load average before and after.
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

import torch

from maas_ray.engines import SamplingParams, TransformersEngine
from maas_ray.registry import Registry
from maas_ray.registry.importer import ensure_base_models

RESULTS = Path(__file__).resolve().parent / "results" / "adapters.json"
PROMPTS = ["Write a short poem about the sea.", "List three uses of copper.", "Explain rain to a child.",
           "What is a prime number?"]


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def make_adapters(base_dir: Path, count: int, out: Path) -> list[Path]:
    """``count`` rank-8 adapters with random weights, saved as peft saves a fine-tune."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(count):
        torch.manual_seed(i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                               LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.02)
        model.save_pretrained(str(out / f"a{i}"))
        paths.append(out / f"a{i}")
        del model
    return paths


async def burst(engine: TransformersEngine, adapters: list[str | None], tokens: int) -> tuple[float, int]:
    """(seconds, tokens) for one request per entry of ``adapters``, all at once."""
    params = [SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True, adapter=a) for a in adapters]

    async def one(i: int) -> int:
        ids = engine.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
        n = 0
        async for chunk in engine.generate(ids, params[i], f"b{i}-{time.monotonic_ns()}"):
            n += len(chunk.token_ids)
        return n

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(len(adapters))))
    return time.perf_counter() - start, sum(counts)


async def first_token(engine: TransformersEngine, adapter: str | None) -> float:
    ids = engine.apply_chat_template([{"role": "user", "content": PROMPTS[0]}])
    start = time.perf_counter()
    async for _ in engine.generate(ids, SamplingParams(max_tokens=1, temperature=0, adapter=adapter),
                                   f"t-{time.monotonic_ns()}"):
        return time.perf_counter() - start
    raise RuntimeError("no token")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default=None, help="registry holding the base models (imported if missing)")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    registry = Registry(args.storage or tempfile.mkdtemp(prefix="maas-adapter-bench-"))
    ensure_base_models(registry)
    base_dir = registry.local_dir(registry.get("smollm2-135m-instruct"))
    work = Path(tempfile.mkdtemp(prefix="maas-adapters-"))
    paths = make_adapters(base_dir, args.adapters + 1, work)  # the last one is the "new fine-tune"
    size = sum(f.stat().st_size for f in paths[0].glob("*.safetensors"))
    names = [f"ft-{i}" for i in range(args.adapters)]
    mixed = [names[i % len(names)] for i in range(args.streams)]
    base = [None] * args.streams
    with TransformersEngine(base_dir, max_batch_size=args.streams,
                            adapter_cache_max_bytes=(args.adapters + 2) * size * 2) as engine:
        asyncio.run(burst(engine, base[:2], 4))  # warm-up: kernels, allocator
        asyncio.run(burst(engine, base, args.tokens))
        rss_base = rss_bytes()
        for name, path in zip(names, paths):
            engine.add_adapter(name, path)
        asyncio.run(burst(engine, mixed, args.tokens))
        rss_adapters = rss_bytes()
        loaded = engine.stats()
        runs: dict[str, list[float]] = {"base": [], "adapters": []}
        for _ in range(args.rounds):
            for kind, rows in (("base", base), ("adapters", mixed)):
                seconds, count = asyncio.run(burst(engine, rows, args.tokens))
                runs[kind].append(count / seconds)
        base_ttft = statistics.median(asyncio.run(first_token(engine, None)) for _ in range(3))
        engine.add_adapter("ft-new", paths[-1])
        new_ttft = asyncio.run(first_token(engine, "ft-new"))
        again_ttft = asyncio.run(first_token(engine, "ft-new"))
    tok_s = {k: statistics.median(v) for k, v in runs.items()}
    bound = (rss_base + args.adapters * size) * 1.15
    result = {
        "adapters": args.adapters, "streams": args.streams, "tokens": args.tokens, "rounds": args.rounds,
        "adapter_file_bytes": size, "adapter_bytes_loaded": loaded.get("adapter_bytes"),
        "adapters_loaded": loaded.get("adapters"),
        "rss_mib": {"base": round(rss_base / 2**20, 1), "base_plus_adapters": round(rss_adapters / 2**20, 1),
                    "bound": round(bound / 2**20, 1)},
        "rss_over_base_plus_adapters": round(rss_adapters / (rss_base + args.adapters * size), 3),
        "tok_s": {k: round(v, 1) for k, v in tok_s.items()},
        "tok_s_rounds": {k: [round(x, 1) for x in v] for k, v in runs.items()},
        "adapters_over_base_tok_s": round(tok_s["adapters"] / tok_s["base"], 3),
        "first_token_ms": {"base": round(base_ttft * 1000, 1), "new_adapter": round(new_ttft * 1000, 1),
                           "new_adapter_again": round(again_ttft * 1000, 1)},
        "load_average": load_before, "load_average_after": os.getloadavg()[0],
    }
    r = result
    print(f"adapter {size / 2**20:.2f} MiB; RSS base {r['rss_mib']['base']} MiB, base + {args.adapters} adapters "
          f"{r['rss_mib']['base_plus_adapters']} MiB = {r['rss_over_base_plus_adapters']:.3f}x (base + "
          f"{args.adapters} x adapter)   [target <= 1.15]")
    print(f"{args.streams} streams: base {r['tok_s']['base']} tok/s, over {args.adapters} adapters "
          f"{r['tok_s']['adapters']} tok/s = {r['adapters_over_base_tok_s']:.2f}x   [target >= 0.70]")
    print(f"first token: base {r['first_token_ms']['base']} ms, a never-loaded adapter "
          f"{r['first_token_ms']['new_adapter']} ms, then {r['first_token_ms']['new_adapter_again']} ms")
    print(json.dumps(result, indent=2))
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
