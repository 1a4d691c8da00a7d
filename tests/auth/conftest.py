"""The auth-on app that every test under tests/auth talks to over HTTP: a second maas app
with auth on (2 ingress replicas) on the session's Serve instance under /auth, the real
project database. Deployed once for the directory and deleted after its last test, so the
hardening tests add no second deployment."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import session_app_args

APP = "maas-auth"
EMBEDDER = "all-minilm-l6-v2"
CHAT = "smollm2-135m-instruct"
CONSOLE = "https://console.example"  # the one origin this app allows (CORS)


@pytest.fixture(scope="package")
def auth_url(serve_url: str, maas_home: str, llm_dirs) -> str:
    from ray import serve

    from maas_ray.serve.app import build_app

    args = {**session_app_args(maas_home), "auth": "on", "access_log": True, "cors_origins": [CONSOLE],
            "deployments": {"Ingress": {"num_replicas": 2}}}
    serve.run(build_app(args), name=APP, route_prefix="/auth")
    yield f"{serve_url}/auth"
    serve.delete(APP)


@pytest.fixture(scope="package")
def keys(maas_home: str):
    from maas_ray.auth import KeyStore

    return KeyStore(maas_home)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_openai_error(r: httpx.Response, status: int, kind: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == kind and err["message"]
