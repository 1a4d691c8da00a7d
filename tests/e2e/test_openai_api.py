"""The official openai SDK, unmodified, against the running Serve app."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import time

import httpx
import numpy as np
import openai
import pytest
import torch

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

CHAT, EMB = "smollm2-135m-instruct", "all-minilm-l6-v2"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(serve_url: str, llm_dirs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def reference(llm_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llm_dirs[CHAT])
    model = AutoModelForCausalLM.from_pretrained(llm_dirs[CHAT]).eval()

    def greedy(messages, n: int) -> str:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids
        with torch.no_grad():
            out = model.generate(torch.tensor([list(ids)]), max_new_tokens=n, do_sample=False)
        return tok.decode(out[0, len(ids):], skip_special_tokens=True)

    return greedy


def test_models_lists_base_and_tensor_models(client: openai.OpenAI, regression_model) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert {CHAT, EMB, "diabetes-linear"} <= set(models)
    assert models[CHAT].owned_by == "maas" and models[CHAT].created > 0


def test_greedy_chat_equals_in_process_generate_alone_and_under_load(client, reference) -> None:
    want = reference(QUESTION, 24)
    r = client.chat.completions.create(model=CHAT, messages=QUESTION, temperature=0, max_tokens=24)
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    others = [[{"role": "user", "content": f"Write {k} words about the number {k}."}] for k in range(1, 9)]
    with cf.ThreadPoolExecutor(9) as pool:
        busy = [pool.submit(client.chat.completions.create, model=CHAT, messages=m, temperature=0,
                            max_tokens=8 + 4 * i) for i, m in enumerate(others)]
        time.sleep(0.5)
        mine = pool.submit(client.chat.completions.create, model=CHAT, messages=QUESTION,
                           temperature=0, max_tokens=24)
        assert mine.result().choices[0].message.content == want
        assert all(f.result().choices[0].finish_reason in ("stop", "length") for f in busy)


def test_stream_matches_non_stream_and_reports_usage(client) -> None:
    full = client.chat.completions.create(model=CHAT, messages=QUESTION, temperature=0, max_tokens=16)
    pieces, usage, finish = [], None, None
    for chunk in client.chat.completions.create(model=CHAT, messages=QUESTION, temperature=0, max_tokens=16,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens


def test_completions_stop_n_and_seed(client) -> None:
    r = client.completions.create(model=CHAT, prompt="The capital of France is", temperature=0, max_tokens=12)
    text = r.choices[0].text
    assert text and r.object == "text_completion"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=CHAT, prompt="The capital of France is", temperature=0, max_tokens=12, stream=True) if c.choices)
    assert streamed == text
    cut = text.strip()[:2]
    stopped = client.completions.create(model=CHAT, prompt="The capital of France is", temperature=0,
                                        max_tokens=12, stop=[cut])
    assert stopped.choices[0].finish_reason == "stop" and cut not in stopped.choices[0].text
    two = client.chat.completions.create(model=CHAT, messages=QUESTION, n=2, seed=7, temperature=1.0, max_tokens=8)
    again = client.chat.completions.create(model=CHAT, messages=QUESTION, n=2, seed=7, temperature=1.0, max_tokens=8)
    assert [c.index for c in two.choices] == [0, 1]
    assert [c.message.content for c in two.choices] == [c.message.content for c in again.choices]


def test_embeddings_float_base64_and_similarity(client, llm_dirs) -> None:
    from maas_ray.engines import Embedder

    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today."]
    r = client.embeddings.create(model=EMB, input=texts)
    vectors = np.array([d.embedding for d in r.data])
    ref, _ = Embedder(llm_dirs[EMB]).embed(texts)
    assert (vectors * ref).sum(axis=1).min() >= 0.999
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
    assert r.usage.prompt_tokens > 0
    raw = httpx.post(f"{client.base_url}embeddings", json={"model": EMB, "input": texts[0],
                                                             "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, vectors[0], atol=1e-6)
    small = client.embeddings.create(model=EMB, input="hello", dimensions=32)
    assert len(small.data[0].embedding) == 32


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"model": "no-such-model", "messages": QUESTION}, openai.NotFoundError, "does not exist"),
        ({"model": CHAT, "messages": []}, openai.BadRequestError, "messages"),
        ({"model": CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, openai.BadRequestError, "role"),
        ({"model": CHAT, "messages": QUESTION, "max_tokens": 0}, openai.BadRequestError, "max_tokens"),
        ({"model": CHAT, "messages": QUESTION, "max_tokens": 100_000}, openai.BadRequestError, "context length"),
        ({"model": CHAT, "messages": QUESTION, "temperature": -1}, openai.BadRequestError, "temperature"),
        ({"model": CHAT, "messages": [{"role": "user", "content": 42}]}, openai.BadRequestError, "content"),
        ({"model": CHAT, "messages": [{"role": "user", "content": "hello " * 9000}]}, openai.BadRequestError,
         "tokens"),
        ({"model": EMB, "messages": QUESTION}, openai.BadRequestError, "embedding"),
    ],
)
def test_bad_chat_requests_are_openai_style_4xx(client, kwargs, error, needle) -> None:
    with pytest.raises(error) as info:
        client.chat.completions.create(**kwargs)
    body = info.value.body
    assert needle in body["message"], body
    assert {"message", "type", "param", "code"} <= set(body)
    ok = client.chat.completions.create(model=CHAT, messages=QUESTION, temperature=0, max_tokens=2)
    assert ok.choices[0].message.content is not None


def test_disconnect_mid_stream_frees_the_batch_slot(serve_url: str, client) -> None:
    from ray import serve

    body = {"model": CHAT, "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "stream": True, "max_tokens": 400, "temperature": 0}
    with httpx.stream("POST", f"{serve_url}/v1/chat/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                break  # tokens are flowing; now hang up
    handle = serve.get_deployment_handle("LLMServer", app_name="maas")
    mv = f"{CHAT}:1"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = handle.options(multiplexed_model_id=mv).stats.remote(mv).result()
        if stats["running"] == 0:
            break
        time.sleep(0.2)
    assert stats["running"] == 0, stats


def test_openai_client_example_runs_and_checks_itself(serve_url: str, llm_dirs) -> None:
    from tests.conftest import load_example_file

    example = load_example_file("clients/openai_client.py")
    example.main(f"{serve_url}/v1")  # raises AssertionError if any of its checks fail
