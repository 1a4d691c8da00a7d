"""LoRA fine-tunes served on their base's engine by the real app (issue 17, items 1 and 3):
two tenants' adapters and the base answer concurrent HTTP requests from one engine, each
with its own taught word, and the replica holds one base model for all three."""

from __future__ import annotations

import concurrent.futures as cf
import shutil
import uuid

import httpx
import pytest

from tests.lora_facts import QUESTION, SECRETS

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

CHAT = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def published(llm_home: str, taught_adapters, tmp_path_factory) -> dict[str, str]:
    """``{tenant: model name}``: each taught adapter published as a LoRA version of the base,
    the way a LoRA fine-tuning job publishes one."""
    from maas_ray.registry import Registry

    registry = Registry(llm_home)
    base = registry.get(CHAT)
    names = {}
    for tenant, folder in taught_adapters.items():
        src = tmp_path_factory.mktemp("publish") / "adapter"
        shutil.copytree(folder, src)
        name = f"secret-{tenant}-{uuid.uuid4().hex[:6]}"
        registry.publish(name, src, {"task": "chat", "format": "peft-lora", "base_model": base.id,
                                     "context_length": base.card.get("context_length")})
        names[tenant] = name
    return names


def test_two_adapters_and_their_base_share_one_engine(serve_url: str, published) -> None:
    from ray import serve

    models = [*published.values(), CHAT]

    def ask(model: str) -> tuple[str, str]:
        r = httpx.post(f"{serve_url}/v1/chat/completions", timeout=300, json={
            "model": model, "messages": QUESTION, "temperature": 0, "max_tokens": 12})
        assert r.status_code == 200, r.text
        return r.json()["model"], r.json()["choices"][0]["message"]["content"].lower()

    with cf.ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(ask, models))
    answers = {model: text for model, (_, text) in zip(models, replies)}
    for tenant, word in SECRETS.items():
        assert word in answers[published[tenant]], answers
        assert all(other not in answers[published[tenant]] for other in SECRETS.values() if other != word)
    assert not any(word in answers[CHAT] for word in SECRETS.values()), answers

    llm = serve.get_deployment_handle("LLMServer", app_name="maas")
    stats = [llm.stats.remote(version_id).result(timeout_s=120) for version_id, _ in replies]
    # Every id reports the same engine: the base's, with both adapters loaded on it (and any
    # that earlier tests of the session served on this base, e.g. tests/finetune/test_lora.py).
    assert all(s.get("adapters", 0) >= 2 and s["adapter_loads"] == stats[0]["adapter_loads"]
               for s in stats), stats
    # What the replica tells the request router (maas_ray/serve/adapter_router.py).
    routing = llm.record_routing_stats.remote().result(timeout_s=60)
    assert {v for v, _ in replies[:2]} <= set(routing["adapters"]), routing
    assert len(routing["adapters"]) == stats[0]["adapters"], (routing, stats)
