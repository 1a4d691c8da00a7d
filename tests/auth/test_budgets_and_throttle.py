"""Budgets on what requests actually use, per-key concurrency, metering of every model
route, throttled key checks (issue 14, items 5 and 8) on the auth-on app; the Host-header
allow-list (item 11) on the session app, which serves on loopback with auth 'auto'."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from maas_ray.serve.hosts import host_allowed, host_name
from tests.auth.conftest import CHAT, EMBEDDER, assert_openai_error, bearer

pytestmark = [pytest.mark.integration]

CLASSIFIER = "tiny-text-classifier"
LONG = [{"role": "user", "content": "Tell me a long story about a dragon and a knight."}]


def usage_of(keys, tenant: str, requests: int) -> dict:
    """The tenant's one usage row once it counts ``requests`` (the middleware records each
    request as its answer ends, so just after the client has it)."""
    deadline = time.monotonic() + 10
    while sum(r["requests"] for r in keys.usage(tenant)) < requests and time.monotonic() < deadline:
        time.sleep(0.05)
    [row] = keys.usage(tenant)
    assert row["requests"] == requests, row
    return row


def test_an_embeddings_call_over_the_budget_is_refused_before_it_runs(auth_url: str, keys) -> None:
    key, secret = keys.create("budget-embed", rate="1000/min", tokens_per_day=10)
    # 64 texts that the model truncates at 256 tokens each: 16,384 tokens in a 33 KB body.
    huge = ["1 " * 300] * 64
    with httpx.Client(timeout=120) as c:
        r = c.post(f"{auth_url}/v1/embeddings", headers=bearer(secret), json={"model": EMBEDDER, "input": huge})
        assert_openai_error(r, 429, "rate_limit_error")
        assert r.json()["error"]["code"] == "insufficient_quota" and "16384 tokens" in r.json()["error"]["message"]
        assert int(r.headers["retry-after"]) >= 1
        assert usage_of(keys, "budget-embed", 1)["prompt_tokens"] == 0  # refused: nothing used
        r = c.post(f"{auth_url}/v1/embeddings", headers=bearer(secret), json={"model": EMBEDDER, "input": "hi"})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == 3  # [CLS] hi [SEP]
    row = usage_of(keys, "budget-embed", 2)
    assert row["prompt_tokens"] + row["completion_tokens"] <= 10


def test_chat_is_cut_at_the_budget_and_a_prompt_over_it_is_refused(auth_url: str, keys) -> None:
    _, free = keys.create("budget-chat-free", rate="1000/min")
    with httpx.Client(timeout=300) as c:
        r = c.post(f"{auth_url}/v1/chat/completions", headers=bearer(free),
                   json={"model": CHAT, "messages": LONG, "max_tokens": 1})
        assert r.status_code == 200, r.text
        prompt = r.json()["usage"]["prompt_tokens"]
        _, secret = keys.create("budget-chat", rate="1000/min", tokens_per_day=prompt + 5)
        r = c.post(f"{auth_url}/v1/chat/completions", headers=bearer(secret),
                   json={"model": CHAT, "messages": LONG, "max_tokens": 50, "temperature": 0})
        assert r.status_code == 200, r.text
        # The engine stops at the budget (the story would go on for all 50 tokens).
        assert r.json()["choices"][0]["finish_reason"] == "length", (r.json()["choices"], r.json()["usage"])
        assert r.json()["usage"] == {"prompt_tokens": prompt, "completion_tokens": 5,
                                     "total_tokens": prompt + 5}
        row = usage_of(keys, "budget-chat", 1)
        assert row["prompt_tokens"] + row["completion_tokens"] == prompt + 5  # exactly the budget
        _, small = keys.create("budget-chat-small", rate="1000/min", tokens_per_day=prompt - 1)
        r = c.post(f"{auth_url}/v1/chat/completions", headers=bearer(small),
                   json={"model": CHAT, "messages": LONG, "max_tokens": 5, "stream": True})
        assert_openai_error(r, 429, "rate_limit_error")
        assert r.json()["error"]["code"] == "insufficient_quota"
    assert usage_of(keys, "budget-chat-small", 1)["completion_tokens"] == 0


def test_concurrent_requests_beyond_the_keys_limit_get_429(auth_url: str, keys) -> None:
    _, secret = keys.create("concurrency", rate="1000/min", max_concurrent=1)
    body = {"model": CHAT, "messages": LONG, "max_tokens": 24, "temperature": 0}
    with httpx.Client(timeout=300) as c, ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: c.post(f"{auth_url}/v1/chat/completions", headers=bearer(secret),
                                                 json=body), range(6)))
    codes = sorted(r.status_code for r in answers)
    # One in flight per key per ingress replica, and the app has two replicas.
    assert 1 <= codes.count(200) <= 2 and codes.count(429) >= 4, codes
    for r in answers:
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "too_many_concurrent_requests"
            assert r.headers["retry-after"] == "1"


@pytest.fixture(scope="module")
def classifier(maas_home: str, llm_dirs: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny text classifier (random weights, MiniLM's tokenizer) in the session registry."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from maas_ray.registry import Registry

    folder = tmp_path_factory.mktemp("classifier")
    tokenizer = AutoTokenizer.from_pretrained(llm_dirs[EMBEDDER], local_files_only=True)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                        num_labels=2, id2label={0: "no", 1: "yes"}, label2id={"no": 0, "yes": 1})
    BertForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    Registry(maas_home).publish(CLASSIFIER, Path(folder), {"task": "text-classification"})
    return CLASSIFIER


def test_classifier_predictions_are_metered_and_held_to_the_budget(auth_url: str, keys, classifier: str) -> None:
    _, secret = keys.create("metered-classifier", rate="1000/min", tokens_per_day=50)
    with httpx.Client(timeout=120) as c:
        r = c.post(f"{auth_url}/v1/models/{classifier}/predict", headers=bearer(secret),
                   json={"inputs": ["good", "bad"]})
        assert r.status_code == 200, r.text
        assert len(r.json()["predictions"]) == 2 and set(r.json()["predictions"]) <= {"yes", "no"}
        assert usage_of(keys, "metered-classifier", 1)["prompt_tokens"] == 6  # [CLS] word [SEP], twice
        r = c.post(f"{auth_url}/v1/models/{classifier}/predict", headers=bearer(secret),
                   json={"inputs": ["1 " * 100]})
        assert_openai_error(r, 429, "rate_limit_error")
        assert r.json()["error"]["code"] == "insufficient_quota"
    assert usage_of(keys, "metered-classifier", 2)["prompt_tokens"] == 6  # the refused one read nothing


def test_wrong_secrets_for_a_key_id_are_throttled(auth_url: str, keys) -> None:
    victim, good = keys.create("throttled", rate="1000/min")
    _, other = keys.create("throttle-bystander", rate="1000/min")
    wrong = good[:-1] + ("a" if good[-1] != "a" else "b")
    with httpx.Client(timeout=60) as c:
        answers = [c.get(f"{auth_url}/v1/models", headers=bearer(wrong)) for _ in range(40)]
        codes = [r.status_code for r in answers]
        # 10 failures per key id per ingress replica (two here), then 429 without any hashing.
        assert codes[:10] == [401] * 10 and codes.count(401) <= 20 and set(codes) == {401, 429}, codes
        r = next(r for r in answers if r.status_code == 429)
        assert_openai_error(r, 429, "rate_limit_error")
        assert r.json()["error"]["code"] == "too_many_failed_attempts" and 1 <= int(r.headers["retry-after"]) <= 60
        assert c.get(f"{auth_url}/v1/models", headers=bearer(other)).status_code == 200  # another id, same address
    assert victim.id not in r.text


def test_host_names_are_parsed_as_browsers_send_them() -> None:
    assert host_name("LocalHost.:8000") == "localhost" and host_name("[::1]:8000") == "[::1]"
    assert host_name("127.0.0.1") == "127.0.0.1"
    loopback = ["localhost", "127.0.0.1", "[::1]"]
    assert all(host_allowed(h, loopback) for h in ("localhost:1", "127.0.0.1:80", "[::1]:8000", "[::1]"))
    assert not any(host_allowed(h, loopback) for h in ("evil.example", "localhost.evil.example:80", "",
                                                        "127.0.0.1.nip.io", "[::2]:80"))
    assert host_allowed("api.example.com", ["*.example.com"]) and not host_allowed("example.com", ["*.example.com"])


def test_a_loopback_service_answers_only_to_loopback_host_names(serve_url: str) -> None:
    port = urlsplit(serve_url).port
    with httpx.Client(timeout=60) as c:
        for host in ("evil.example", f"evil.example:{port}", f"localhost.attacker.example:{port}"):
            for method, path in (("GET", "/healthz"), ("GET", "/"), ("POST", "/v1/embeddings")):
                r = c.request(method, f"{serve_url}{path}", headers={"Host": host}, json={})
                assert_openai_error(r, 400, "invalid_request_error")
                assert r.json()["error"]["code"] == "host_not_allowed" and host in r.json()["error"]["message"]
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
            assert c.get(f"{serve_url}/healthz", headers={"Host": host}).status_code == 200
