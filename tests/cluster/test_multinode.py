"""maas on a real multi-node Ray cluster on this host: training that spreads,
resizes and survives losing a node; ``ray job submit`` with S3 storage; serving.

The module owns one cluster of ``ray start`` processes (head + two worker nodes
that offer a ``trainer`` resource) and one S3 server (moto, real HTTP on
127.0.0.1). Every client is a subprocess (``maas``, ``ray``, ``serve``), so this
process never becomes a driver of that cluster and does not clash with the
shared in-process Ray session other test modules use.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml

from local_cluster import LocalCluster, free_ports, stop_process, wait_until
from s3_server import S3Server

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "regression" / "diabetes.csv"
TRAIN_ROWS = 286  # rows of diabetes.csv in the train split (split_seed 0, 15 % val, 20 % test)
EPOCHS = 60
ROWS = pd.read_csv(DATA).drop(columns="target").to_numpy()[:8]


def spec(name: str, run_name: str, num_workers: Any, source: str = str(DATA), **scaling: Any) -> dict:
    """The regression example as full-batch gradient descent, checkpointing every epoch.

    A batch larger than the training split makes each epoch one step on the mean
    gradient of all rows, whether one worker computes it or DDP averages two equal
    halves: resizing must then not change the loss curve beyond float rounding.
    """
    return {
        "name": name, "task": "regression",
        "data": {"source": source, "target": "target", "test_fraction": 0.2},
        "training": {"epochs": EPOCHS, "batch_size": 512, "learning_rate": 0.1, "momentum": 0.9,
                     "seed": 0, "checkpoint_every_epochs": 1, "max_failures": 3,
                     "run_name": run_name},
        "scaling": {"num_workers": num_workers, "cpus_per_worker": 0.5, **scaling},
    }


def write_spec(folder: Path, body: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def card(home: str, name: str) -> dict:
    from maas_ray.registry import Registry

    return Registry(home).get(name).card


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with S3Server(bucket="maas-test") as server:
        yield server


@pytest.fixture(scope="module")
def cluster(s3: S3Server) -> Iterator[LocalCluster]:
    # The nodes carry the S3 endpoint and credentials, as cloud machines carry
    # theirs; each job names its storage root with MAAS_HOME.
    with LocalCluster(head_cpus=2, env=s3.env) as c:
        nodes = [c.add_node(num_cpus=1, resources={"trainer": 1}, wait=False) for _ in range(2)]
        c.wait_ready(nodes)
        yield c


def dashboard_api(c: LocalCluster, method: str, path: str, **params: Any) -> Any:
    """The dashboard's REST API, which `ray list`, `ray job status` and `ray job stop` call:
    on a loaded 2-core machine each CLI process costs seconds of CPU before it asks."""
    r = httpx.request(method, f"{c.dashboard_url}{path}", params=params, timeout=30,
                      headers={"Authorization": f"Bearer {c.token}"})
    assert r.status_code == 200, f"{method} {path}: {r.status_code} {r.text[:500]}"
    return r.json()


def train_actor_nodes(c: LocalCluster) -> dict[str, str]:
    """``{actor_id: node_id}`` of every Ray Train worker the cluster has run."""
    body = dashboard_api(c, "GET", "/api/v0/actors", limit=1000, detail=True,
                         filter_keys="class_name", filter_predicates="=",
                         filter_values="RayTrainWorker")
    assert body["result"], body["msg"]
    return {a["actor_id"]: a["node_id"] for a in body["data"]["result"]["result"]}


@pytest.fixture(scope="module")
def reference(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An uninterrupted 2-worker run: its card and the nodes its workers ran on."""
    home = str(tmp_path_factory.mktemp("ref-home"))
    path = write_spec(tmp_path_factory.mktemp("ref"), spec(
        "ref-linear", "ref", 2, resources_per_worker={"trainer": 1}))
    before = train_actor_nodes(cluster)
    # Reports pace each epoch (one per controller poll); this run needs no slack.
    cluster.run(["maas", "train", str(path), "--storage", home],
                env=cluster.client_env(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2"))
    after = train_actor_nodes(cluster)
    return {"card": card(home, "ref-linear"),
            "nodes": {after[a] for a in after.keys() - before.keys()}}


def test_two_worker_run_spreads_across_nodes(reference: dict) -> None:
    assert len(reference["nodes"]) == 2, reference["nodes"]
    curve = reference["card"]["loss_curve"]
    assert [e["epoch"] for e in curve] == list(range(EPOCHS))
    assert {e["world_size"] for e in curve} == {2}
    # Ray's equal split: every training row once per epoch across the workers.
    assert {e["samples"] for e in curve} == {TRAIN_ROWS}


def _latest_state(run_dir: Path) -> dict | None:
    for ckpt in sorted(run_dir.glob("checkpoint_*"), reverse=True):
        try:
            return json.loads((ckpt / "train_state.json").read_text())
        except (OSError, ValueError):  # still being written
            continue
    return None


def _world_sizes(run_dir: Path) -> list[int]:
    state = _latest_state(run_dir)
    return [e["world_size"] for e in state["history"]] if state else []


def test_elastic_run_grows_then_survives_losing_a_node(
        cluster: LocalCluster, reference: dict, tmp_path: Path) -> None:
    """{min: 1, max: 2}: starts on the one trainer node there is, grows to 2 when a
    node joins, goes on from its last checkpoint when a node is removed, and ends
    within 5 % of the uninterrupted run's validation loss."""
    for node in cluster.workers("trainer")[1:]:
        cluster.remove_node(node)
    assert len(cluster.workers("trainer")) == 1
    home = tmp_path / "home"
    path = write_spec(tmp_path, spec("elastic-linear", "elastic", {"min": 1, "max": 2},
                                     resources_per_worker={"trainer": 1},
                                     elastic_resize_interval_s=1))
    run_dir = home / "runs" / "elastic"
    log = tmp_path / "train.log"
    # A lost worker group waits this long for the workers it asks for before the
    # elastic policy settles for fewer (Ray's default is 60 s).
    # One epoch per second (one report per controller poll) leaves room for a node
    # to join and another to go before the run ends, however fast the machine.
    proc = cluster.popen(["maas", "train", str(path), "--storage", str(home)], log,
                         env=cluster.client_env(RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="20",
                                                RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="1"))
    try:
        wait_until(lambda: len(_world_sizes(run_dir)) >= 2 or proc.poll() is not None, 300,
                   "the first checkpoints")
        assert set(_world_sizes(run_dir)) == {1}, "started with more workers than nodes"
        cluster.add_node(num_cpus=1, resources={"trainer": 1})
        wait_until(lambda: _world_sizes(run_dir)[-1:] == [2] or proc.poll() is not None, 120,
                   "the run to grow to 2 workers")
        grown_at = len(_world_sizes(run_dir))
        wait_until(lambda: len(_world_sizes(run_dir)) >= grown_at + 2 or proc.poll() is not None,
                   60, "two epochs on 2 workers")
        assert proc.poll() is None, f"finished before a node could go: {_world_sizes(run_dir)}"
        cluster.remove_node(cluster.workers("trainer")[0])
        proc.wait(timeout=240)
    finally:
        stop_process(proc)
    assert proc.returncode == 0, log.read_text()[-5000:]

    curve = card(str(home), "elastic-linear")["loss_curve"]
    assert [e["epoch"] for e in curve] == list(range(EPOCHS)), "an epoch is missing or repeated"
    sizes = [e["world_size"] for e in curve]
    # 1 worker, then 2 after the node joined, then 1 again after one was removed
    assert sizes[0] == 1 and 2 in sizes and sizes[-1] == 1, sizes
    first_two = sizes.index(2)
    assert 1 in sizes[first_two:], sizes
    # The shard cache is rebuilt for every worker group: each epoch, before and
    # after each resize, saw every training row exactly once.
    assert {e["samples"] for e in curve} == {TRAIN_ROWS}
    ref_curve = reference["card"]["loss_curve"]
    ref_loss, loss = ref_curve[-1]["val_loss"], curve[-1]["val_loss"]
    assert abs(loss - ref_loss) <= 0.05 * ref_loss, (loss, ref_loss)
    # Stronger: restarts resumed weights, optimizer state and epoch exactly, so
    # every epoch matches the uninterrupted run up to float rounding.
    np.testing.assert_allclose([e["val_loss"] for e in curve], [e["val_loss"] for e in ref_curve],
                               rtol=1e-3)


def _checkpoints(s3: S3Server, prefix: str) -> set[str]:
    depth = len(prefix.rstrip("/").split("/"))  # the folder right under the prefix
    return {key.split("/")[depth] for key in s3.keys(prefix)
            if "/checkpoint_" in key and key.endswith("train_state.json")}


def _job_status(c: LocalCluster, job: str) -> str:
    return dashboard_api(c, "GET", f"/api/jobs/{job}")["status"]


def deploy_app(c: LocalCluster, home: str, tmp_path: Path) -> tuple[str, subprocess.Popen]:
    """``serve deploy`` apps/maas.yaml onto ``c`` with storage ``home``, in the background:
    its base URL and the ``serve deploy`` process (its log is ``serve-deploy.log``)."""
    config = yaml.safe_load((REPO / "apps" / "maas.yaml").read_text())
    (port,) = free_ports(1)
    config["http_options"]["port"] = port
    config["proxy_location"] = "HeadOnly"  # one proxy: every node here shares 127.0.0.1
    app = config["applications"][0]
    app["args"]["storage"] = home
    for deployment in app["deployments"]:  # this test only predicts: no idle LLM/embedder replicas
        if deployment["name"] in ("LLMServer", "EmbeddingServer"):
            deployment.pop("num_replicas", None)
            deployment["autoscaling_config"] = {"min_replicas": 0, "initial_replicas": 0,
                                                "max_replicas": 1}
    config_path = tmp_path / "serve.yaml"
    config_path.write_text(yaml.safe_dump(config))
    proc = c.popen(["serve", "deploy", str(config_path), "--address", c.dashboard_url],
                   tmp_path / "serve-deploy.log")
    return f"http://127.0.0.1:{port}", proc


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_job_submit_resumes_run_on_s3_and_the_app_serves_it(
        cluster: LocalCluster, s3: S3Server, tmp_path: Path) -> None:
    """`ray job submit` from another shell: a stopped job resubmitted with the same
    run name resumes from its latest checkpoint in S3, publishes to the S3
    registry, and the app deployed on the cluster serves the new model."""
    home = f"s3://{s3.bucket}/home"
    # The app, deployed onto the same cluster with `serve deploy` before any model
    # exists, reads that registry: it starts while the jobs train and must serve the
    # version the second job publishes on the next request.
    url, deploying = deploy_app(cluster, home, tmp_path)
    workdir = tmp_path / "job"
    write_spec(workdir, spec("s3-linear", "s3-run", 2, source="diabetes.csv"))
    shutil.copy(DATA, workdir / "diabetes.csv")
    def submit(job: str, *extra: str, **env: str) -> Any:
        runtime_env = {"env_vars": {"MAAS_HOME": home, **env}}
        return cluster.run(["ray", "job", "submit", "--address", cluster.dashboard_url,
                            "--working-dir", str(workdir), "--submission-id", job,
                            "--runtime-env-json", json.dumps(runtime_env), *extra,
                            "--", "maas", "train", "spec.yaml"], timeout_s=400)

    submit("first", "--no-wait")
    # A checkpoint is in S3 before Ray Train's controller takes its report, and a report
    # waits only until the one before it is taken: with epochs 0-5 in S3 the controller
    # has taken epoch 3's, so a resumed run starts at epoch 3 or later. (With 3 folders
    # a stop right away, as the REST call is, resumed at epoch 2.)
    wait_until(lambda: len(_checkpoints(s3, "home/runs/s3-run/")) >= 6
               or _job_status(cluster, "first") not in ("PENDING", "RUNNING"), 240,
               "the first job's checkpoints in S3", interval_s=1)
    dashboard_api(cluster, "POST", "/api/jobs/first/stop")  # `ray job stop`, then its wait
    wait_until(lambda: _job_status(cluster, "first") not in ("PENDING", "RUNNING"), 120,
               "the first job to stop")
    assert _job_status(cluster, "first") == "STOPPED"
    assert not [k for k in s3.keys("home/models/")], "the stopped job published a model"

    # (the resubmission may report faster: it needs no time to be stopped in)
    out = submit("second", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2")
    assert _job_status(cluster, "second") == "SUCCEEDED", (out.stdout + out.stderr)[-3000:]
    with s3.client_env():
        info = card(home, "s3-linear")
    assert 3 <= info["run"]["started_at_epoch"] < EPOCHS, info["run"]
    assert [e["epoch"] for e in info["loss_curve"]] == list(range(EPOCHS))

    try:
        deploying.wait(timeout=240)
    finally:
        stop_process(deploying)
    assert deploying.returncode == 0, (tmp_path / "serve-deploy.log").read_text()[-3000:]
    wait_until(lambda: healthy(url), 240, "the app deployed on the cluster", interval_s=1)
    r = httpx.post(f"{url}/v1/models/s3-linear/predict", json={"inputs": ROWS.tolist()}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "s3-linear:1"
    with s3.client_env():
        from maas_ray.models.tabular import TabularModel
        from maas_ray.registry import Registry

        registry = Registry(home)
        expected = TabularModel.load(registry.local_dir(registry.get("s3-linear"))).predict(ROWS)
    np.testing.assert_allclose(r.json()["predictions"], expected, rtol=0, atol=1e-5)
