"""KServe/Triton's own client, ``tritonclient.http``, against the real app with its defaults:
inputs sent as binary tensors (no Content-Type) and outputs asked for in binary; then in
JSON. Same answers as in process (issue 15, item 7)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from maas_ray.models.tabular import TabularModel
from maas_ray.registry import Registry

pytestmark = pytest.mark.integration

ROWS = pd.read_csv("examples/regression/diabetes.csv").drop(columns="target").to_numpy()[:20]


@pytest.fixture(scope="module")
def triton(serve_url: str):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=serve_url.removeprefix("http://"))
    yield client
    client.close()


def _expected(maas_home: str, model_id: str) -> np.ndarray:
    reg = Registry(maas_home)
    return TabularModel.load(reg.local_dir(reg.get(model_id))).predict(ROWS.astype(np.float32))


@pytest.mark.parametrize("binary_in,binary_out", [(True, None), (True, True), (False, False), (True, False)])
def test_tritonclient_with_its_defaults_and_in_json(triton, regression_model, maas_home: str,
                                                    binary_in: bool, binary_out: bool | None) -> None:
    import tritonclient.http as httpclient

    mv = regression_model[0].version
    assert triton.is_server_live() and triton.get_model_metadata(mv.name)["name"] == mv.name
    x = httpclient.InferInput("input-0", list(ROWS.shape), "FP32")
    x.set_data_from_numpy(ROWS.astype(np.float32), binary_data=binary_in)
    # None: no outputs named, so the client asks for every output in binary (its default).
    outputs = None if binary_out is None else [httpclient.InferRequestedOutput("output-0", binary_data=binary_out)]
    result = triton.infer(mv.name, [x], model_version=str(mv.version), outputs=outputs, request_id="t1")
    got = result.as_numpy("output-0")
    assert got.shape == (len(ROWS),) and got.dtype == np.float64
    np.testing.assert_allclose(got, _expected(maas_home, mv.id), rtol=0, atol=1e-4)
    response = result.get_response()
    assert response["id"] == "t1" and response["model_version"] == str(mv.version)
    sent_binary = "binary_data_size" in (response["outputs"][0].get("parameters") or {})
    assert sent_binary == (binary_out is not False)


def test_binary_input_that_does_not_fit_its_header_is_a_clear_400(serve_url: str, regression_model) -> None:
    import json

    import httpx

    mv = regression_model[0].version
    header = json.dumps({"inputs": [{"name": "input-0", "shape": [2, 10], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 80}}]}).encode()
    for blob, needle in ((np.zeros(19, np.float32).tobytes(), "does not fit"),
                         (np.zeros(21, np.float32).tobytes(), "after the last binary input"),
                         (np.zeros(20, np.float32).tobytes()[:-2] + b"\x00" * 2 + b"x", "after the last")):
        r = httpx.post(f"{serve_url}/v2/models/{mv.name}/infer", content=header + blob,
                       headers={"Inference-Header-Content-Length": str(len(header))}, timeout=30)
        assert r.status_code == 400 and needle in r.json()["error"], r.text
    r = httpx.post(f"{serve_url}/v2/models/{mv.name}/infer", content=header + b"x" * 80,
                   headers={"Inference-Header-Content-Length": "nine"}, timeout=30)
    assert r.status_code == 400 and "must be an integer" in r.json()["error"]
    nan = np.full(20, np.nan, np.float32).tobytes()
    r = httpx.post(f"{serve_url}/v2/models/{mv.name}/infer", content=header + nan,
                   headers={"Inference-Header-Content-Length": str(len(header))}, timeout=30)
    assert r.status_code == 400 and "finite" in r.json()["error"]
