"""Where a one-row predict request's CPU goes, process by process, in the maas app.

    python benchmarks/request_path.py [--requests 2000] [--concurrency 64] [--hidden 4096 4096 4096]
                                      [--variants ray grpc grpc+auth]

Starts the Serve app on an embedded Ray, sends one-row predict requests at the given
concurrency and reads every process's CPU time (psutil) over the load window: the
load generator (this process), Serve's HTTP proxy, the ingress replica, the predictor
replica (its forward thread apart from the rest), the controller, and Ray's own
processes. It prints CPU ms per request for each, the forward thread's CPU per row
against the same forward in process at the same batch size, and the throughput that
CPU cost allows on this machine's cores. ``--hidden 16`` makes the forward nearly free,
so what is left is the request path alone. It runs app variants side by side
(``--variants``): model calls as Ray objects (app arg ``model_transport: ray``), over
Serve's gRPC transport (``grpc``, the default), and the latter with API keys on
(``grpc+auth``, a key whose limits are checked but never reached), and prints the ratio of
each figure to the first variant's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).parent))
from predict_http import N_FEATURES, batch_counts, free_port, load, publish_model  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "request_path.json"
# name → (app args, whether requests carry an API key)
VARIANTS: dict[str, tuple[dict, bool]] = {
    "ray": ({"model_transport": "ray", "auth": "off"}, False),
    "grpc": ({"model_transport": "grpc", "auth": "off"}, False),
    "grpc+auth": ({"model_transport": "grpc", "auth": "on"}, True),
}


def role(proc: psutil.Process) -> str:
    """A readable name for one process of the Ray session, from the title Ray gives it."""
    try:
        name = " ".join(proc.cmdline())
    except psutil.Error:
        return "ray system"
    if name.startswith("ray::") and not name.startswith("ray::IDLE"):
        for key, label in (("ProxyActor", "HTTP proxy"), (":Ingress", "ingress replica"),
                           (":Predictor", "predictor replica"), (":LLMServer", "LLM replica"),
                           ("ServeController", "controller")):
            if key in name:
                return label
        return "other replicas" if "ServeReplica" in name else "other actors"
    return "idle ray workers" if name.startswith("ray::") else "ray system"


def snapshot(procs: list[psutil.Process]) -> dict[int, tuple[float, dict[int, float]]]:
    """pid → (process CPU s, {thread id: CPU s})."""
    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = (t.user + t.system, {th.id: th.user_time + th.system_time for th in p.threads()})
        except psutil.Error:
            pass
    return out


def forward_cpu_per_row(root: str, model_id: str, rows: np.ndarray, batch: int) -> float:
    """CPU ms per row of the same forward in this process, one torch thread (as the replica)."""
    from maas_ray.models.tabular import TabularModel
    from maas_ray.registry import Registry

    reg = Registry(root)
    model = TabularModel.load(reg.local_dir(reg.get(model_id)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.forward_raw(rows[:batch])
        n, start = 0, time.thread_time()
        while time.thread_time() - start < 3.0:
            model.forward_raw(rows[:batch])
            n += batch
        return 1000 * (time.thread_time() - start) / n
    finally:
        torch.set_num_threads(threads)


def measure(url: str, metrics: str, rows: np.ndarray, concurrency: int, requests: int,
            headers: dict[str, str]) -> dict:
    """One load run: throughput, mean batch, and CPU seconds by process role (the predictor's
    forward thread apart)."""
    warm = asyncio.run(load(url, rows, 4, 40, headers))  # model load, connections, key verified
    if warm["errors"]:
        raise SystemExit(f"{warm['errors']} of 40 warm-up requests failed at {url}")
    time.sleep(3)
    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    roles = {p.pid: "load generator (httpx)" if p.pid == me.pid else role(p) for p in procs}
    batched = batch_counts(metrics)
    before, t0 = snapshot(procs), time.perf_counter()
    result = asyncio.run(load(url, rows, concurrency, requests, headers))
    after, wall = snapshot(procs), time.perf_counter() - t0
    time.sleep(3)  # replicas push metrics every second here
    done = batch_counts(metrics)
    cpu: dict[str, float] = defaultdict(float)
    for pid in before.keys() & after.keys():
        used = after[pid][0] - before[pid][0]
        if roles[pid] == "predictor replica":  # its busiest thread besides the event loop: forwards
            forward = max((t - before[pid][1].get(tid, 0.0) for tid, t in after[pid][1].items()
                           if tid != pid), default=0.0)
            cpu["predictor: forward thread"] += forward
            cpu["predictor: event loop, rest"] += used - forward
        else:
            cpu[roles[pid]] += used
    return {**result, "window_s": wall, "cpu_s": dict(cpu),
            "mean_batch": (done[0] - batched[0]) / max(done[1] - batched[1], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--hidden", type=int, nargs="+", default=[4096, 4096, 4096],
                        help="the MLP's hidden sizes (16 makes the forward nearly free)")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["ray", "grpc"],
                        help="app variants, run in this order; ratios are to the first")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="maas-bench-")
    model_id = publish_model(root, args.hidden)
    from maas_ray.auth import KeyStore

    # Limits far above the run's: every check runs, none refuses.
    _, secret = KeyStore(root).create("bench", rate="1000000/min", tokens_per_day=10**12,
                                      max_concurrent=4 * args.concurrency)
    rows = np.random.default_rng(0).normal(size=(512, N_FEATURES))

    import ray
    from ray import serve

    from maas_ray.runtime import quiet_ray_data
    from maas_ray.serve.app import build_app

    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
    ray.init(address="local", logging_level="ERROR", include_dashboard=False)
    quiet_ray_data()
    runs = {}
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}/v1/models/{model_id}/predict"
        metrics = f"http://127.0.0.1:{ray.nodes()[0]['MetricsExportPort']}/metrics"
        for name in args.variants:
            app_args, keyed = VARIANTS[name]
            print(f"{name}: {app_args} ...", flush=True)
            serve.run(build_app({"storage": root, **app_args}), name="maas", route_prefix="/")
            headers = {"Authorization": f"Bearer {secret}"} if keyed else {}
            runs[name] = measure(url, metrics, rows, args.concurrency, args.requests, headers)
    finally:
        serve.shutdown()
        ray.shutdown()
    mean_batch = round(runs[args.variants[-1]]["mean_batch"])
    in_process = forward_cpu_per_row(root, model_id, rows, max(1, mean_batch))
    report(runs, args, in_process, mean_batch)


def report(runs: dict, args: argparse.Namespace, in_process: float, batch: int) -> None:
    cores = os.cpu_count() or 1
    print(f"\n{args.requests} one-row requests at concurrency {args.concurrency}, "
          f"MLP {N_FEATURES}→{args.hidden}, {cores} cores, load average "
          f"{[round(x, 1) for x in os.getloadavg()]}")
    names = list(runs)
    per_request = {t: {k: 1000 * v / r["requests"] for k, v in r["cpu_s"].items()} for t, r in runs.items()}
    paths = {t: sum(v for k, v in per_request[t].items() if k != "predictor: forward thread") for t in names}
    table = [(k, {t: per_request[t].get(k, 0.0) for t in names})
             for k in sorted(per_request[names[-1]], key=lambda k: -per_request[names[-1]][k])]
    table += [("total", {t: sum(per_request[t].values()) for t in names}),
              ("path (all but the forward)", paths),
              ("req/s", {t: runs[t]["throughput_rps"] for t in names}),
              ("mean batch", {t: runs[t]["mean_batch"] for t in names}),
              ("cores busy", {t: sum(runs[t]["cpu_s"].values()) / runs[t]["window_s"] for t in names}),
              ("req/s a free forward allows", {t: 1000 * cores / paths[t] for t in names})]
    print(f"\n{'CPU ms per request':<30}" + "".join(f"{t:>12}" for t in names)
          + "".join(f"{t + '/' + names[0]:>16}" for t in names[1:]))
    for label, cells in table:
        print(f"{label:<30}" + "".join(f"{cells[t]:>12.2f}" for t in names)
              + "".join(f"{cells[t] / max(cells[names[0]], 1e-9):>15.2f}x" for t in names[1:]))
    print(f"\nforward CPU per row: {per_request[names[-1]].get('predictor: forward thread', 0.0):.2f} ms "
          f"in the replica, {in_process:.2f} ms in process (batch {batch}, one torch thread)")
    errors = {t: runs[t]["errors"] for t in names}
    if any(errors.values()):
        print(f"errors: {errors}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"args": vars(args), "cores": cores, "runs": runs,
                                   "forward_cpu_ms_per_row_in_process": in_process}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
