"""Batch API throughput against the online service, side by side on one app and one model.

    python benchmarks/batch_api.py [--requests 1000] [--max-tokens 32] [--streams 16]

One local Ray (with its dashboard: batches run as Ray jobs) and the maas app. The same
greedy chat requests (distinct prompts, ``max_tokens`` each) are answered (a) online, by
``--streams`` concurrent clients of ``/v1/chat/completions``, then (b) as one batch
(``/v1/batches``: Ray Data actors of their own, ``AppArgs.batches``). Prints completion
tokens/s of each and their ratio; for the batch both end to end (create → completed, which
includes the Ray job's start and the actor loading the model) and while in progress. Writes
benchmarks/results/batch_api.json with the command, ``uptime`` before and after, and the
1-minute load average sampled every 5 s through each side (min/mean/max). Run it where
nothing else loads the CPUs, or read the ratio only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai

CHAT = "smollm2-135m-instruct"
RESULTS = Path(__file__).parent / "results" / "batch_api.json"
TOPICS = ["the sea", "a lighthouse", "winter", "a robot", "the moon", "a market", "a river", "a cat",
          "mountains", "a train", "autumn", "a library", "a storm", "a garden", "the desert", "a city"]


def body(i: int, max_tokens: int) -> dict:
    topic = TOPICS[i % len(TOPICS)]
    return {"model": CHAT, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": f"Write story number {i} about {topic}."}]}


async def online(url: str, n: int, max_tokens: int, streams: int) -> dict:
    """``n`` requests by ``streams`` concurrent clients; completion tokens per second."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600,
                                http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=streams)))
    await client.chat.completions.create(**body(0, 2))  # warm-up: loads the model into a replica
    todo = iter(range(n))
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        for i in todo:
            r = await client.chat.completions.create(**body(i, max_tokens))
            tokens += r.usage.completion_tokens

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(streams)))
    wall = time.perf_counter() - start
    return {"requests": n, "streams": streams, "completion_tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 2)}


def batch(url: str, n: int, max_tokens: int) -> dict:
    """One batch of ``n`` requests; completion tokens per second end to end and in progress."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    lines = "".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": body(i, max_tokens)}) + "\n" for i in range(n))
    file_id = client.files.create(file=("bench.jsonl", lines.encode()), purpose="batch").id
    start = time.perf_counter()
    b = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    running_at = None
    while b.status not in ("completed", "failed", "cancelled"):
        time.sleep(0.5)
        b = client.batches.retrieve(b.id)
        if running_at is None and b.status == "in_progress":
            running_at = time.perf_counter()
    end = time.perf_counter()
    assert b.status == "completed" and b.request_counts.failed == 0, b
    tokens = sum(json.loads(x)["response"]["body"]["usage"]["completion_tokens"]
                 for x in client.files.content(b.output_file_id).text.splitlines())
    return {"requests": n, "completion_tokens": tokens, "wall_s": round(end - start, 2),
            "tokens_per_s": round(tokens / (end - start), 2),
            "in_progress_s": round(end - (running_at or start), 2),
            "in_progress_tokens_per_s": round(tokens / (end - (running_at or start)), 2)}


class LoadSampler:
    """The 1-minute load average every few seconds while a side runs: on a shared machine
    the ratio means little without it."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s, self.samples = every_s, [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def span(self) -> dict[str, float]:
        return {"min": round(min(self.samples), 1), "mean": round(sum(self.samples) / len(self.samples), 1),
                "max": round(max(self.samples), 1)}


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--online-requests", type=int, default=None,
                        help="requests for the online side (default: --requests)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--engine", default="auto", choices=["auto", "transformers", "llama.cpp"])
    parser.add_argument("--storage", default=None, help="storage root (default: a temporary one)")
    args = parser.parse_args()

    import ray
    from ray import serve

    from maas_ray.registry import Registry
    from maas_ray.registry.importer import ensure_base_models
    from maas_ray.serve.app import build_app

    root = args.storage or tempfile.mkdtemp(prefix="maas-bench-batch-")
    os.environ["MAAS_HOME"] = root
    ensure_base_models(Registry(root))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", logging_level="ERROR", include_dashboard=True,
             runtime_env={"env_vars": {"MAAS_HOME": root}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"storage": root, "llm": {"engine": args.engine}}), name="maas", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        uptime_before = _uptime()
        with LoadSampler() as load_online:
            a = asyncio.run(online(url, args.online_requests or args.requests, args.max_tokens, args.streams))
        with LoadSampler() as load_batch:
            b = batch(url, args.requests, args.max_tokens)
        uptime_after = _uptime()
    finally:
        serve.shutdown()
        ray.shutdown()
    a["load_average_1min"], b["load_average_1min"] = load_online.span(), load_batch.span()
    load_before, load_after = load_online.samples[0], load_batch.samples[-1]
    result = {"engine": args.engine, "max_tokens": args.max_tokens, "online": a, "batch": b,
              "ratio_end_to_end": round(b["tokens_per_s"] / a["tokens_per_s"], 2),
              "ratio_in_progress": round(b["in_progress_tokens_per_s"] / a["tokens_per_s"], 2),
              "load_average": [round(load_before, 1), round(load_after, 1)],
              "uptime": [uptime_before, uptime_after], "cpus": os.cpu_count(),
              "command": "python benchmarks/batch_api.py " + " ".join(sys.argv[1:])}
    print(f"\n{'':<34}{'requests':>9}{'tokens':>9}{'wall s':>9}{'tok/s':>9}")
    print(f"{'(a) online, %d streams' % args.streams:<34}{a['requests']:>9}{a['completion_tokens']:>9}"
          f"{a['wall_s']:>9}{a['tokens_per_s']:>9}")
    print(f"{'(b) batch, end to end':<34}{b['requests']:>9}{b['completion_tokens']:>9}"
          f"{b['wall_s']:>9}{b['tokens_per_s']:>9}")
    print(f"{'(b) batch, while in progress':<34}{b['requests']:>9}{b['completion_tokens']:>9}"
          f"{b['in_progress_s']:>9}{b['in_progress_tokens_per_s']:>9}")
    print(f"ratio batch/online: {result['ratio_end_to_end']}x end to end, {result['ratio_in_progress']}x "
          f"in progress (engine {args.engine}, 1-minute load average online {a['load_average_1min']}, "
          f"batch {b['load_average_1min']} on {os.cpu_count()} CPUs)")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
