"""No tenant reaches another's models, files or jobs, or learns that they exist (issue 14,
items 2, 3 and 7), over HTTP on the auth-on app.

Tenant A's fine-tuned model is planted by publishing a few bytes under an ``ft:`` name
with A's card: nothing here trains, and only the metrics test serves weights (a copy of
MiniLM), because every other route answers from the lookup alone. Each id that A owns is
paired with one of the same length that never existed; tenant B must get the same answer
for both, byte for byte once the id is swapped.
"""

from __future__ import annotations

import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.auth.conftest import CHAT, EMBEDDER, bearer
from tests.conftest import REPO

pytestmark = [pytest.mark.integration]

TENANT_A, TENANT_B = "tenancy-a", "tenancy-b"
UPLOAD = (REPO / "examples" / "finetune" / "chat.jsonl").read_bytes()


def _publish(root: str, name: str, card: dict) -> str:
    from maas_ray.registry import Registry

    src = Path(tempfile.mkdtemp())
    try:
        (src / "weights.safetensors").write_bytes(b"\0" * 16)
        return Registry(root).publish(name, src, card).id
    finally:
        shutil.rmtree(src)


@pytest.fixture(scope="module")
def world(auth_url: str, keys, maas_home: str):
    """Keys for A and B; A's fine-tuned model (two versions), file and job; B's file;
    and for each of A's ids one of the same shape that never existed."""
    from maas_ray.config.finetune import FineTuneSpec
    from maas_ray.finetune.jobs import JobService
    from maas_ray.registry import Registry

    base = f"leak-{secrets.token_hex(4)}"  # its own metric label: ft:{base}; never contains a tenant name
    hidden = f"ft:{base}:secret:ftjob-{secrets.token_hex(12)}"
    card = {"task": "chat", "tenant": TENANT_A, "owned_by": TENANT_A, "base_model": CHAT,
            "checkpoints": [{"step": 2, "uri": f"{maas_home}/runs/none/checkpoint_2", "files": {}}]}
    for _ in range(2):
        _publish(maas_home, hidden, card)
    a, b = (bearer(keys.create(t, rate="1000/min")[1]) for t in (TENANT_A, TENANT_B))
    with httpx.Client(timeout=60) as c:
        files = {}
        for who, headers in (("a", a), ("b", b)):
            r = c.post(f"{auth_url}/v1/files", headers=headers, files={"file": ("chat.jsonl", UPLOAD)},
                       data={"purpose": "fine-tune"})
            assert r.status_code == 200, r.text
            files[who] = r.json()["id"]
    jobs = JobService(maas_home)  # a row only: never submitted, never trains
    job_a = jobs.create(FineTuneSpec(base_model=CHAT, training_file=files["a"]), TENANT_A, submit=False)["id"]
    yield {"a": a, "b": b, "base": base, "hidden": hidden, "file_a": files["a"], "file_b": files["b"],
           "job_a": job_a, "unknown": {hidden: f"ft:{base}:secret:ftjob-{secrets.token_hex(12)}",
                                       files["a"]: f"file-{secrets.token_hex(12)}",
                                       job_a: f"ftjob-{secrets.token_hex(12)}"}}
    jobs.cancel(job_a, TENANT_A)
    Registry(maas_home).remove(hidden)


def _same_answer(c: httpx.Client, url: str, method: str, path: str, mine: str, never: str,
                 json: dict | None = None, headers: dict | None = None) -> httpx.Response:
    """B's answer about A's ``mine`` equals, byte for byte, its answer about ``never``."""
    forbidden = c.request(method, url + path.format(id=mine), json=_fill(json, mine), headers=headers)
    unknown = c.request(method, url + path.format(id=never), json=_fill(json, never), headers=headers)
    assert forbidden.status_code == unknown.status_code and forbidden.status_code in (400, 404), \
        (path, forbidden.text, unknown.text)
    assert forbidden.content == unknown.content.replace(never.encode(), mine.encode()), \
        (method, path, forbidden.text, unknown.text)
    return forbidden


def _fill(body: dict | None, value: str) -> dict | None:
    return None if body is None else {k: v.format(id=value) if isinstance(v, str) else v
                                      for k, v in body.items()}


