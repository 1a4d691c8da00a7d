"""Tenants own their batches as they own files and jobs (issue 16, item 4), on the auth-on app:
another tenant's batch reads exactly like one that never existed, in every route.

Nothing here runs: A's batch is a row only (created without its Ray job, then cancelled),
because every route answers from the row and the tenant check alone.
"""

from __future__ import annotations

import json
import secrets

import httpx
import pytest

from tests.auth.conftest import EMBEDDER, bearer

pytestmark = [pytest.mark.integration]

TENANT_A, TENANT_B = "batches-a", "batches-b"
LINE = {"custom_id": "one", "method": "POST", "url": "/v1/embeddings",
        "body": {"model": EMBEDDER, "input": "hello"}}


@pytest.fixture(scope="module")
def world(auth_url: str, keys, maas_home: str):
    from maas_ray.batches.service import BatchService

    a, b = (bearer(keys.create(t, rate="1000/min")[1]) for t in (TENANT_A, TENANT_B))
    with httpx.Client(timeout=60) as c:
        r = c.post(f"{auth_url}/v1/files", headers=a, data={"purpose": "batch"},
                   files={"file": ("batch.jsonl", json.dumps(LINE).encode() + b"\n")})
        assert r.status_code == 200, r.text
    file_a = r.json()["id"]
    service = BatchService(maas_home)  # a row only: never submitted, never runs
    batch_a = service.create(file_a, "/v1/embeddings", tenant=TENANT_A, submit=False)["id"]
    yield {"a": a, "b": b, "file_a": file_a, "batch_a": batch_a}
    service.cancel(batch_a, TENANT_A)


def test_another_tenants_batch_does_not_exist(auth_url: str, world: dict) -> None:
    mine, never = world["batch_a"], f"batch_{secrets.token_hex(12)}"
    with httpx.Client(timeout=60) as c:
        for method, path in (("GET", "/v1/batches/{id}"), ("POST", "/v1/batches/{id}/cancel")):
            forbidden = c.request(method, auth_url + path.format(id=mine), headers=world["b"])
            unknown = c.request(method, auth_url + path.format(id=never), headers=world["b"])
            assert forbidden.status_code == unknown.status_code == 404, (forbidden.text, unknown.text)
            assert forbidden.text.replace(mine, never) == unknown.text
        # B's list holds none of A's batches, and A's batch cannot anchor B's pages.
        listed = c.get(f"{auth_url}/v1/batches", headers=world["b"])
        assert listed.status_code == 200 and mine not in listed.text
        forbidden = c.get(f"{auth_url}/v1/batches", params={"after": mine}, headers=world["b"])
        unknown = c.get(f"{auth_url}/v1/batches", params={"after": never}, headers=world["b"])
        assert forbidden.status_code == unknown.status_code == 400
        assert forbidden.text.replace(mine, never) == unknown.text
        # B cannot run a batch over A's file: it reads as a file that never existed.
        other = f"file-{secrets.token_hex(12)}"
        answers = [c.post(f"{auth_url}/v1/batches", headers=world["b"], json={
            "input_file_id": f, "endpoint": "/v1/embeddings", "completion_window": "24h"})
            for f in (world["file_a"], other)]
        assert answers[0].status_code == answers[1].status_code == 400
        assert answers[0].text.replace(world["file_a"], other) == answers[1].text
        # A sees its own batch, in its list and by id; the service answers the same row.
        r = c.get(f"{auth_url}/v1/batches/{mine}", headers=world["a"])
        assert r.status_code == 200 and r.json()["status"] == "validating"
        assert mine in [x["id"] for x in c.get(f"{auth_url}/v1/batches", headers=world["a"]).json()["data"]]
        # The batch's input file stays while the batch may read it.
        r = c.delete(f"{auth_url}/v1/files/{world['file_a']}", headers=world["a"])
        assert r.status_code == 409 and f"batch {mine}" in r.json()["error"]["message"]
        # Without a key there is no batch API at all.
        assert c.get(f"{auth_url}/v1/batches").status_code == 401
