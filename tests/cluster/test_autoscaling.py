"""Autoscaled serving: scale up under a burst and back down, scale to zero and a
clean cold start, and back-pressure as 503 + Retry-After.

Each test deploys its own copy of the maas app next to the session's (its own
name and route prefix) through ``build_app`` with ``args.deployments``, the
same per-deployment options a Serve config's ``deployments:`` section sets;
short delays keep it quick. Deployments a test does not use scale to zero and
start no replica.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from maas_ray.data.preprocess import Preprocessor
from maas_ray.models.tabular import FORMAT, TabularModel, build_module
from maas_ray.registry import ModelVersion, Registry
from maas_ray.serve.settings import AppArgs

from local_cluster import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
IDLE = {"autoscaling_config": {"min_replicas": 0, "initial_replicas": 0, "max_replicas": 1}}
# A stopping replica sleeps this long before it first counts its requests (Serve's
# default is 2 s): scale-downs and each test's teardown need no such pause.
QUICK_STOP = {"graceful_shutdown_wait_loop_s": 0.2}
ROWS = [[0.5, -1.0], [2.0, 3.0]]


@pytest.fixture(scope="module")
def tiny_model(maas_home: str) -> ModelVersion:
    """A two-feature linear model published straight into the session registry."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    cfg = {"kind": "linear", "n_features": 2, "n_outputs": 1, "task": "regression"}
    pre = Preprocessor(["a", "b"], "y", "regression", [0.0, 0.0], [1.0, 1.0])
    with tempfile.TemporaryDirectory() as tmp:
        TabularModel(build_module(cfg), cfg, pre).save(Path(tmp))
        return Registry(maas_home).publish(
            "autoscale-linear", Path(tmp), {"task": "regression", "format": FORMAT, "n_features": 2})


def expected(maas_home: str, mv: ModelVersion) -> np.ndarray:
    reg = Registry(maas_home)
    return TabularModel.load(reg.local_dir(mv)).predict(np.asarray(ROWS))


def replicas(app: str, deployment: str = "Predictor") -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


@pytest.fixture
def deploy(serve_url: str, maas_home: str) -> Iterator[Any]:
    """``deploy(name, args) -> base URL``: one more maas app; deleted afterwards."""
    from ray import serve

    from maas_ray.serve.app import build_app

    names: list[str] = []

    def _deploy(name: str, args: dict[str, Any]) -> str:
        deployments = {"LLMServer": IDLE, "EmbeddingServer": IDLE, **args.pop("deployments", {})}
        deployments = {d: {**QUICK_STOP, **deployments.get(d, {})}
                       for d in ("Ingress", "Predictor", *deployments)}
        settings = AppArgs.model_validate({"storage": maas_home, **args, "deployments": deployments})
        names.append(name)
        serve.run(build_app(settings), name=name, route_prefix=f"/{name}")
        return f"{serve_url}/{name}"

    yield _deploy
    for name in names:
        serve.delete(name)


def test_app_config_deployment_options_are_valid_overrides() -> None:
    """apps/maas.yaml's `deployments:` are accepted as build_app overrides, and the
    predictor autoscales while chat models may scale to zero."""
    app = yaml.safe_load((REPO / "apps" / "maas.yaml").read_text())["applications"][0]
    by_name = {d.pop("name"): d for d in app["deployments"]}
    settings = AppArgs.model_validate({"deployments": by_name})
    assert settings.deployment_options("Predictor")["autoscaling_config"]["min_replicas"] >= 1
    assert settings.deployment_options("LLMServer")["autoscaling_config"]["min_replicas"] == 0
    with pytest.raises(ValueError, match="unknown Serve options"):
        AppArgs.model_validate({"deployments": {"Predictor": {"max_replica": 2}}})
    with pytest.raises(ValueError, match="autoscaling_config: unknown options"):
        AppArgs.model_validate({"deployments": {"Predictor": {"autoscaling_config": {"min_replica": 0}}}})


def test_predictor_scales_up_under_a_burst_and_back_down(deploy: Any, tiny_model: ModelVersion) -> None:
    url = deploy("as-burst", {
        # a batch started from idle waits 1 s for company, so each client's request
        # stays ongoing on the replica (what the autoscaler measures) about a second:
        # 24 clients keep ~24 requests there while sending only ~24 a second, which
        # leaves the two cores to the replica that is starting
        "predictor": {"max_batch_size": 256, "batch_wait_timeout_s": 1.0},
        "deployments": {"Predictor": {
            "ray_actor_options": {"num_cpus": 0.1},
            "autoscaling_config": {
                # one replica more is what the test asserts: one process to start, not two
                "min_replicas": 1, "initial_replicas": 1, "max_replicas": 2,
                "target_ongoing_requests": 2, "upscale_delay_s": 0.5, "downscale_delay_s": 2,
                "metrics_interval_s": 0.5, "look_back_period_s": 1}}}})
    assert replicas("as-burst") == 1
    stop = threading.Event()
    codes: list[int] = []

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            async def loop() -> None:
                while not stop.is_set():
                    r = await http.post(f"/v1/models/{tiny_model.id}/predict", json={"inputs": ROWS})
                    codes.append(r.status_code)
            await asyncio.gather(*(loop() for _ in range(24)))

    burst = threading.Thread(target=asyncio.run, args=(client(),), daemon=True)
    burst.start()
    try:
        wait_until(lambda: replicas("as-burst") >= 2, 120, "the predictor to scale up")
    finally:
        stop.set()
        burst.join(timeout=60)
    assert codes and set(codes) == {200}, f"errors while scaling: {sorted(set(codes))}"
    wait_until(lambda: replicas("as-burst") == 1, 120, "the predictor to scale back down")


def test_scale_to_zero_cold_start_serves_first_request(
        deploy: Any, tiny_model: ModelVersion, maas_home: str) -> None:
    url = deploy("as-cold", {"request_timeout_s": 180, "deployments": {"Predictor": {
        "ray_actor_options": {"num_cpus": 0.1},
        "autoscaling_config": {"min_replicas": 0, "initial_replicas": 0, "max_replicas": 1,
                               "downscale_delay_s": 1, "downscale_to_zero_delay_s": 2,
                               "metrics_interval_s": 0.5, "look_back_period_s": 1}}}})
    assert replicas("as-cold") == 0
    started = time.monotonic()
    r = httpx.post(f"{url}/v1/models/{tiny_model.id}/predict", json={"inputs": ROWS}, timeout=200)
    cold_s = time.monotonic() - started
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["predictions"], expected(maas_home, tiny_model), atol=1e-5)
    print(f"cold start answered in {cold_s:.1f} s")
    wait_until(lambda: replicas("as-cold") == 0, 120, "the predictor to scale back to zero")


def test_full_queue_answers_503_with_retry_after(deploy: Any, tiny_model: ModelVersion) -> None:
    url = deploy("as-queue", {
        "predictor": {"max_batch_size": 8, "batch_wait_timeout_s": 0.5},  # each call ~0.5 s
        "deployments": {"Predictor": {"num_replicas": 1, "max_ongoing_requests": 1,
                                      "max_queued_requests": 1,
                                      "ray_actor_options": {"num_cpus": 0.1}}}})

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            return await asyncio.gather(*(
                http.post(f"/v1/models/{tiny_model.id}/predict", json={"inputs": ROWS})
                for _ in range(12)))

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    # one request runs, one waits in the queue, the rest are turned away at once
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}, codes
    for r in responses:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1
            error = r.json()["error"]
            assert (error["type"], error["code"]) == ("service_unavailable", "overloaded"), error
            assert "retry later" in error["message"]
