"""SmolLM2 text generation on this machine: transformers and llama.cpp, alone and behind our service.

    python benchmarks/llm_generate.py                     # every row, one run (starts a local Ray + the app)
    python benchmarks/llm_generate.py --engines llama.cpp # only the llama.cpp rows (fast)
    python benchmarks/llm_generate.py --url http://127.0.0.1:8000 --model M   # service rows: a running app

Rows, every request generating ``--new-tokens`` tokens (EOS ignored; over HTTP a
request may stop early at EOS and its real count is used), at 1/4/16 streams;
``--repeat N`` keeps the fastest of N runs of each llama.cpp/engine/service row
(the machine may be shared):

transformers (the version's fp32 safetensors)
  (a) sequential in-process ``model.generate``, one request at a time;
  (b) one static in-process batch of 16 through ``generate``: its batching ceiling;
  (c) our continuous-batching engine in process;
  (d) 16 arrivals at once, time to first token (p50, median of ``--burst-rounds``
      waves), the engine prefilling one prompt per forward (``max_prefill_batch=1``,
      as before batched prefill) and all of them in one forward (the default);
llama.cpp (the same version's GGUF file)
  (e) llama-cpp-python alone, sequential (the high-level ``Llama``): the user's alternative;
  (f) llama.cpp's own batched decode in process (a bare ``llama_batch`` loop, all
      streams in lock step, no streaming): the ceiling;
  (g) our llama.cpp engine in process;
both
  (s) our service over HTTP (the official openai SDK, streaming), with each engine.

Targets: transformers service/engine at 16 streams ≥ 6× (a) and ≥ 70 % of (b);
(d) batched TTFT p50 ≤ half of one-at-a-time; llama.cpp service ≥ 0.95× (e) at 1
stream and ≥ 90 % of (f) at 16. Load averages at start and end are printed and
written to ``benchmarks/results/llm_generate.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import torch

from maas_ray.registry import Registry
from maas_ray.registry.importer import ensure_base_models

sys.path.insert(0, str(Path(__file__).parent))
from request_path import role, snapshot  # noqa: E402  (a sibling script, not a package)

RESULTS = Path(__file__).parent / "results" / "llm_generate.json"
CHAT = "smollm2-135m-instruct"
TOPICS = ["the sea", "a lighthouse", "winter", "a robot", "the moon", "a market", "a river", "a cat",
          "mountains", "a train", "autumn", "a library", "a storm", "a garden", "the desert", "a city"]
TARGET_VS_A, TARGET_VS_B = 6.0, 0.70
TARGET_LLAMA_1, TARGET_LLAMA_16 = 0.95, 0.90  # x (e) at 1 stream; x (f) at 16
TARGET_BURST_TTFT = 2.0  # (d): one-at-a-time p50 / batched p50


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]}."}]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def summary(tokens: int, wall_s: float, ttft_s: list[float], itl_s: list[float], **extra: Any) -> dict:
    return {**extra, "tokens": tokens, "wall_s": round(wall_s, 2), "tokens_per_s": tokens / wall_s,
            "ttft_ms": 1000 * statistics.median(ttft_s), "itl_p50_ms": 1000 * pct(itl_s, 0.5),
            "itl_p99_ms": 1000 * pct(itl_s, 0.99)}


REPEAT = 1  # --repeat: each row is measured this many times and the fastest run kept


def best(measure) -> dict:
    """The fastest of ``REPEAT`` runs: on a shared machine the others are someone else's load."""
    runs = [measure() for _ in range(REPEAT)]
    return dict(max(runs, key=lambda r: r["tokens_per_s"]), runs_tokens_per_s=[round(r["tokens_per_s"], 1) for r in runs])


