"""What API keys cost: the same route and model with auth off and auth on, side by side.

    python benchmarks/auth_overhead.py [--requests 1500] [--rounds 3] [--concurrency 64]

Two maas apps in one Serve instance on one storage root: ``/off`` (auth off) and ``/on``
(auth on, one key whose rate limit, token budget and concurrency limit are far above
what the run uses, so every limit is checked and nothing is refused; ``--tokens-per-day 0``:
a key without a budget). The route is tabular predict on a tiny
MLP (8 → 16 → 1), one row per request: the forward pass is microseconds, so the time
goes to HTTP, Serve's hops and auth (the cost being measured), not to the model. Rounds
alternate off/on so machine noise hits both alike; prints req/s of each round, the
median of each and the on/off ratio, and writes benchmarks/results/auth_overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from maas_ray.data.preprocess import Preprocessor
from maas_ray.models.tabular import FORMAT, TabularModel, build_module
from maas_ray.registry import Registry

sys.path.insert(0, str(Path(__file__).parent))
from predict_http import free_port  # noqa: E402  (a sibling script, not a package)

N_FEATURES, HIDDEN = 8, [16]
NAME = "bench-tiny-mlp"
RESULTS = Path(__file__).parent / "results" / "auth_overhead.json"


def publish_model(root: str) -> str:
    torch.manual_seed(0)
    config = {"kind": "mlp", "hidden_sizes": HIDDEN, "dropout": 0.0, "n_features": N_FEATURES,
              "n_outputs": 1, "task": "regression"}
    pre = Preprocessor([f"f{i}" for i in range(N_FEATURES)], "y", "regression",
                       [0.0] * N_FEATURES, [1.0] * N_FEATURES)
    with tempfile.TemporaryDirectory() as tmp:
        TabularModel(build_module(config), config, pre).save(Path(tmp))
        card = {"task": "regression", "format": FORMAT, "n_features": N_FEATURES,
                "data": {"features": pre.features, "target": "y"}}
        return Registry(root).publish(NAME, Path(tmp), card).id


async def load(url: str, headers: dict[str, str], concurrency: int, total: int) -> dict:
    """``total`` one-row requests from ``concurrency`` clients; req/s and non-200 count."""
    codes: dict[int, int] = {}
    counter = iter(range(total))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits, headers=headers) as client:
        async def worker() -> None:
            for i in counter:
                r = await client.post(url, json={"inputs": [[float(i % 7)] * N_FEATURES]})
                codes[r.status_code] = codes.get(r.status_code, 0) + 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"rps": total / wall, "errors": total - codes.get(200, 0), "codes": codes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1500, help="requests per round")
    parser.add_argument("--rounds", type=int, default=3, help="off/on pairs")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--ingress-replicas", type=int, default=1)
    parser.add_argument("--tokens-per-day", type=int, default=10**12,
                        help="the key's daily token budget (0: none, as `maas keys create` makes by default)")
    args = parser.parse_args()

    import ray
    from ray import serve

    from maas_ray.auth import KeyStore
    from maas_ray.serve.app import build_app

    root = tempfile.mkdtemp(prefix="maas-bench-auth-")
    model_id = publish_model(root)
    # Limits far above the run's: every check runs, none refuses (64 in flight > the default 16).
    _, secret = KeyStore(root).create("bench", rate="1000000/min", tokens_per_day=args.tokens_per_day or None,
                                      max_concurrent=4 * args.concurrency)
    # Logical CPUs for two apps of fractional replicas; the machine's cores are shared alike.
    ray.init(address="local", num_cpus=8, logging_level="ERROR", include_dashboard=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base = f"http://127.0.0.1:{port}"
        common = {"storage": root, "deployments": {"Ingress": {"num_replicas": args.ingress_replicas}}}
        serve.run(build_app({**common, "auth": "off"}), name="auth-off", route_prefix="/off")
        serve.run(build_app({**common, "auth": "on"}), name="auth-on", route_prefix="/on")
        variants = {"off": {}, "on": {"Authorization": f"Bearer {secret}"}}
        url = {v: f"{base}/{v}/v1/models/{model_id}/predict" for v in variants}
        for v, headers in variants.items():  # warm-up: model load, connections, key verified
            warm = asyncio.run(load(url[v], headers, 8, 100))
            assert warm["errors"] == 0, (v, warm)
        rounds: dict[str, list[dict]] = {v: [] for v in variants}
        for i in range(args.rounds):
            for v, headers in variants.items():
                r = asyncio.run(load(url[v], headers, args.concurrency, args.requests))
                rounds[v].append(r)
                print(f"round {i + 1} auth {v:<3}: {r['rps']:7.1f} req/s  status codes {r['codes']}  "
                      f"load average {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()

    median = {v: statistics.median(r["rps"] for r in rs) for v, rs in rounds.items()}
    ratio = median["on"] / median["off"]
    print(f"\ntabular predict ({N_FEATURES}->{HIDDEN}->1), one row per request, concurrency "
          f"{args.concurrency}, {args.ingress_replicas} ingress replica(s), budget {args.tokens_per_day or 'none'}, "
          f"{args.rounds} rounds of "
          f"{args.requests}:\n  auth off {median['off']:.1f} req/s, auth on {median['on']:.1f} req/s, "
          f"on/off {ratio:.2f} (cost {100 * (1 - ratio):.0f}%), load average {os.getloadavg()}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"args": vars(args), "rounds": rounds, "median_rps": median,
                                   "on_over_off": ratio, "cpus": os.cpu_count()}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    sys.exit(main())
