"""Tabular predict throughput, side by side on one model and one request stream.

    python benchmarks/predict_http.py [--requests 600] [--levels 1 16 64]

(a) in-process batched forward (rows/s ceiling), (b) a plain single-process
FastAPI + uvicorn server, (c) the maas Serve app with batching off, (d) with
batching on. Each request carries one row; the same MLP (big enough that the
forward pass dominates) answers all. Prints p50/p99 latency and throughput per
concurrency level with ratios, and writes benchmarks/results/predict_http.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from pydantic import BaseModel

from maas_ray.data.preprocess import Preprocessor
from maas_ray.models.tabular import FORMAT, TabularModel, build_module
from maas_ray.registry import Registry

# Big enough that the forward pass, not HTTP, dominates a single-row request.
N_FEATURES, HIDDEN = 256, [4096, 4096, 4096]
NAME = "bench-mlp"
RESULTS = Path(__file__).parent / "results" / "predict_http.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def publish_model(root: str) -> str:
    torch.manual_seed(0)
    config = {"kind": "mlp", "hidden_sizes": HIDDEN, "dropout": 0.0, "n_features": N_FEATURES,
              "n_outputs": 1, "task": "regression"}
    pre = Preprocessor([f"f{i}" for i in range(N_FEATURES)], "y", "regression",
                       [0.0] * N_FEATURES, [1.0] * N_FEATURES)
    model = TabularModel(build_module(config), config, pre)
    with tempfile.TemporaryDirectory() as tmp:
        model.save(Path(tmp))
        card = {"task": "regression", "format": FORMAT, "n_features": N_FEATURES,
                "data": {"features": pre.features, "target": "y"}}
        return Registry(root).publish(NAME, Path(tmp), card).id


def in_process(root: str, model_id: str, rows: np.ndarray, seconds: float = 5.0) -> dict:
    reg = Registry(root)
    model = TabularModel.load(reg.local_dir(reg.get(model_id)))
    out = {}
    for batch in (1, 64):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model.predict(rows[:batch])
            n += batch
        out[f"batch_{batch}_rows_per_s"] = n / (time.perf_counter() - start)
    return out


class PlainRequest(BaseModel):
    inputs: list[list[float]]


def plain_server(root: str, model_id: str, port: int) -> None:
    """(b): the obvious single-process server a user would write."""
    import uvicorn
    from fastapi import FastAPI

    reg = Registry(root)
    model = TabularModel.load(reg.local_dir(reg.get(model_id)))
    app = FastAPI()

    @app.post(f"/v1/models/{model_id}/predict")
    def predict(req: PlainRequest) -> dict:  # sync def: FastAPI runs it in a thread pool
        return {"model": model_id, "predictions": model.predict(np.asarray(req.inputs)).tolist()}

    @app.get("/healthz")
    def health() -> dict:
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


async def load(url: str, rows: np.ndarray, concurrency: int, total: int) -> dict:
    latencies: list[float] = []
    errors = 0
    counter = iter(range(total))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def worker() -> None:
            nonlocal errors
            for i in counter:
                body = {"inputs": [rows[i % len(rows)].tolist()]}
                t0 = time.perf_counter()
                r = await client.post(url, json=body)
                latencies.append(time.perf_counter() - t0)
                errors += r.status_code != 200

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    lat = sorted(latencies)
    return {"concurrency": concurrency, "requests": total, "errors": errors,
            "throughput_rps": total / wall,
            "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]}


def wait_healthy(base: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{base} never became healthy")


def run_levels(base: str, model_id: str, rows: np.ndarray, levels: list[int], requests: int) -> list[dict]:
    url = f"{base}/v1/models/{model_id}/predict"
    asyncio.run(load(url, rows, 4, 40))  # warm-up: model load, connections
    return [asyncio.run(load(url, rows, c, max(requests // 4, 50) if c == 1 else requests)) for c in levels]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600, help="requests per concurrency level")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 16, 64])
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="maas-bench-")
    model_id = publish_model(root)
    rows = np.random.default_rng(0).normal(size=(512, N_FEATURES))
    results: dict = {"model": {"features": N_FEATURES, "hidden": HIDDEN, "id": model_id},
                     "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}

    print("(a) in-process forward ...", flush=True)
    results["a_in_process"] = in_process(root, model_id, rows)

    print("(b) plain FastAPI + uvicorn ...", flush=True)
    port = free_port()
    proc = mp.get_context("spawn").Process(target=plain_server, args=(root, model_id, port), daemon=True)
    proc.start()
    try:
        wait_healthy(f"http://127.0.0.1:{port}")
        results["b_plain_fastapi"] = run_levels(f"http://127.0.0.1:{port}", model_id, rows,
                                                args.levels, args.requests)
    finally:
        proc.terminate()
        proc.join(10)

    import ray
    from ray import serve

    from maas_ray.runtime import quiet_ray_data
    from maas_ray.serve.app import build_app

    ray.init(address="local", logging_level="ERROR", include_dashboard=False)
    quiet_ray_data()
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base = f"http://127.0.0.1:{port}"
        for key, batch in (("c_serve_no_batching", 1), ("d_serve_batching", 64)):
            print(f"({key[0]}) maas Serve app, max_batch_size={batch} ...", flush=True)
            serve.run(build_app({"storage": root, "predictor": {"max_batch_size": batch,
                                                                "batch_wait_timeout_s": 0.005}}),
                      name="maas", route_prefix="/")
            results[key] = run_levels(base, model_id, rows, args.levels, args.requests)
    finally:
        serve.shutdown()
        ray.shutdown()

    print_table(results, args.levels)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {RESULTS}")


def print_table(results: dict, levels: list[int]) -> None:
    a = results["a_in_process"]
    print(f"\n(a) in-process forward: {a['batch_1_rows_per_s']:.0f} rows/s at batch 1, "
          f"{a['batch_64_rows_per_s']:.0f} rows/s at batch 64")
    print(f"\n{'variant':<22}{'conc':>5}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>7}{'vs (b)':>8}")
    plain = {r["concurrency"]: r["throughput_rps"] for r in results["b_plain_fastapi"]}
    for key in ("b_plain_fastapi", "c_serve_no_batching", "d_serve_batching"):
        for r in results[key]:
            ratio = r["throughput_rps"] / plain[r["concurrency"]]
            print(f"{key:<22}{r['concurrency']:>5}{r['throughput_rps']:>9.1f}{r['p50_ms']:>9.1f}"
                  f"{r['p99_ms']:>9.1f}{r['errors']:>7}{ratio:>7.2f}x")


if __name__ == "__main__":
    sys.exit(main())
