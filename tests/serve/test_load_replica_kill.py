"""Replica loss under load: 2,000 predict requests at concurrency 32 against a
second maas app with 2 predictor replicas, one of which is killed midway.

Every request must end in a correct prediction or an explicit 503/429 (with an
error body, and ``Retry-After`` on 503): no hang (client timeout), no 500, no
dropped connection. Loopback only; the session app is left as it is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import pandas as pd
import pytest

from maas_ray.models.tabular import TabularModel
from maas_ray.registry import Registry
from tests.conftest import session_app_args

pytestmark = [pytest.mark.integration, pytest.mark.slow]

APP = "maas-kill"
N_REQUESTS = 2000
CONCURRENCY = 32
KILL_AFTER = 500  # answers before one predictor replica is killed
CLIENT_TIMEOUT_S = 30.0  # a request without an answer by then counts as a hang
ROWS = pd.read_csv("examples/regression/diabetes.csv").drop(columns="target").to_numpy()[:50]
# Chat and embedding deployments are not used here: no replicas for them.
IDLE = {"autoscaling_config": {"min_replicas": 0, "initial_replicas": 0, "max_replicas": 1}}


@pytest.fixture(scope="module")
def kill_url(serve_url: str, maas_home: str, regression_model) -> Iterator[str]:
    from ray import serve

    from maas_ray.serve.app import build_app

    # max_ongoing_requests below the client's concurrency: both replicas get traffic.
    predictor = {"num_replicas": 2, "max_ongoing_requests": 16, "ray_actor_options": {"num_cpus": 0.1}}
    # Batches wait up to 50 ms to fill: a replica holds requests long enough to be killed with them.
    args = {**session_app_args(maas_home), "request_timeout_s": 20.0,
            "predictor": {"max_batch_size": 16, "batch_wait_timeout_s": 0.05},
            "deployments": {"Predictor": predictor, "LLMServer": IDLE, "EmbeddingServer": IDLE}}
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
    try:
        yield f"{serve_url}/{APP}"
    finally:
        serve.delete(APP)


def predictor_replicas() -> list[str]:
    """Names of this app's live predictor replica actors (namespace ``serve``)."""
    import ray

    prefix = f"SERVE_REPLICA::{APP}#Predictor#"
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith(prefix)]


def kill_busiest_replica(deadline_s: float = 10.0) -> tuple[str, int]:
    """Kill the predictor replica with the most requests in flight (waiting until
    one has some), as a crash would: ``(its name, requests it held)``."""
    import ray

    handles = {name: ray.get_actor(name, namespace="serve") for name in predictor_replicas()}
    assert len(handles) == 2, sorted(handles)
    end = time.monotonic() + deadline_s
    while True:
        ongoing = {n: ray.get(h.get_num_ongoing_requests.remote(), timeout=10) for n, h in handles.items()}
        name = max(ongoing, key=ongoing.get)
        if ongoing[name] > 0 or time.monotonic() > end:
            break
    # Serve replicas have max_restarts=0: Ray does not restart it, Serve's controller replaces it.
    ray.kill(handles[name], no_restart=False)
    return name, ongoing[name]


@dataclass
class Outcome:
    index: int
    sent_at: float
    status: int | None = None
    body: dict | None = None
    headers: httpx.Headers | None = None
    error: str | None = None  # a client-side failure: timeout (hang), reset connection...


def request_for(i: int, model_id: str) -> tuple[str, dict]:
    """Every 5th request goes through /v2 (Open Inference Protocol), the rest through /v1."""
    row = ROWS[i % len(ROWS)].tolist()
    if i % 5 == 4:
        name, version = model_id.split(":")
        return (f"/v2/models/{name}/versions/{version}/infer",
                {"inputs": [{"name": "input-0", "shape": [1, len(row)], "datatype": "FP64", "data": row}]})
    return f"/v1/models/{model_id}/predict", {"inputs": [row]}


def prediction(i: int, body: dict) -> float:
    return body["outputs"][0]["data"][0] if i % 5 == 4 else body["predictions"][0]


