"""Tabular predict throughput, side by side on one model and one request stream.

    python benchmarks/predict_http.py [--requests 600] [--levels 1 16 64]

(a) in-process forward at batch 1 and 64 (rows/s; 64 is the ceiling), (b) a plain
single-process FastAPI + uvicorn server on the project's own loader, (c) the maas
Serve app (continuous batching in the predictor), and (d) the same app with the
predictor's torch on 2 threads (Ray gives a 0.25-CPU replica 1). Each request
carries one row; the same MLP (big enough that the forward pass dominates) answers
all. Prints p50/p99 latency, throughput, the app's mean batch (from its own
metrics) and issue 15's target ratios per concurrency level, checks the app's
answers against in-process ones, and writes benchmarks/results/predict_http.json.
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


def publish_model(root: str, hidden: list[int] = HIDDEN) -> str:
    torch.manual_seed(0)
    config = {"kind": "mlp", "hidden_sizes": hidden, "dropout": 0.0, "n_features": N_FEATURES,
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


async def load(url: str, rows: np.ndarray, concurrency: int, total: int,
               headers: dict[str, str] | None = None) -> dict:
    latencies: list[float] = []
    errors = 0
    counter = iter(range(total))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits, headers=headers) as client:
        async def worker() -> None:
            nonlocal errors
            for i in counter:
                body = {"inputs": [rows[i % len(rows)].tolist()]}
                t0 = time.perf_counter()
                try:
                    r = await client.post(url, json=body)
                    errors += r.status_code != 200
                except httpx.TransportError:  # a server past its limits drops connections
                    errors += 1
                latencies.append(time.perf_counter() - t0)

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


def run_levels(base: str, model_id: str, rows: np.ndarray, levels: list[int], requests: int,
               metrics: str | None = None) -> list[dict]:
    url = f"{base}/v1/models/{model_id}/predict"
    asyncio.run(load(url, rows, 4, 40))  # warm-up: model load, connections
    out = []
    for c in levels:
        before = batch_counts(metrics) if metrics else None
        out.append(asyncio.run(load(url, rows, c, max(requests // 4, 50) if c == 1 else requests)))
        if before is not None:
            time.sleep(3)  # replicas push metrics every RAY_metrics_report_interval_ms (1 s here)
            after = batch_counts(metrics)
            out[-1]["mean_batch"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
    return out


def batch_counts(metrics: str, deployment: str = "predictor") -> tuple[float, float]:
    """A deployment's (requests batched, batches run) so far, from the app's own metrics
    (``maas_batched_requests_total / maas_batch_size_count`` is the mean batch)."""
    totals = {"ray_maas_batched_requests_total": 0.0, "ray_maas_batch_size_count": 0.0}
    for line in httpx.get(metrics, timeout=10).text.splitlines():
        name = line.split("{", 1)[0]
        if name in totals and f'deployment="{deployment}"' in line:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals["ray_maas_batched_requests_total"], totals["ray_maas_batch_size_count"]


def check_answers(base: str, root: str, model_id: str, rows: np.ndarray, n: int = 64) -> float:
    """Largest difference between the app's answers (one row per request, sent together so
    they share batches) and in-process ones; the benchmark fails above 1e-5."""
    reg = Registry(root)
    expected = TabularModel.load(reg.local_dir(reg.get(model_id))).predict(rows[:n])

    async def ask() -> list[float]:
        async with httpx.AsyncClient(timeout=120) as client:
            url = f"{base}/v1/models/{model_id}/predict"
            replies = await asyncio.gather(*(client.post(url, json={"inputs": [r.tolist()]}) for r in rows[:n]))
        return [r.json()["predictions"][0] for r in replies]

    diff = float(np.abs(np.asarray(asyncio.run(ask())) - expected).max())
    if diff > 1e-5:
        raise SystemExit(f"the app's answers differ from in-process ones by {diff}")
    return diff


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

    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")  # mean batch read soon after
    ray.init(address="local", logging_level="ERROR", include_dashboard=False)
    quiet_ray_data()
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base = f"http://127.0.0.1:{port}"
        metrics = f"http://127.0.0.1:{ray.nodes()[0]['MetricsExportPort']}/metrics"
        two_threads = {"Predictor": {"ray_actor_options": {
            "num_cpus": 0.25, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "2"}}}}}
        for key, deployments in (("c_maas", {}), ("d_maas_torch_2_threads", two_threads)):
            print(f"({key[0]}) maas Serve app {deployments or ''} ...", flush=True)
            serve.run(build_app({"storage": root, "deployments": deployments}), name="maas", route_prefix="/")
            results[key] = run_levels(base, model_id, rows, args.levels, args.requests, metrics)
            results[f"{key}_max_abs_diff"] = check_answers(base, root, model_id, rows)
    finally:
        serve.shutdown()
        ray.shutdown()

    results["load_average"] = [round(x, 1) for x in os.getloadavg()]
    print_table(results, args.levels)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {RESULTS}")


def print_table(results: dict, levels: list[int]) -> None:
    a = results["a_in_process"]
    ceiling = a["batch_64_rows_per_s"]
    print(f"\n(a) in-process forward: {a['batch_1_rows_per_s']:.0f} rows/s at batch 1, "
          f"{ceiling:.0f} rows/s at batch 64 (torch threads {results['torch_threads']}); "
          f"load average {results['load_average']}")
    print(f"\n{'variant':<24}{'conc':>5}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'errors':>7}"
          f"{'batch':>7}{'vs (b)':>8}{'vs (a)64':>9}")
    plain = {r["concurrency"]: r["throughput_rps"] for r in results["b_plain_fastapi"]}
    for key in ("b_plain_fastapi", "c_maas", "d_maas_torch_2_threads"):
        for r in results[key]:
            batch = f"{r['mean_batch']:.1f}" if "mean_batch" in r else "-"
            print(f"{key:<24}{r['concurrency']:>5}{r['throughput_rps']:>8.1f}{r['p50_ms']:>9.1f}"
                  f"{r['p99_ms']:>9.1f}{r['errors']:>7}{batch:>7}"
                  f"{r['throughput_rps'] / plain[r['concurrency']]:>7.2f}x"
                  f"{r['throughput_rps'] / ceiling:>8.0%}")
    top = max(levels)
    for key in ("c_maas", "d_maas_torch_2_threads"):
        r = next(r for r in results[key] if r["concurrency"] == top)
        print(f"issue 15 target 1, {key} at concurrency {top}: {r['throughput_rps'] / plain[top]:.2f}x the "
              f"plain server (>= 3x), {r['throughput_rps'] / ceiling:.0%} of in-process batch-64 rows/s "
              f"(>= 40%); answers within {results[key + '_max_abs_diff']:.1e} of in-process")


if __name__ == "__main__":
    sys.exit(main())
