"""API keys, tenants and quotas against a real Serve app: a second maas app with auth on
(2 ingress replicas) on the session's Serve instance under /auth, real HTTP, the real
project database. The session app (auth off on loopback) is left as it is."""

from __future__ import annotations

import glob
import os
import re
import shutil
import sqlite3
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from maas_ray.auth.keys import VERIFIED_TTL_S
from maas_ray.auth.ledger import FLUSH_PERIOD_S
from tests.auth.conftest import APP, CHAT, CONSOLE, EMBEDDER, assert_openai_error, bearer
from tests.conftest import REPO

pytestmark = [pytest.mark.integration]


def test_requests_without_a_good_key_get_401(auth_url: str, keys) -> None:
    key_id_only, good = keys.create("t401")
    _, revoked = keys.create("t401")
    keys.revoke(revoked.split("-")[1])
    wrong_secret = good[: -6] + ("AAAAAA" if not good.endswith("AAAAAA") else "BBBBBB")
    unknown_id = "maas-0123456789abcdef-" + good.split("-", 2)[2]
    with httpx.Client(timeout=60) as c:
        assert c.get(f"{auth_url}/v1/models", headers=bearer(good)).status_code == 200
        for headers in ({}, {"Authorization": good}, bearer("nonsense"), bearer(wrong_secret),
                        bearer(unknown_id), bearer(revoked)):
            r = c.get(f"{auth_url}/v1/models", headers=headers)
            assert_openai_error(r, 401, "authentication_error")
            assert good not in r.text and revoked not in r.text
        r = c.post(f"{auth_url}/v1/chat/completions", json={"model": "x", "messages": []})
        assert_openai_error(r, 401, "authentication_error")
        r = c.get(f"{auth_url}/v2/models/{EMBEDDER}")  # Open Inference Protocol body on /v2
        assert r.status_code == 401 and isinstance(r.json()["error"], str)
        # Health, docs and the schema stay open.
        for path in ("/healthz", "/openapi.json", "/docs"):
            assert c.get(f"{auth_url}{path}").status_code == 200, path


def test_another_tenant_gets_404_for_files_jobs_and_models(auth_url: str, keys, maas_home: str) -> None:
    from maas_ray.registry import Registry

    _, key_a = keys.create("tenant-a", rate="1000/min")
    _, key_b = keys.create("tenant-b", rate="1000/min")
    a, b = bearer(key_a), bearer(key_b)
    # A fine-tuned model of tenant A, published directly (training is not what is tested).
    src = Path(tempfile.mkdtemp())
    (src / "weights.safetensors").write_bytes(b"\0" * 16)
    model = Registry(maas_home).publish("auth-ft-a", src, {"task": "chat", "tenant": "tenant-a",
                                                           "owned_by": "tenant-a"})
    shutil.rmtree(src)
    with httpx.Client(timeout=120) as c:
        data = (REPO / "examples" / "finetune" / "chat.jsonl").read_bytes()
        r = c.post(f"{auth_url}/v1/files", headers=a, files={"file": ("chat.jsonl", data)},
                   data={"purpose": "fine-tune"})
        assert r.status_code == 200, r.text
        file_id = r.json()["id"]
        r = c.post(f"{auth_url}/v1/fine_tuning/jobs", headers=a,
                   json={"model": "smollm2-135m-instruct", "training_file": file_id})
        assert r.status_code == 200, r.text
        job_id = r.json()["id"]
        try:
            # A sees its own; B gets 404 (not 403) and does not see them listed.
            assert c.get(f"{auth_url}/v1/files/{file_id}", headers=a).status_code == 200
            assert c.get(f"{auth_url}/v1/fine_tuning/jobs/{job_id}", headers=a).status_code == 200
            assert c.get(f"{auth_url}/v1/models/{model.id}", headers=a).status_code == 200
            for path in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content",
                         f"/v1/fine_tuning/jobs/{job_id}", f"/v1/fine_tuning/jobs/{job_id}/events",
                         f"/v1/models/{model.id}", "/v1/models/auth-ft-a"):
                assert_openai_error(c.get(f"{auth_url}{path}", headers=b), 404, "not_found_error")
            r = c.post(f"{auth_url}/v1/chat/completions", headers=b,
                       json={"model": "auth-ft-a", "messages": [{"role": "user", "content": "hi"}]})
            assert_openai_error(r, 404, "not_found_error")
            assert file_id not in c.get(f"{auth_url}/v1/files", headers=b).text
            assert job_id not in c.get(f"{auth_url}/v1/fine_tuning/jobs", headers=b).text
            listed_b = {m["id"] for m in c.get(f"{auth_url}/v1/models", headers=b).json()["data"]}
            listed_a = {m["id"] for m in c.get(f"{auth_url}/v1/models", headers=a).json()["data"]}
            assert "auth-ft-a" in listed_a and "auth-ft-a" not in listed_b
            assert EMBEDDER in listed_a and EMBEDDER in listed_b  # base models are shared
        finally:
            c.post(f"{auth_url}/v1/fine_tuning/jobs/{job_id}/cancel", headers=a)
            Registry(maas_home).remove("auth-ft-a")


