"""The Serve app over real HTTP: same answers as in-process, clear 4xx on bad input."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pandas as pd
import pytest

from maas_ray.models.tabular import TabularModel
from maas_ray.registry import Registry

pytestmark = pytest.mark.integration

ROWS = pd.read_csv("examples/regression/diabetes.csv").drop(columns="target").to_numpy()[:50]


@pytest.fixture(scope="module")
def client(serve_url: str, regression_model):
    with httpx.Client(base_url=serve_url, timeout=60) as c:
        yield c


def _in_process(maas_home: str, model_id: str) -> np.ndarray:
    reg = Registry(maas_home)
    return TabularModel.load(reg.local_dir(reg.get(model_id))).predict(ROWS)


def test_served_predictions_equal_in_process(client: httpx.Client, regression_model, maas_home: str) -> None:
    result, _ = regression_model
    mid = result.version.id
    r = client.post(f"/v1/models/{mid}/predict", json={"inputs": ROWS.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == mid
    np.testing.assert_allclose(body["predictions"], _in_process(maas_home, mid), rtol=0, atol=1e-5)


def test_open_inference_protocol_answers_the_same(client: httpx.Client, regression_model, maas_home: str) -> None:
    result, _ = regression_model
    mv = result.version
    assert client.get("/v2/health/ready").json() == {"ready": True}
    meta = client.get(f"/v2/models/{mv.name}").json()
    assert meta["inputs"][0]["shape"] == [-1, 10]
    req = {"id": "r1", "inputs": [{"name": "input-0", "shape": list(ROWS.shape), "datatype": "FP64",
                                   "data": ROWS.reshape(-1).tolist()}]}
    r = client.post(f"/v2/models/{mv.name}/versions/{mv.version}/infer", json=req)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model_name"] == mv.name and out["model_version"] == str(mv.version) and out["id"] == "r1"
    assert out["outputs"][0]["shape"] == [len(ROWS)]
    np.testing.assert_allclose(out["outputs"][0]["data"], _in_process(maas_home, mv.id), atol=1e-5)


def test_concurrent_requests_are_batched_and_correct(client: httpx.Client, regression_model, maas_home: str) -> None:
    import concurrent.futures as cf

    mid = regression_model[0].version.id
    expected = _in_process(maas_home, mid)

    def one(i: int) -> float:
        r = client.post(f"/v1/models/{mid}/predict", json={"inputs": [ROWS[i].tolist()]})
        assert r.status_code == 200, r.text
        return r.json()["predictions"][0]

    with cf.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, range(len(ROWS))))
    np.testing.assert_allclose(got, expected, atol=1e-5)


GOOD = ROWS[0].tolist()


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/v1/models/diabetes-linear/predict", b"{not json", 400, "malformed JSON"),
        ("/v1/models/diabetes-linear/predict", {"inputs": [GOOD[:3]]}, 400, "expects 10 features"),
        ("/v1/models/diabetes-linear/predict", {"inputs": [GOOD, GOOD[:9]]}, 400, "same number"),
        ("/v1/models/diabetes-linear/predict", {"inputs": [["a"] * 10]}, 400, "valid number"),
        ("/v1/models/diabetes-linear/predict", b'{"inputs": [[NaN,1,1,1,1,1,1,1,1,1]]}', 400, "finite"),
        ("/v1/models/diabetes-linear/predict", {"inputs": []}, 400, "at least 1"),
        ("/v1/models/diabetes-linear/predict", {"rows": [GOOD]}, 400, "inputs"),
        ("/v1/models/no-such-model/predict", {"inputs": [GOOD]}, 404, "does not exist"),
        ("/v1/models/diabetes-linear:999/predict", {"inputs": [GOOD]}, 404, "does not exist"),
        ("/v1/models/bad..name/predict", {"inputs": [GOOD]}, 400, "invalid model name"),
        ("/v1/models/diabetes-linear/predict", {"inputs": [GOOD] * 2000}, 413, "exceeds the limit"),
        ("/v2/models/diabetes-linear/infer",
         {"inputs": [{"name": "input-0", "shape": [1, 9], "datatype": "FP32", "data": GOOD}]}, 400, "do not fill"),
        ("/v2/models/diabetes-linear/infer",
         {"inputs": [{"name": "input-0", "shape": [1, 10], "datatype": "BYTES", "data": GOOD}]}, 400, "not numeric"),
        ("/v2/models/ghost/infer",
         {"inputs": [{"name": "input-0", "shape": [1, 10], "datatype": "FP32", "data": GOOD}]}, 404, "ghost"),
        # JSON nested past max_json_depth (32) is refused before any parser recurses into it.
        ("/v1/models/diabetes-linear/predict", b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400,
         "nests deeper than 32"),
        ("/v2/models/diabetes-linear/infer", b'{"x": ' + b'{"a": ' * 40 + b"1" + b"}" * 41, 400, "nests deeper"),
        # Array lengths are bounded by the schema.
        ("/v2/models/diabetes-linear/infer",
         {"inputs": [{"name": "input-0", "shape": [1] * 9 + [10], "datatype": "FP32", "data": GOOD}]}, 400,
         "at most 8 items"),
    ],
)
def test_bad_input_gets_clear_4xx_and_replica_keeps_serving(
    client: httpx.Client, path: str, body, status: int, needle: str
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    message = error if isinstance(error, str) else error["message"]
    assert needle in message
    ok = client.post("/v1/models/diabetes-linear/predict", json={"inputs": [GOOD]})
    assert ok.status_code == 200


def _publish_shifted(maas_home: str, model_id: str, folder, shift: float) -> str:
    """Publish a copy of ``model_id`` with every weight shifted by ``shift``: a version
    that answers differently. (Published directly: training is tested elsewhere.)"""
    import shutil

    from safetensors.torch import load_file, save_file

    registry = Registry(maas_home)
    current = registry.get(model_id)
    shutil.copytree(registry.local_dir(current), folder)
    weights = load_file(folder / "model.safetensors")
    save_file({k: v + shift if v.is_floating_point() else v for k, v in weights.items()},
              folder / "model.safetensors")
    card = {k: v for k, v in current.card.items() if k not in ("files", "name", "created_at", "version")}
    return registry.publish(current.name, folder, card).id


def test_new_version_is_served_without_redeploy(client: httpx.Client, regression_model, maas_home: str, tmp_path) -> None:
    """A version published while the app runs answers the very next request."""
    first = client.post("/v1/models/diabetes-linear/predict", json={"inputs": ROWS.tolist()}).json()
    before = first["model"]
    new = _publish_shifted(maas_home, before, tmp_path / "next", 0.5)
    assert new != before
    r = client.post("/v1/models/diabetes-linear/predict", json={"inputs": ROWS.tolist()})
    assert r.status_code == 200
    assert r.json()["model"] == new
    np.testing.assert_allclose(r.json()["predictions"], _in_process(maas_home, new), atol=1e-5)
    assert not np.allclose(r.json()["predictions"], first["predictions"])
    listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert listed["diabetes-linear"]["version"] == int(new.rsplit(":", 1)[1])


def test_a_batch_mixing_versions_and_bad_rows_answers_each_request_on_its_own(
    client: httpx.Client, regression_model, maas_home: str, tmp_path
) -> None:
    """Concurrent one-row requests for two versions of one model share the predictor's
    batches; each must get its own version's in-process answer, and the bad rows among
    them (NaN, wrong width) their own 400 without failing the rest. Float64 inference
    makes a row's answer independent of what it is batched with (see TabularModel)."""
    import concurrent.futures as cf

    v1 = regression_model[0].version.id
    v2 = _publish_shifted(maas_home, v1, tmp_path / "v2", -0.25)
    expected = {v1: _in_process(maas_home, v1), v2: _in_process(maas_home, v2)}
    bad = {7: [float("nan")] + ROWS[7].tolist()[1:], 13: ROWS[13].tolist()[:4]}

    def one(i: int) -> tuple[int, str, httpx.Response]:
        mid = (v1, v2)[i % 2]
        body = json.dumps({"inputs": [bad.get(i, ROWS[i].tolist())]})  # NaN as JSON's NaN
        return i, mid, client.post(f"/v1/models/{mid}/predict", content=body,
                                   headers={"content-type": "application/json"})

    with cf.ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(one, range(len(ROWS))))
    for i, mid, r in answers:
        if i in bad:
            assert r.status_code == 400, r.text
            continue
        assert r.status_code == 200, r.text
        assert r.json()["model"] == mid
        np.testing.assert_allclose(r.json()["predictions"][0], expected[mid][i], rtol=0, atol=1e-5)
    assert not np.allclose(expected[v1], expected[v2])


