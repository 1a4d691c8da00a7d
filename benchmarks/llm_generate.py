"""SmolLM2 text generation on this machine: the engine against plain transformers, side by side.

    python benchmarks/llm_generate.py [--new-tokens 128] [--levels 1 4 16] [--threads N]
    python benchmarks/llm_generate.py --url http://127.0.0.1:8000   # (c) against a running service

(a) sequential in-process ``model.generate``, one request at a time;
(b) one static in-process batch of 16 through ``generate`` (left-padded), the
    ceiling for batched decoding of this model on this CPU;
(c) the continuous-batching engine at 1, 4 and 16 concurrent streams — in
    process by default, or (``--url``) the HTTP service through the official
    openai SDK with streaming.

Every request generates exactly ``--new-tokens`` tokens (EOS ignored; over
HTTP, a request may stop early at EOS and its real count is used). Reports
output tokens/s, time to first token (median over requests), inter-token
latency p50/p99, and the ratios (c)/(a), (c)/(b). Targets at 16 streams:
≥ 6× (a) and ≥ 70 % of (b). Writes ``benchmarks/results/llm_generate.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from maas_ray.registry import Registry
from maas_ray.registry.importer import ensure_base_models

RESULTS = Path(__file__).parent / "results" / "llm_generate.json"
CHAT = "smollm2-135m-instruct"
TOPICS = ["the sea", "a lighthouse", "winter", "a robot", "the moon", "a market", "a river", "a cat",
          "mountains", "a train", "autumn", "a library", "a storm", "a garden", "the desert", "a city"]
TARGET_VS_A, TARGET_VS_B = 6.0, 0.70


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]}."}]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def summary(tokens: int, wall_s: float, ttft_s: list[float], itl_s: list[float], **extra: Any) -> dict:
    return {**extra, "tokens": tokens, "wall_s": round(wall_s, 2), "tokens_per_s": tokens / wall_s,
            "ttft_ms": 1000 * statistics.median(ttft_s), "itl_p50_ms": 1000 * pct(itl_s, 0.5),
            "itl_p99_ms": 1000 * pct(itl_s, 0.99)}


class _Clock:
    """A transformers streamer that timestamps every decode step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() puts the prompt first
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_baselines(model_dir: str, new_tokens: int, sequential: int) -> dict:
    """(a) one request at a time and (b) one static batch of 16, both via ``generate``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts = [tok.apply_chat_template(messages(i), add_generation_prompt=True, tokenize=False)
               for i in range(16)]
    fixed = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
             "pad_token_id": tok.pad_token_id}

    def run(batch_prompts: list[str]) -> tuple[float, float, list[float]]:
        batch = tok(batch_prompts, return_tensors="pt", padding=True)
        clock, start = _Clock(), time.perf_counter()
        with torch.inference_mode():
            model.generate(**batch, streamer=clock, **fixed)
        wall = time.perf_counter() - start
        return wall, clock.times[0] - start, [b - a for a, b in zip(clock.times, clock.times[1:])]

    with torch.inference_mode():  # warm-up
        model.generate(**tok(prompts[:1], return_tensors="pt"), max_new_tokens=4, do_sample=False)
    walls, ttfts, itls = [], [], []
    for i in range(sequential):
        wall, ttft, itl = run([prompts[i]])
        walls.append(wall)
        ttfts.append(ttft)
        itls += itl
    out = {"a_sequential": summary(sequential * new_tokens, sum(walls), ttfts, itls, requests=sequential)}
    wall, ttft, itl = run(prompts)
    out["b_static_batch16"] = summary(16 * new_tokens, wall, [ttft], itl, requests=16)
    return out


async def _engine_stream(engine, i: int, new_tokens: int) -> tuple[float, list[float], int]:
    from maas_ray.serve.llm import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    start, times = time.perf_counter(), []
    async for chunk in engine.generate(engine.apply_chat_template(messages(i)), params, f"bench-{i}"):
        now = time.perf_counter()
        times += [now] * len(chunk.token_ids)  # a held-back character arrives with the next token
    return start, times, len(times)


async def _http_stream(client, model: str, i: int, new_tokens: int) -> tuple[float, list[float], int]:
    start, times, usage = time.perf_counter(), [], None
    stream = await client.chat.completions.create(
        model=model, messages=messages(i), max_tokens=new_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        if any(c.delta.content for c in chunk.choices):
            times.append(time.perf_counter())
    return start, times, usage if usage is not None else len(times)


async def concurrent_level(stream, level: int) -> dict:
    """``level`` streams at once; tokens/s over the wall time of the whole wave."""
    start = time.perf_counter()
    runs = await asyncio.gather(*(stream(i) for i in range(level)))
    wall = time.perf_counter() - start
    itl = [b - a for _, times, _ in runs for a, b in zip(times, times[1:])]
    return summary(sum(n for _, _, n in runs), wall, [times[0] - t0 for t0, times, _ in runs if times], itl,
                   concurrency=level)


def engine_levels(model_dir: str, new_tokens: int, levels: list[int]) -> list[dict]:
    from maas_ray.serve.llm import TransformersEngine

    with TransformersEngine(model_dir, max_batch_size=max(levels)) as engine:
        async def run_all() -> list[dict]:
            await _engine_stream(engine, 0, 4)  # warm-up
            return [await concurrent_level(lambda i: _engine_stream(engine, i, new_tokens), lvl)
                    for lvl in levels]

        return asyncio.run(run_all())


def service_levels(url: str, model: str, new_tokens: int, levels: list[int]) -> list[dict]:
    """(c) over HTTP: the service must already run (``maas up``) and serve ``model``."""
    from openai import AsyncOpenAI

    async def run_all() -> list[dict]:
        client = AsyncOpenAI(base_url=f"{url.rstrip('/')}/v1", api_key=os.environ.get("MAAS_API_KEY", "none"),
                             timeout=600)
        await _http_stream(client, model, 0, 4)  # warm-up: loads the model into a replica
        return [await concurrent_level(lambda i: _http_stream(client, model, i, new_tokens), lvl)
                for lvl in levels]

    return asyncio.run(run_all())


def report(r: dict) -> None:
    a, b = r["a_sequential"]["tokens_per_s"], r["b_static_batch16"]["tokens_per_s"]
    heads = "".join(f"{h:>9}" for h in ("TTFT ms", "ITL p50", "ITL p99", "(c)/(a)", "(c)/(b)"))
    print(f"\n{'variant':<30}{'tok/s':>8}{heads}")
    rows = [("(a) sequential generate", r["a_sequential"]),
            ("(b) static batch 16 generate", r["b_static_batch16"])]
    rows += [(f"(c) {r['c_mode']} x{x['concurrency']}", x) for x in r["c"]]
    for name, x in rows:
        print(f"{name:<30}{x['tokens_per_s']:>8.1f}{x['ttft_ms']:>9.0f}{x['itl_p50_ms']:>9.1f}"
              f"{x['itl_p99_ms']:>9.1f}{x['tokens_per_s'] / a:>8.2f}x{x['tokens_per_s'] / b:>9.0%}")
    if "targets" in r:
        t = r["targets"]
        print(f"\nat 16 streams: {t['vs_a']:.2f}x (a) (target {TARGET_VS_A}x), {t['vs_b']:.0%} of (b) "
              f"(target {TARGET_VS_B:.0%}) -> {'met' if t['met'] else 'missed'}")


def in_own_thread(fn, *args):
    """Run ``fn`` on a thread that then exits. Its OpenMP team goes with it, so
    the engine's scheduler thread later has the cores to itself: an idle second
    team makes libgomp stop spin-waiting (see transformers_engine)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--sequential", type=int, default=2, help="requests measured one at a time for (a)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--storage", default=None,
                        help="registry holding the base models (imported if missing)")
    parser.add_argument("--url", default=None,
                        help="measure (c) against this running service (OpenAI API) instead of in process")
    parser.add_argument("--model", default=CHAT, help="model id to request with --url")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    registry = Registry(args.storage or tempfile.mkdtemp(prefix="maas-llm-bench-"))
    versions = in_own_thread(ensure_base_models, registry)
    model_dir = next(str(registry.local_dir(mv)) for mv in versions if mv.name == CHAT)
    results: dict[str, Any] = {
        "new_tokens": args.new_tokens, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "c_mode": "service" if args.url else "engine",
    }
    print("(a)/(b) in-process generate ...", flush=True)
    results.update(in_own_thread(hf_baselines, model_dir, args.new_tokens, args.sequential))
    print(f"(c) {results['c_mode']} at {args.levels} concurrent streams ...", flush=True)
    if args.url:
        results["c"] = service_levels(args.url, args.model, args.new_tokens, args.levels)
    else:
        results["c"] = engine_levels(model_dir, args.new_tokens, args.levels)
    top = [x for x in results["c"] if x["concurrency"] == 16]
    if top:
        vs_a = top[0]["tokens_per_s"] / results["a_sequential"]["tokens_per_s"]
        vs_b = top[0]["tokens_per_s"] / results["b_static_batch16"]["tokens_per_s"]
        results["targets"] = {"vs_a": vs_a, "vs_b": vs_b, "met": vs_a >= TARGET_VS_A and vs_b >= TARGET_VS_B}
    report(results)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