def replica_logs() -> list[str]:
    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    return sorted(glob.glob(os.path.join(session, "logs", "serve", f"replica_{APP}_Ingress_*.log")))


def test_rate_limit_holds_across_two_ingress_replicas(auth_url: str, keys) -> None:
    key, secret = keys.create("tenant-rate", rate="6/min")
    # Start early in a minute window so the burst does not straddle two windows.
    if time.time() % 60 > 45:
        time.sleep(61 - time.time() % 60)
    with httpx.Client(timeout=60) as c, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: c.get(f"{auth_url}/v1/models", headers=bearer(secret)), range(24)))
    codes = sorted(r.status_code for r in answers)
    # One counter for the key, whichever replica answers: exactly its 6 requests pass.
    assert codes == [200] * 6 + [429] * 18, codes
    for r in answers:
        if r.status_code == 429:
            assert_openai_error(r, 429, "rate_limit_error")
            assert 1 <= int(r.headers["retry-after"]) <= 60
    # Both replicas answered some of them (their access logs).
    served = [Path(p).read_text().count("/v1/models") for p in replica_logs()]
    assert len(served) == 2 and all(n > 0 for n in served), served


def test_tokens_are_metered_and_the_daily_budget_enforced(auth_url: str, keys) -> None:
    key, secret = keys.create("tenant-tokens", rate="1000/min", tokens_per_day=9)
    with httpx.Client(timeout=120) as c:
        # 11 tokens: more than the whole budget, refused before it runs (more in
        # tests/auth/test_budgets_and_throttle.py).
        r = c.post(f"{auth_url}/v1/embeddings", headers=bearer(secret),
                   json={"model": EMBEDDER, "input": "the quick brown fox jumps over the lazy dog"})
        assert_openai_error(r, 429, "rate_limit_error")
        assert r.json()["error"]["code"] == "insufficient_quota"
        for _ in range(3):
            r = c.post(f"{auth_url}/v1/embeddings", headers=bearer(secret), json={"model": EMBEDDER, "input": "x"})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["prompt_tokens"] == 3  # [CLS] x [SEP]
        deadline = time.monotonic() + 10  # usage is recorded as the answer completes
        while sum(u["requests"] for u in keys.usage("tenant-tokens")) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        [row] = keys.usage("tenant-tokens")
        assert row["requests"] == 4 and row["prompt_tokens"] == 9 and row["key_id"] == key.id
        # Each of the two ingress replicas keeps the day's total at most a period before
        # re-reading it (maas_ray.auth.ledger): the other's written usage counts after that.
        time.sleep(FLUSH_PERIOD_S)
        r = c.post(f"{auth_url}/v1/embeddings", headers=bearer(secret), json={"model": EMBEDDER, "input": "x"})
        assert_openai_error(r, 429, "rate_limit_error")
        assert r.json()["error"]["code"] == "tokens_per_day_exceeded" and int(r.headers["retry-after"]) >= 1


def test_keys_are_never_stored_or_logged_in_plain_text(auth_url: str, keys, maas_home: str) -> None:
    _, secret = keys.create("tenant-secret")
    with httpx.Client(timeout=60) as c:
        assert c.get(f"{auth_url}/v1/models", headers=bearer(secret)).status_code == 200
        assert c.get(f"{auth_url}/v1/models", headers=bearer(secret + "x")).status_code == 401
    secret_part = secret.split("-", 2)[2]
    db_files = glob.glob(os.path.join(maas_home, "maas.db*"))
    assert db_files
    con = sqlite3.connect(os.path.join(maas_home, "maas.db"))
    try:
        dump = "\n".join(con.iterdump())
    finally:
        con.close()
    assert "api_keys" in dump and secret_part not in dump and secret_part[:12] not in dump
    for path in db_files:  # the WAL too
        assert secret_part.encode() not in Path(path).read_bytes()
    logs = replica_logs()
    assert logs
    for path in logs:
        assert secret_part not in Path(path).read_text()