def test_the_predictor_fails_only_the_request_it_cannot_run(regression_model, maas_home: str) -> None:
    """Called directly (no ingress checks), a request of the wrong width shares a batch with
    good ones: it alone gets an error, naming the width, and the others their answers."""
    from ray import serve

    mid = regression_model[0].version.id
    handle = serve.get_deployment_handle("Predictor", app_name="maas").options(multiplexed_model_id=mid)
    calls = [handle.predict.remote(mid, ROWS[i:i + 1]) for i in range(8)]
    calls.insert(3, handle.predict.remote(mid, ROWS[:2, :4]))
    with pytest.raises(Exception, match="expects rows of 10 features"):
        calls.pop(3).result(timeout_s=60)
    got = [call.result(timeout_s=60)["predictions"][0] for call in calls]
    np.testing.assert_allclose(got, _in_process(maas_home, mid)[:8], rtol=0, atol=1e-5)


def test_cors_is_off_by_default(client: httpx.Client) -> None:
    """No Access-Control-Allow-Origin for any origin unless the operator lists it."""
    origin = {"Origin": "https://elsewhere.example"}
    r = client.options("/v1/models", headers={**origin, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
    r = client.get("/v1/models", headers=origin)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_admin_routes_need_an_admin_key_even_with_auth_off(client: httpx.Client, maas_home: str) -> None:
    from maas_ray.auth import KeyStore

    keys = KeyStore(maas_home)
    _, tenant_key = keys.create("open-tenant")
    _, admin_key = keys.create("ops", admin=True)
    assert client.get("/v1/models").status_code == 200  # the open (loopback) service
    r = client.get("/v1/admin/keys")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = client.get("/v1/admin/keys", headers={"Authorization": f"Bearer {tenant_key}"})
    assert r.status_code == 403 and "admin key" in r.json()["error"]["message"]
    r = client.get("/v1/admin/keys", headers={"Authorization": f"Bearer {admin_key}"})
    assert r.status_code == 200 and {"open-tenant", "ops"} <= {k["tenant"] for k in r.json()["data"]}


def test_json_check_is_linear_case_blind_and_never_stalls_the_front_door(client: httpx.Client) -> None:
    """The depth check runs before any key is checked, on any path. An unterminated string of
    escaped quotes made its string-stripping regex quadratic (32 KB held the ingress event loop
    for 4.6 s, /healthz included); near the test app's 64 KiB body limit that was ~20 s. It must
    answer at once, and a content type in capitals must not skip it."""
    import concurrent.futures as cf

    evil = b'{"a": "' + b'\\"' * 30_000  # ~60 KB, unterminated
    with cf.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(client.post, "/healthz", content=evil, timeout=5,
                           headers={"content-type": "application/json"})
        assert client.get("/healthz", timeout=5).status_code == 200
        assert 400 <= slow.result().status_code < 500
    r = client.post("/v1/models/diabetes-linear/predict", content=b'{"inputs": ' + b"[" * 40 + b"]" * 40 + b"}",
                    headers={"content-type": "Application/JSON"}, timeout=5)
    assert r.status_code == 400 and "nests deeper than 32" in r.json()["error"]["message"]