MODEL_ROUTES = [  # (method, path, body): every route that looks a model up
    ("POST", "/v1/chat/completions", {"model": "{id}", "messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/v1/completions", {"model": "{id}", "prompt": "hi"}),
    ("POST", "/v1/embeddings", {"model": "{id}", "input": "hi"}),
    ("GET", "/v1/models/{id}", None),
    ("GET", "/v1/models/{id}:1", None),
    ("GET", "/v1/models/{id}:99", None),  # must not list the versions that do exist
    ("GET", "/v1/models/{id}/card", None),
    ("GET", "/v1/models/{id}:99/card", None),
    ("GET", "/v1/models/{id}/card/plot.png", None),
    ("POST", "/v1/models/{id}/predict", {"inputs": [[1.0, 2.0]]}),
    ("POST", "/v1/models/{id}:99/predict", {"inputs": [[1.0, 2.0]]}),
    ("GET", "/v2/models/{id}", None),
    ("GET", "/v2/models/{id}/ready", None),
    ("GET", "/v2/models/{id}/versions/1", None),
    ("GET", "/v2/models/{id}/versions/99", None),
    ("POST", "/v2/models/{id}/infer", {"inputs": [{"name": "input-0", "shape": [1, 2], "datatype": "FP64",
                                                   "data": [1.0, 2.0]}]}),
    ("POST", "/v2/models/{id}/versions/99/infer", {"inputs": [{"name": "input-0", "shape": [1, 2],
                                                               "datatype": "FP64", "data": [1.0, 2.0]}]}),
]


def test_another_tenants_model_answers_as_one_that_never_existed(auth_url: str, world) -> None:
    hidden, never = world["hidden"], world["unknown"][world["hidden"]]
    with httpx.Client(timeout=60) as c:
        assert c.get(f"{auth_url}/v1/models/{hidden}:99", headers=world["a"]).status_code == 404
        for method, path, body in MODEL_ROUTES:
            r = _same_answer(c, auth_url, method, path, hidden, never, body, world["b"])
            assert "[1, 2]" not in r.text and TENANT_A not in r.text, r.text


def test_another_tenants_checkpoint_answers_as_one_that_never_existed(auth_url: str, world) -> None:
    """A's job kept step 2 (issue 17, item 6): A lists and reads it, and is told which steps
    were kept when it asks for another; B gets what an id that never existed gets."""
    hidden, never = world["hidden"], world["unknown"][world["hidden"]]
    with httpx.Client(timeout=60) as c:
        listed = {who: [m["id"] for m in c.get(f"{auth_url}/v1/models", headers=world[who]).json()["data"]]
                  for who in ("a", "b")}
        assert f"{hidden}:ckpt-step-2" in listed["a"] and not [m for m in listed["b"] if hidden in m]
        r = c.get(f"{auth_url}/v1/models/{hidden}:ckpt-step-2", headers=world["a"])
        assert r.status_code == 200 and r.json()["versions"] == [1, 2], r.text
        r = c.get(f"{auth_url}/v1/models/{hidden}:ckpt-step-3", headers=world["a"])
        assert r.status_code == 404 and "kept no checkpoint at step 3 (kept steps: 2)" in r.text, r.text
        for step in (2, 3):
            for method, path, body in MODEL_ROUTES:
                _same_answer(c, auth_url, method, path, f"{hidden}:ckpt-step-{step}",
                             f"{never}:ckpt-step-{step}", body, world["b"])


def test_another_tenants_files_and_jobs_answer_as_ones_that_never_existed(auth_url: str, world) -> None:
    file_a, job_a = world["file_a"], world["job_a"]
    with httpx.Client(timeout=60) as c:
        for path, method in (("/v1/files/{id}", "GET"), ("/v1/files/{id}/content", "GET"),
                             ("/v1/files/{id}", "DELETE")):
            _same_answer(c, auth_url, method, path, file_a, world["unknown"][file_a], headers=world["b"])
        for path, method in (("/v1/fine_tuning/jobs/{id}", "GET"), ("/v1/fine_tuning/jobs/{id}/events", "GET"),
                             ("/v1/fine_tuning/jobs/{id}/checkpoints", "GET"),
                             ("/v1/fine_tuning/jobs/{id}/cancel", "POST"),
                             ("/v1/fine_tuning/jobs?after={id}", "GET")):
            _same_answer(c, auth_url, method, path, job_a, world["unknown"][job_a], headers=world["b"])
        # A's file as B's training data.
        _same_answer(c, auth_url, "POST", "/v1/fine_tuning/jobs", file_a, world["unknown"][file_a],
                     {"model": CHAT, "training_file": "{id}"}, world["b"])
        assert c.get(f"{auth_url}/v1/files/{file_a}", headers=world["a"]).status_code == 200


def test_no_fine_tuning_on_another_tenants_model(auth_url: str, world) -> None:
    hidden, b = world["hidden"], world["b"]
    with httpx.Client(timeout=60) as c:
        try:
            r = _same_answer(c, auth_url, "POST", "/v1/fine_tuning/jobs", hidden, world["unknown"][hidden],
                             {"model": "{id}", "training_file": world["file_b"]}, b)
            assert r.json()["error"]["param"] == "model"
        finally:  # on a regression, never leave a job training on A's weights
            for job in c.get(f"{auth_url}/v1/fine_tuning/jobs", headers=b).json()["data"]:
                c.post(f"{auth_url}/v1/fine_tuning/jobs/{job['id']}/cancel", headers=b)
        assert c.get(f"{auth_url}/v1/fine_tuning/jobs", headers=b).json()["data"] == []


def test_the_job_runner_checks_the_base_as_the_jobs_tenant(auth_url: str, world, maas_home: str) -> None:
    """A job row that names A's model, however it got into the database, fails before
    training with the error of a base that never existed, and publishes nothing."""
    from maas_ray import db
    from maas_ray.config.finetune import FineTuneSpec
    from maas_ray.finetune.jobs import new_job_id
    from maas_ray.finetune.runner import run_job
    from maas_ray.registry import Registry

    hidden, never = world["hidden"], world["unknown"][world["hidden"]]
    errors = {}
    for base in (hidden, never):
        job_id = new_job_id()
        spec = FineTuneSpec(base_model=base, training_file=world["file_b"], seed=0)
        with db.session(maas_home) as s:
            s.add(db.JobRow(id=job_id, tenant=TENANT_B, model=base, status="validating_files",
                            spec=spec.model_dump(mode="json"), training_file=world["file_b"], seed=0))
        assert run_job(job_id, maas_home) == 1
        job = httpx.get(f"{auth_url}/v1/fine_tuning/jobs/{job_id}", headers=world["b"], timeout=60).json()
        assert job["status"] == "failed" and job["fine_tuned_model"] is None, job
        errors[base] = job["error"]
        assert not [n for n in Registry(maas_home).names() if n.endswith(job_id)]
    assert str(errors[hidden]) == str(errors[never]).replace(never, hidden)
    assert errors[hidden]["param"] == "model"


def test_metric_labels_do_not_name_a_tenants_job(auth_url: str, world, maas_home: str) -> None:
    """A's fine-tuned embedder (a copy of MiniLM) answers one request: the ingress, the
    model replica and Ray Serve's multiplexing all label it, on an endpoint without keys."""
    import ray

    from maas_ray.registry import Registry

    registry = Registry(maas_home)
    base = registry.get(EMBEDDER)
    job_id = f"ftjob-{secrets.token_hex(12)}"
    name = f"ft:{world['base']}:secret:{job_id}"
    card = {k: v for k, v in base.card.items() if k not in ("files", "name", "created_at")}
    registry.publish(name, registry.local_dir(base), dict(card, tenant=TENANT_A, owned_by=TENANT_A))
    try:
        r = httpx.post(f"{auth_url}/v1/embeddings", headers=world["a"], timeout=120,
                       json={"model": name, "input": "hello"})
        assert r.status_code == 200, r.text
        url = f"http://127.0.0.1:{ray.nodes()[0]['MetricsExportPort']}/metrics"
        series = ("ray_maas_requests_total", "ray_maas_batched_requests_total",
                  "ray_serve_registered_multiplexed_model_id")
        labelled = [re.compile(rf'^{s}{{[^}}]*model(?:_id)?="[^"]*{re.escape(world["base"])}', re.M)
                    for s in series]
        deadline = time.monotonic() + 20  # Ray pushes metrics every second in tests
        while not all(p.search(text := httpx.get(url, timeout=10).text) for p in labelled):
            assert time.monotonic() < deadline, [s for s, p in zip(series, labelled) if not p.search(text)]
            time.sleep(0.5)
        assert f'model="ft:{world["base"]}"' in text and f'model_id="ft:{world["base"]}"' in text
        assert job_id not in text and ":secret" not in text
    finally:
        registry.remove(name)

    from maas_ray.serve.metrics import model_label

    assert model_label("ft:base:suffix:ftjob-abc:3") == "ft:base" and model_label("m:2") == "m"


def test_shared_model_cards_carry_no_server_paths(auth_url: str, world, maas_home: str) -> None:
    from maas_ray.registry import Registry

    places = ["/srv/private/diabetes.csv", "s3://corp-bucket/raw/diabetes.csv", f"{maas_home}/runs/r1"]
    name = f"tenancy-shared-{secrets.token_hex(4)}"
    _publish(maas_home, name, {  # as a trained model's card says where it came from
        "task": "regression", "data": {"source": places[0], "target": "y"},
        "spec": {"name": name, "data": {"source": places[1], "target": "y"}},
        "run": {"name": "r1", "storage": places[2]}, "metrics": {"test_mse": 1.0}})
    try:
        with httpx.Client(timeout=60) as c:
            trained = c.get(f"{auth_url}/v1/models/{name}/card", headers=world["b"])
            imported = c.get(f"{auth_url}/v1/models/{CHAT}/card", headers=world["b"])
        assert trained.status_code == imported.status_code == 200, (trained.text, imported.text)
        body = trained.json()
        assert body["card"]["data"] == {"target": "y"} and body["card"]["run"] == {"name": "r1"}
        assert body["card"]["metrics"] == {"test_mse": 1.0} and "test_mse" in body["markdown"]
        for place in places + [maas_home, Registry(maas_home).get(CHAT).card["source"]]:
            assert place not in trained.text and place not in imported.text, place
        assert "source" not in imported.json()["card"] and imported.json()["card"]["task"] == "chat"
    finally:
        Registry(maas_home).remove(name)