def test_admin_routes_manage_keys_over_http(auth_url: str, keys) -> None:
    _, admin = keys.create("ops-admin", rate="1000/min", admin=True)
    _, tenant = keys.create("ops-tenant", rate="1000/min")
    with httpx.Client(timeout=60) as c:
        r = c.post(f"{auth_url}/v1/admin/keys", headers=bearer(tenant), json={"tenant": "x"})
        assert_openai_error(r, 403, "permission_error")
        r = c.post(f"{auth_url}/v1/admin/keys", headers=bearer(admin),
                   json={"tenant": "made-over-http", "rate": "5/min", "tokens_per_day": 1000})
        assert r.status_code == 200, r.text
        made = r.json()
        assert made["tenant"] == "made-over-http" and made["rate"] == "5/min" and made["key"].startswith("maas-")
        assert c.get(f"{auth_url}/v1/models", headers=bearer(made["key"])).status_code == 200
        listed = c.get(f"{auth_url}/v1/admin/keys", headers=bearer(admin), params={"tenant": "made-over-http"})
        assert [k["id"] for k in listed.json()["data"]] == [made["id"]]
        assert "key" not in listed.json()["data"][0]  # shown once, at creation
        r = c.post(f"{auth_url}/v1/admin/keys", headers=bearer(admin), json={"tenant": "t", "rate": "lots"})
        assert_openai_error(r, 400, "invalid_request_error")
        assert "N/unit" in r.json()["error"]["message"]
        assert c.delete(f"{auth_url}/v1/admin/keys/{made['id']}", headers=bearer(admin)).status_code == 200
        time.sleep(VERIFIED_TTL_S)  # replicas that verified the key may trust it this long
        assert_openai_error(c.get(f"{auth_url}/v1/models", headers=bearer(made["key"])), 401, "authentication_error")
        assert_openai_error(c.delete(f"{auth_url}/v1/admin/keys/0000", headers=bearer(admin)), 404, "not_found_error")
        usage = c.get(f"{auth_url}/v1/admin/usage", headers=bearer(admin), params={"tenant": "made-over-http"})
        assert usage.status_code == 200 and usage.json()["data"][0]["requests"] >= 1


def test_streams_are_metered_without_include_usage(auth_url: str, keys) -> None:
    from openai import OpenAI

    key, secret = keys.create("tenant-stream", rate="1000/min")
    client = OpenAI(base_url=f"{auth_url}/v1", api_key=secret, max_retries=0, timeout=300)
    stream = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Count to ten."}],
                                            max_tokens=6, temperature=0, stream=True)
    chunks = [c for c in stream]
    assert all(c.usage is None for c in chunks)  # the client did not ask for usage
    deadline = time.monotonic() + 10
    while not keys.usage("tenant-stream") and time.monotonic() < deadline:
        time.sleep(0.1)
    [row] = keys.usage("tenant-stream")
    assert row["requests"] == 1 and row["prompt_tokens"] > 0 and row["completion_tokens"] == 6


def test_cors_only_for_the_configured_origin(auth_url: str) -> None:
    with httpx.Client(timeout=60) as c:
        for origin, allowed in ((CONSOLE, True), ("https://evil.example", False)):
            r = c.options(f"{auth_url}/v1/chat/completions",
                          headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                   "Access-Control-Request-Headers": "authorization,content-type"})
            assert (r.headers.get("access-control-allow-origin") == origin) is allowed, r.headers


def test_cli_manages_keys_of_a_running_service_with_an_admin_key(auth_url: str, keys) -> None:
    from typer.testing import CliRunner

    from maas_ray.cli import app

    _, admin = keys.create("cli-admin", rate="1000/min", admin=True)
    _, tenant = keys.create("cli-tenant", rate="1000/min")
    runner = CliRunner()
    remote = ["--url", auth_url]
    r = runner.invoke(app, ["keys", "create", "--tenant", "cli-made", *remote], env={"MAAS_ADMIN_KEY": admin})
    assert r.exit_code == 0, r.output
    # The key is its own line; Ray may forward replica log lines into the captured output too.
    [secret] = re.findall(r"^(maas-[0-9a-f]{16}-\S+)$", r.output, re.MULTILINE)
    made = keys.authenticate(secret)
    assert made.tenant == "cli-made"
    r = runner.invoke(app, ["keys", "ls", "--tenant", "cli-made", *remote, "--admin-key", admin])
    assert r.exit_code == 0 and made.id[:6] in r.output and secret.split("-", 2)[2] not in r.output
    r = runner.invoke(app, ["keys", "ls", *remote, "--admin-key", tenant])  # not an admin key
    assert r.exit_code == 2 and "403" in r.output and "admin key" in r.output
    r = runner.invoke(app, ["keys", "ls", *remote], env={"MAAS_ADMIN_KEY": ""})
    assert r.exit_code == 2 and "--admin-key" in r.output
    r = runner.invoke(app, ["keys", "revoke", made.id, *remote, "--admin-key", admin])
    assert r.exit_code == 0 and keys.list("cli-made")[0].revoked_at is not None
    r = runner.invoke(app, ["usage", "--tenant", "cli-admin", *remote, "--admin-key", admin])
    assert r.exit_code == 0 and "cli-admin" in r.output
