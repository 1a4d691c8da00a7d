"""Known traffic in, the right series and counts out of Ray's Prometheus endpoint.

Ray processes push metrics every ``RAY_metrics_report_interval_ms`` (1 s in tests,
set in conftest), so every read polls until the expected value shows up. Earlier
tests' traffic may still be on its way: counts are compared against a baseline
taken once the series stopped changing, or use a model name only this test uses.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import re
import shutil
import time
import uuid
from collections.abc import Callable

import httpx
import pandas as pd
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration

ROWS = pd.read_csv(REPO / "examples/regression/diabetes.csv").drop(columns="target").to_numpy()[:3]
CHAT, EMB = "smollm2-135m-instruct", "all-minilm-l6-v2"
PREDICT_ROUTE = "/v1/models/{model_id}/predict"
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class Scraper:
    def __init__(self, url: str) -> None:
        self.url = url

    def value(self, name: str, **labels: str) -> float:
        """Sum of every series of ``name`` whose labels include ``labels`` (0 if none)."""
        text = httpx.get(self.url, timeout=10).text
        total = 0.0
        for line in text.splitlines():
            m = _SAMPLE.match(line)
            if not m or m.group(1) != name:
                continue
            have = dict(_LABEL.findall(m.group(2) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
        return total

    def series(self, name: str) -> str:
        """Every sample line of ``name`` (for membership checks and failure messages)."""
        lines = httpx.get(self.url, timeout=10).text.splitlines()
        return "\n".join(line for line in lines if line.startswith(name))

    def wait_for(self, what: str, check: Callable[[], bool], timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"metrics never showed {what} within {timeout_s}s")
            time.sleep(0.5)

    def settled(self, name: str, quiet_s: float = 2.5, **labels: str) -> float:
        """The value once it has not changed for ``quiet_s`` (earlier traffic flushed)."""
        last, since = self.value(name, **labels), time.monotonic()
        deadline = since + 30
        while time.monotonic() - since < quiet_s:
            assert time.monotonic() < deadline, f"{name} {labels} never settled"
            time.sleep(0.5)
            now = self.value(name, **labels)
            if now != last:
                last, since = now, time.monotonic()
        return last

    def expect(self, name: str, want: float, **labels: str) -> None:
        try:
            self.wait_for(f"{name}{labels} == {want}", lambda: self.value(name, **labels) == want)
        except AssertionError as err:
            raise AssertionError(f"{err}; series now:\n{self.series(name)[:4000]}") from None


@pytest.fixture(scope="module")
def scrape(ray_session: None) -> Scraper:
    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    return Scraper(f"http://127.0.0.1:{port}/metrics")


@pytest.fixture(scope="module")
def client(serve_url: str):
    with httpx.Client(base_url=serve_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def probe_model(regression_model, maas_home: str, tmp_path_factory) -> str:
    """A copy of the trained regression model under a name no other test uses."""
    from maas_ray.registry import Registry

    registry = Registry(maas_home)
    mv = regression_model[0].version
    src = tmp_path_factory.mktemp("probe") / "model"
    shutil.copytree(registry.local_dir(mv), src)
    name = f"metrics-probe-{uuid.uuid4().hex[:8]}"
    card = {k: v for k, v in mv.card.items() if k not in ("files", "name", "created_at")}
    registry.publish(name, src, card)
    return name


def test_requests_latency_and_batches_of_a_tabular_model(client, scrape, probe_model) -> None:
    body = {"inputs": ROWS.tolist()}
    for _ in range(5):
        assert client.post(f"/v1/models/{probe_model}/predict", json=body).status_code == 200
    with cf.ThreadPoolExecutor(8) as pool:  # concurrent: the predictor may merge these
        codes = list(pool.map(lambda _: client.post(f"/v1/models/{probe_model}/predict", json=body).status_code,
                              range(8)))
    assert codes == [200] * 8
    for _ in range(2):  # resolves the model, then fails validation: labelled with it
        assert client.post(f"/v1/models/{probe_model}:1/predict", json={"inputs": [[1.0, 2.0]]}).status_code == 400

    requests = "ray_maas_requests_total"
    scrape.expect(requests, 13, route=PREDICT_ROUTE, model=probe_model, status="200")
    scrape.expect(requests, 2, route=PREDICT_ROUTE, model=probe_model, status="400")
    latency = dict(route=PREDICT_ROUTE, model=probe_model)
    scrape.expect("ray_maas_request_latency_seconds_count", 15, **latency)
    assert scrape.value("ray_maas_request_latency_seconds_bucket", le="+Inf", **latency) == 15
    assert scrape.value("ray_maas_request_latency_seconds_sum", **latency) > 0
    # Every successful request went through exactly one predictor batch. (Ray rebuilds
    # histograms from bucket counts, so _count is exact and _sum only approximate.)
    batch = dict(deployment="predictor", model=probe_model)
    scrape.expect("ray_maas_batched_requests_total", 13, **batch)
    batches = scrape.value("ray_maas_batch_size_count", **batch)
    assert 1 <= batches <= 13
    assert scrape.value("ray_maas_batch_size_bucket", le="+Inf", **batch) == batches
    # The gauge stays on the scrape while the replica idles (kept re-sent), at 0.
    time.sleep(3)  # > 2 report intervals: a gauge set once would have aged out by now
    assert 'deployment="predictor"' in scrape.series("ray_maas_ongoing_requests")
    assert scrape.value("ray_maas_ongoing_requests", deployment="predictor") == 0


def test_refused_body_is_counted_under_its_route(client, scrape, probe_model) -> None:
    labels = dict(route=PREDICT_ROUTE, model="", status="413")
    before = scrape.settled("ray_maas_requests_total", **labels)
    big = json.dumps({"inputs": [[0.0] * 10] * 2000})  # > the fixture's 64 KiB limit
    r = client.post(f"/v1/models/{probe_model}/predict", content=big,
                    headers={"content-type": "application/json"})
    assert r.status_code == 413
    scrape.expect("ray_maas_requests_total", before + 1, **labels)


def test_chat_tokens_time_to_first_token_and_queue(client, scrape, llm_home) -> None:
    model = {"model": CHAT}
    before = {
        "tokens": scrape.settled("ray_maas_generated_tokens_total", **model),
        "ttft": scrape.settled("ray_maas_time_to_first_token_seconds_count", **model),
        "ok": scrape.settled("ray_maas_requests_total", route="/v1/chat/completions", status="200", **model),
    }
    messages = [{"role": "user", "content": "Name three colours."}]
    tokens = 0
    for _ in range(2):
        r = client.post("/v1/chat/completions", json={**model, "messages": messages, "max_tokens": 6,
                                                      "temperature": 0})
        assert r.status_code == 200, r.text
        tokens += r.json()["usage"]["completion_tokens"]
    with client.stream("POST", "/v1/chat/completions", json={
            **model, "messages": messages, "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    tokens += events[-1]["usage"]["completion_tokens"]
    assert tokens >= 3

    scrape.expect("ray_maas_generated_tokens_total", before["tokens"] + tokens, **model)
    scrape.expect("ray_maas_time_to_first_token_seconds_count", before["ttft"] + 3, **model)
    scrape.expect("ray_maas_requests_total", before["ok"] + 3, route="/v1/chat/completions",
                  status="200", **model)
    assert scrape.value("ray_maas_prompt_tokens_total", **model) > 0
    # Nothing left in the engine once every reply is done (and the gauge is still there).
    scrape.expect("ray_maas_llm_sequences", 0, state="running", **model)
    scrape.expect("ray_maas_llm_sequences", 0, state="waiting", **model)
    assert 'state="running"' in scrape.series("ray_maas_llm_sequences")


def test_embedding_batches(client, scrape, llm_home) -> None:
    labels = dict(deployment="embedder", model=EMB)
    before = scrape.settled("ray_maas_batched_requests_total", **labels)
    batches = scrape.settled("ray_maas_batch_size_count", **labels)
    r = client.post("/v1/embeddings", json={"model": EMB, "input": ["a cat", "a dog", "a bird"]})
    assert r.status_code == 200, r.text
    scrape.expect("ray_maas_batched_requests_total", before + 1, **labels)  # one request, whatever its texts
    scrape.expect("ray_maas_batch_size_count", batches + 1, **labels)


def test_training_job_metrics(scrape, regression_model) -> None:
    import ray

    from maas_ray.train.progress import ProgressLog

    # The real training loop reports what the gauges need.
    history = regression_model[0].history
    assert all(e["samples"] > 0 and e["samples_per_s"] > 0 for e in history)

    run = f"probe-run-{uuid.uuid4().hex[:8]}"
    log = ProgressLog.remote(run, "probe-model")
    try:
        ray.get(log.push.remote({"epoch": 0, "train_loss": 0.9, "val_loss": 1.1, "samples": 300,
                                 "samples_per_s": 1500.0}))
        ray.get(log.push.remote({"epoch": 1, "train_loss": 0.5, "val_loss": 0.75, "samples": 300,
                                 "samples_per_s": 2000.0}))
        labels = dict(run=run, model="probe-model")
        scrape.expect("ray_maas_train_loss", 0.5, split="train", **labels)
        scrape.expect("ray_maas_train_loss", 0.75, split="validation", **labels)
        scrape.expect("ray_maas_train_samples_per_second", 2000.0, **labels)
        scrape.expect("ray_maas_train_progress", 1, **labels)
        scrape.expect("ray_maas_train_samples_total", 600, **labels)
        time.sleep(3)  # idle between epochs longer than 2 report intervals: still exported
        assert scrape.value("ray_maas_train_loss", split="train", **labels) == 0.5
    finally:
        ray.kill(log)
    # A finished job's gauges leave the scrape with its actor.
    scrape.wait_for("the killed job's gauges to go", lambda: run not in scrape.series("ray_maas_train_loss"))


def test_grafana_dashboard_plots_only_metrics_we_export() -> None:
    from maas_ray.serve.metrics import DEFINITIONS

    dashboard = json.loads((REPO / "cluster/grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    ours = {f"ray_{n}" for n in DEFINITIONS} | {
        "ray_maas_train_loss", "ray_maas_train_samples_per_second", "ray_maas_train_progress",
        "ray_maas_train_samples"}
    used = {re.sub(r"_(total|bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"ray_maas_\w+", e)}
    assert used and used <= ours, used - ours
    assert {"ray_maas_requests", "ray_maas_time_to_first_token_seconds", "ray_maas_batch_size",
            "ray_maas_train_loss", "ray_maas_generated_tokens"} <= used