def prompt_ids(model_dir: str, n: int) -> list[list[int]]:
    """Chat-formatted prompts as token ids, with the tokenizer both engines use."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for i in range(n):
        ids = tok.apply_chat_template(messages(i), add_generation_prompt=True, tokenize=True)
        out.append(list(ids if isinstance(ids, list) else ids["input_ids"]))
    return out


# -- transformers ------------------------------------------------------------------
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


# -- llama.cpp alone -----------------------------------------------------------------
def llamacpp_sequential(gguf: str, prompts: list[list[int]], new_tokens: int, sequential: int,
                        threads: int) -> dict:
    """(e) llama-cpp-python's high-level ``Llama`` with its defaults, one request at a time."""
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=2048, n_threads=threads, verbose=False)
    list(zip(range(4), llm.generate(prompts[0], temp=0.0)))  # warm-up
    walls, ttfts, itls = [], [], []
    for i in range(sequential):
        llm.reset()
        start, times = time.perf_counter(), []
        for _, _token in zip(range(new_tokens), llm.generate(prompts[i], temp=0.0, reset=True)):
            times.append(time.perf_counter())
        walls.append(times[-1] - start)
        ttfts.append(times[0] - start)
        itls += [b - a for a, b in zip(times, times[1:])]
    llm.close()
    return summary(sequential * new_tokens, sum(walls), ttfts, itls, requests=sequential)