async def run_load(url: str, model_id: str) -> tuple[list[Outcome], float, tuple[str, int]]:
    """Fire the requests; kill a replica after ``KILL_AFTER`` answers.
    Returns the outcomes, when the kill happened and what was killed."""
    outcomes = [Outcome(i, 0.0) for i in range(N_REQUESTS)]
    next_index = iter(range(N_REQUESTS))
    answered = 0
    kill_now = asyncio.Event()

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal answered
        for i in next_index:  # one shared iterator: each index is taken once
            path, payload = request_for(i, model_id)
            out = outcomes[i]
            out.sent_at = time.monotonic()
            try:
                r = await client.post(path, json=payload)
                out.status, out.headers = r.status_code, r.headers
                out.body = r.json()
            except Exception as err:  # noqa: BLE001 - any client failure is a finding
                out.error = f"{type(err).__name__}: {err}"
            answered += 1
            if answered >= KILL_AFTER:
                kill_now.set()

    async def killer() -> tuple[float, tuple[str, int]]:
        await kill_now.wait()
        killed = await asyncio.to_thread(kill_busiest_replica)
        return time.monotonic(), killed

    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, timeout=CLIENT_TIMEOUT_S, limits=limits) as client:
        kill_task = asyncio.create_task(killer())
        await asyncio.gather(*(worker(client) for _ in range(CONCURRENCY)))
        killed_at, killed = await kill_task
    return outcomes, killed_at, killed


def test_requests_survive_a_killed_predictor_replica(kill_url: str, regression_model, maas_home: str) -> None:
    from ray import serve

    model_id = regression_model[0].version.id
    reg = Registry(maas_home)
    expected = TabularModel.load(reg.local_dir(reg.get(model_id))).predict(ROWS)

    # Warm: both replicas up, the model loaded where requests land.
    with httpx.Client(base_url=kill_url, timeout=60) as c:
        for i in range(2 * CONCURRENCY):
            path, payload = request_for(i, model_id)
            r = c.post(path, json=payload)
            assert r.status_code == 200, r.text
    assert len(predictor_replicas()) == 2

    t0 = time.monotonic()
    outcomes, killed_at, (killed, in_flight) = asyncio.run(run_load(kill_url, model_id))

    errors = [f"#{o.index}: {o.error}" for o in outcomes if o.error]
    assert not errors, f"{len(errors)} requests failed on the client (hang or dropped): {errors[:5]}"
    by_status: dict[int, int] = {}
    for o in outcomes:
        by_status[o.status] = by_status.get(o.status, 0) + 1
        if o.status == 200:
            np.testing.assert_allclose(prediction(o.index, o.body), expected[o.index % len(ROWS)],
                                       rtol=0, atol=1e-5, err_msg=f"request #{o.index}")
        else:
            assert o.status in (503, 429), f"request #{o.index}: {o.status} {o.body}"
            err = o.body["error"]
            if o.index % 5 == 4:  # OIP error body
                assert isinstance(err, str) and err, o.body
            else:
                assert err["type"] in ("service_unavailable", "rate_limit_error") and err["message"], o.body
            if o.status == 503:
                assert o.headers.get("retry-after"), f"request #{o.index}: 503 without Retry-After"
    print(f"{N_REQUESTS} requests in {time.monotonic() - t0:.1f} s; killed {killed} at "
          f"{killed_at - t0:.1f} s holding {in_flight} requests; statuses {by_status}")
    assert in_flight > 0, "the killed replica held no requests: the kill tested nothing"
    ok_after_kill = sum(1 for o in outcomes if o.status == 200 and o.sent_at > killed_at)
    assert ok_after_kill > 0, f"no correct answer for requests sent after the kill: {by_status}"

    # Recovery: Serve replaces the replica, and the app answers again.
    def recovered() -> bool:
        running = serve.status().applications[APP].deployments["Predictor"].replica_states.get("RUNNING", 0)
        return running == 2 and killed not in predictor_replicas()

    deadline = time.monotonic() + 60
    while not recovered():
        assert time.monotonic() < deadline, f"predictor not back to 2 replicas: {predictor_replicas()}"
        time.sleep(0.5)
    with httpx.Client(base_url=kill_url, timeout=60) as c:
        path, payload = request_for(0, model_id)
        r = c.post(path, json=payload)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(prediction(0, r.json()), expected[0], rtol=0, atol=1e-5)