def llamacpp_batched(gguf: str, prompts: list[list[int]], new_tokens: int, threads: int,
                     flash_attn: bool = True) -> dict:
    """(f) every prompt prefilled in one ``llama_decode``, then one decode per step for all
    sequences at once (greedy argmax, nothing streamed): llama.cpp's own batching ceiling."""
    import llama_cpp as L
    import numpy as np

    from maas_ray.engines.llamacpp_engine import load_llama_cpp

    load_llama_cpp()  # routes llama.cpp's log lines to logging
    n = len(prompts)
    model = L.llama_model_load_from_file(gguf.encode(), L.llama_model_default_params())
    params = L.llama_context_default_params()
    prefill = sum(len(p) for p in prompts)
    params.n_ctx = prefill + n * new_tokens + 256
    params.n_batch = params.n_ubatch = max(prefill, n)
    params.n_seq_max, params.n_threads, params.n_threads_batch = n, threads, threads
    params.flash_attn, params.no_perf = flash_attn, True
    ctx = L.llama_init_from_model(model, params)
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    batch = L.llama_batch_init(params.n_batch, 0, 1)

    def decode(rows: list[tuple[int, int, int, bool]]) -> None:  # (token, pos, seq, logits)
        for i, (token, pos, seq, logits) in enumerate(rows):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(rows)
        assert L.llama_decode(ctx, batch) == 0

    def argmax(i: int) -> int:
        return int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,))))

    start = time.perf_counter()
    rows = [(t, pos, s, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, t in enumerate(p)]
    decode(rows)
    last_rows = [i for i, r in enumerate(rows) if r[3]]
    tokens = [argmax(i) for i in last_rows]
    times = [time.perf_counter()]
    for step in range(1, new_tokens):
        decode([(tokens[s], len(prompts[s]) + step - 1, s, True) for s in range(n)])
        tokens = [argmax(s) for s in range(n)]
        times.append(time.perf_counter())
    wall = times[-1] - start
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    itl = [b - a for a, b in zip(times, times[1:])]
    return summary(n * new_tokens, wall, [times[0] - start], itl, concurrency=n)


# -- our engines in process, and the service over HTTP ----------------------------------------
async def _engine_stream(engine, i: int, new_tokens: int) -> tuple[float, list[float], int]:
    from maas_ray.engines import SamplingParams

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


async def concurrent_level(stream, level: int, cpu: bool = False) -> dict:
    """``level`` streams at once; tokens/s over the wall time of the whole wave. ``cpu``: also
    the CPU ms per generated token of each process of this machine's Ray session, by role
    (:mod:`request_path`), which shows where a service row's time goes."""
    if cpu:
        me = psutil.Process()
        procs = [me, *me.children(recursive=True)]
        roles = {p.pid: "client (openai SDK)" if p.pid == me.pid else role(p) for p in procs}
        before = snapshot(procs)
    start = time.perf_counter()
    runs = await asyncio.gather(*(stream(i) for i in range(level)))
    wall = time.perf_counter() - start
    itl = [b - a for _, times, _ in runs for a, b in zip(times, times[1:])]
    tokens = sum(n for _, _, n in runs)
    extra: dict[str, Any] = {}
    if cpu:
        after = snapshot(procs)
        by_role: dict[str, float] = {}
        for pid in before.keys() & after.keys():
            by_role[roles[pid]] = by_role.get(roles[pid], 0.0) + after[pid][0] - before[pid][0]
        extra["cpu_ms_per_token"] = {k: round(1000 * v / max(tokens, 1), 3)
                                     for k, v in sorted(by_role.items(), key=lambda kv: -kv[1])}
    return summary(tokens, wall, [times[0] - t0 for t0, times, _ in runs if times], itl,
                   concurrency=level, **extra)


async def abest(measure) -> dict:
    runs = [await measure() for _ in range(REPEAT)]
    return dict(max(runs, key=lambda r: r["tokens_per_s"]), runs_tokens_per_s=[round(r["tokens_per_s"], 1) for r in runs])


def engine_levels(make_engine, new_tokens: int, levels: list[int]) -> list[dict]:
    with make_engine() as engine:
        async def run_all() -> list[dict]:
            await _engine_stream(engine, 0, 4)  # warm-up
            return [await abest(lambda lvl=lvl: concurrent_level(lambda i: _engine_stream(engine, i, new_tokens), lvl))
                    for lvl in levels]

        return asyncio.run(run_all())


def burst_ttft(model_dir: str, rounds: int) -> dict:
    """(d) 16 requests arriving at once (4 tokens each): TTFT p50 of each wave, with one
    prompt per prefill forward and with all of them in one, alternating wave by wave so
    both see the same machine load. Each figure is the median over ``rounds`` waves."""
    from maas_ray.engines import TransformersEngine

    async def wave(engine) -> float:
        runs = await asyncio.gather(*(_engine_stream(engine, i, 4) for i in range(16)))
        return statistics.median(times[0] - start for start, times, _ in runs)

    p50: dict[int, list[float]] = {1: [], 16: []}
    for _ in range(rounds):
        for b in p50:  # one engine at a time: a second idle OpenMP team slows the first
            with TransformersEngine(model_dir, max_batch_size=16, max_prefill_batch=b) as engine:
                async def measure() -> float:
                    await _engine_stream(engine, 0, 4)  # warm-up
                    return await wave(engine)

                p50[b].append(asyncio.run(measure()))
                print(f"    {b} per prefill forward: TTFT p50 {1000 * p50[b][-1]:.0f} ms", flush=True)
    one, batched = (1000 * statistics.median(p50[b]) for b in (1, 16))
    return {"one_at_a_time_ttft_p50_ms": one, "batched_ttft_p50_ms": batched, "speedup": one / batched,
            "waves_ms": {str(b): [round(1000 * x) for x in v] for b, v in p50.items()}}


def service_levels(url: str, model: str, new_tokens: int, levels: list[int], local: bool = False) -> list[dict]:
    """Service rows; ``local``: the app runs in this process's Ray session, so CPU by process is read too."""
    from openai import AsyncOpenAI

    async def run_all() -> list[dict]:
        client = AsyncOpenAI(base_url=f"{url.rstrip('/')}/v1", api_key=os.environ.get("MAAS_API_KEY", "none"),
                             timeout=600)
        await _http_stream(client, model, 0, 4)  # warm-up: loads the model into a replica
        return [await abest(lambda lvl=lvl: concurrent_level(lambda i: _http_stream(client, model, i, new_tokens),
                                                             lvl, cpu=local))
                for lvl in levels]

    return asyncio.run(run_all())


def local_service(root: str, engines: list[str], new_tokens: int, levels: list[int],
                  llama_cpp_threads: int | None = None,
                  stream_intervals: tuple[float, ...] = (0.05,)) -> dict[str, list[dict]]:
    """Our app on a local Ray, deployed once per engine (``llm.engine``) and stream interval
    (``llm.stream_interval_s``; the first is the default, keyed by the engine alone),
    measured over HTTP."""
    import ray
    from ray import serve

    from maas_ray.serve.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", logging_level="ERROR", include_dashboard=False)
    out = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for engine in engines:
            for k, interval in enumerate(stream_intervals):
                llm = {"engine": engine, "llama_cpp_threads": llama_cpp_threads, "stream_interval_s": interval}
                serve.run(build_app({"storage": root, "llm": llm}), name="maas", route_prefix="/")
                key = engine if k == 0 else f"{engine}, stream every {interval:g} s"
                out[key] = service_levels(f"http://127.0.0.1:{port}", CHAT, new_tokens, levels, local=True)
                serve.delete("maas")
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


# -- report ------------------------------------------------------------------------------------
def report(r: dict) -> None:
    base = {"transformers": r.get("a_sequential"), "llama.cpp": r.get("e_llamacpp_sequential")}
    print(f"\n{'variant':<42}{'tok/s':>8}{'TTFT ms':>9}{'ITL p50':>9}{'ITL p99':>9}{'vs alone':>10}")
    for engine, alone in base.items():
        if alone is None:
            continue
        rows = [(f"alone, sequential ({engine})", alone)]
        if engine == "transformers" and "b_static_batch16" in r:
            rows.append(("(b) static batch 16 generate", r["b_static_batch16"]))
        if engine == "llama.cpp":
            rows += [(f"(f) llama.cpp batched x{x['concurrency']}", x) for x in r.get("f_llamacpp_batched", [])]
        rows += [(f"engine in process x{x['concurrency']}", x) for x in r.get("engine", {}).get(engine, [])]
        for key, levels in r.get("service", {}).items():
            if key == engine or key.startswith(f"{engine}, "):
                label = key.removeprefix(engine).removeprefix(", ")
                rows += [(f"service x{x['concurrency']}{' ' + label if label else ''}", x) for x in levels]
        print(f"-- {engine}")
        for name, x in rows:
            print(f"{name:<42}{x['tokens_per_s']:>8.1f}{x['ttft_ms']:>9.0f}{x['itl_p50_ms']:>9.1f}"
                  f"{x['itl_p99_ms']:>9.1f}{x['tokens_per_s'] / alone['tokens_per_s']:>9.2f}x")
    for key, levels in r.get("service", {}).items():
        for x in levels:
            if "cpu_ms_per_token" in x:
                parts = ", ".join(f"{k} {v:.2f}" for k, v in x["cpu_ms_per_token"].items() if v >= 0.05)
                print(f"service {key} x{x['concurrency']}: CPU ms per token by process: {parts}")
    for line in r.get("targets", {}).values():
        print(line)


def targets(r: dict) -> dict[str, str]:
    out = {}
    tf = r.get("service", {}).get("transformers") or r.get("engine", {}).get("transformers") or []
    top = [x for x in tf if x["concurrency"] == 16]
    if top and "a_sequential" in r:
        vs_a = top[0]["tokens_per_s"] / r["a_sequential"]["tokens_per_s"]
        vs_b = top[0]["tokens_per_s"] / r["b_static_batch16"]["tokens_per_s"]
        met = vs_a >= TARGET_VS_A and vs_b >= TARGET_VS_B
        out["transformers"] = (f"transformers at 16 streams: {vs_a:.2f}x (a) (target {TARGET_VS_A}x), "
                               f"{vs_b:.0%} of (b) (target {TARGET_VS_B:.0%}) -> {'met' if met else 'missed'}")
    burst = r.get("d_burst_ttft")
    if burst:
        met = burst["speedup"] >= TARGET_BURST_TTFT
        out["burst"] = (f"transformers, 16 arrivals at once, TTFT p50: {burst['one_at_a_time_ttft_p50_ms']:.0f} ms "
                        f"one prefill at a time, {burst['batched_ttft_p50_ms']:.0f} ms batched -> "
                        f"{burst['speedup']:.2f}x (target {TARGET_BURST_TTFT}x) -> {'met' if met else 'missed'}")
    lc = r.get("service", {}).get("llama.cpp") or []
    alone = r.get("e_llamacpp_sequential")
    ceiling = {x["concurrency"]: x["tokens_per_s"] for x in r.get("f_llamacpp_batched", [])}
    if lc and alone:
        by = {x["concurrency"]: x["tokens_per_s"] for x in lc}
        if 1 in by and 16 in by and 16 in ceiling:
            one, sixteen = by[1] / alone["tokens_per_s"], by[16] / ceiling[16]
            met = one >= TARGET_LLAMA_1 and sixteen >= TARGET_LLAMA_16
            out["llama.cpp"] = (f"llama.cpp service: {one:.2f}x llama-cpp-python alone at 1 stream "
                                f"(target {TARGET_LLAMA_1}x), {sixteen:.0%} of (f) batched decode at 16 "
                                f"(target {TARGET_LLAMA_16:.0%}) -> {'met' if met else 'missed'}")
    out["load"] = f"load average (1 min): {r['load_avg_at_start']:.2f} at start, {r.get('load_avg_at_end', 0):.2f} at end"
    return out


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
    parser.add_argument("--sequential", type=int, default=2, help="requests measured one at a time (a), (e)")
    parser.add_argument("--engines", nargs="+", default=["transformers", "llama.cpp"],
                        choices=["transformers", "llama.cpp"])
    parser.add_argument("--threads", type=int, default=None, help="torch / llama.cpp threads (default: CPUs)")
    parser.add_argument("--no-service", action="store_true", help="skip the HTTP rows")
    parser.add_argument("--service-llama-threads", type=int, default=None,
                        help="llama.cpp threads in the service's replica (default: its CPUs)")
    parser.add_argument("--stream-intervals", type=float, nargs="+", default=[0.05],
                        help="service rows for each llm.stream_interval_s (the first is the default)")
    parser.add_argument("--storage", default=None, help="registry holding the base models (imported if missing)")
    parser.add_argument("--url", default=None, help="measure the service rows against this running app")
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure every llama.cpp, engine and service row this often; keep the fastest")
    parser.add_argument("--model", default=CHAT, help="model id to request with --url")
    parser.add_argument("--burst-rounds", type=int, default=3, help="waves of 16 arrivals per variant in (d)")
    parser.add_argument("--burst-only", action="store_true", help="of the transformers rows, only (d)")
    args = parser.parse_args()
    global REPEAT
    REPEAT = args.repeat
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    registry = Registry(args.storage or tempfile.mkdtemp(prefix="maas-llm-bench-"))
    versions = in_own_thread(ensure_base_models, registry)
    mv = next(mv for mv in versions if mv.name == CHAT)
    model_dir = str(registry.local_dir(mv))
    gguf = str(Path(model_dir) / "model.gguf")
    results: dict[str, Any] = {
        "new_tokens": args.new_tokens, "threads": threads, "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "model": mv.id, "gguf_file_type": (mv.card.get("gguf") or {}).get("file_type"),
        "load_avg_at_start": os.getloadavg()[0], "repeat": args.repeat, "engine": {}, "service": {},
    }
    prompts = prompt_ids(model_dir, max(args.levels + [16, args.sequential]))
    if "transformers" in args.engines:
        from maas_ray.engines import TransformersEngine

        if not args.burst_only:
            print("(a)/(b) transformers generate ...", flush=True)
            results.update(in_own_thread(hf_baselines, model_dir, args.new_tokens, args.sequential))
            print(f"(c) transformers engine at {args.levels} streams ...", flush=True)
            results["engine"]["transformers"] = engine_levels(
                lambda: TransformersEngine(model_dir, max_batch_size=max(args.levels)), args.new_tokens,
                args.levels)
        print("(d) transformers engine, 16 arrivals at once: TTFT ...", flush=True)
        results["d_burst_ttft"] = burst_ttft(model_dir, args.burst_rounds)
    if "llama.cpp" in args.engines:
        from maas_ray.engines import LlamaCppEngine

        print("(e) llama-cpp-python alone ...", flush=True)
        # Each on a thread that then exits, like the transformers rows: llama.cpp's
        # OpenMP team goes with it and the engine's scheduler thread has the cores.
        results["e_llamacpp_sequential"] = best(lambda: in_own_thread(
            llamacpp_sequential, gguf, prompts, args.new_tokens, args.sequential, threads))
        print(f"(f) llama.cpp batched decode at {args.levels} ...", flush=True)
        results["f_llamacpp_batched"] = [best(lambda lvl=lvl: in_own_thread(
            llamacpp_batched, gguf, prompts[:lvl], args.new_tokens, threads)) for lvl in args.levels]
        print(f"(g) llama.cpp engine at {args.levels} streams ...", flush=True)
        results["engine"]["llama.cpp"] = engine_levels(
            lambda: LlamaCppEngine(gguf, tokenizer_dir=model_dir, max_batch_size=max(args.levels),
                                   n_threads=threads), args.new_tokens, args.levels)
    if args.url:
        print(f"(s) service at {args.url} ({args.model}) ...", flush=True)
        results["service"]["as deployed"] = service_levels(args.url, args.model, args.new_tokens, args.levels)
    elif not args.no_service:
        print(f"(s) service over HTTP with {args.engines} ...", flush=True)
        results["service"] = local_service(registry.root, args.engines, args.new_tokens, args.levels,
                                           args.service_llama_threads, tuple(args.stream_intervals))
        results["service_llama_cpp_threads"] = args.service_llama_threads or threads
    results["load_avg_at_end"] = os.getloadavg()[0]
    results["targets"] = targets(results)
    report(results)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
