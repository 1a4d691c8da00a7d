"""The llama.cpp engine behind the running Serve app: the same greedy output as
llama-cpp-python alone, the same API as the transformers engine, freed KV cells on
disconnect, and a fine-tuned SmolLM2 exported to GGUF answering like transformers."""

from __future__ import annotations

import concurrent.futures as cf
import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from maas_ray.registry import Registry

pytest.importorskip("llama_cpp", reason="llama.cpp engine not installed (make install LLAMACPP=0)")
pytestmark = [pytest.mark.e2e, pytest.mark.integration]

CHAT = "smollm2-135m-instruct"  # pinned to transformers by tests/conftest.py
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Count from 1 to 20.", "Hi",
           "Explain gravity in one sentence to a curious child who likes football.", "List three colors.",
           "What is 2+2?", "Name a famous scientist.", "Tell me a joke about cats."]
MAX_TOKENS = [40, 24, 32, 40, 24, 32, 40, 24, 32]


@pytest.fixture(scope="module")
def client(serve_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def llama_cpp_python(gguf_model: str, llm_home: str):
    """llama-cpp-python's own high-level ``Llama`` on the same file, with the engine's
    settings (flash attention, weights in plain CPU buffers: on AMX CPUs llama.cpp's default
    AMX buffers round differently), answering one request at a time."""
    import llama_cpp.llama_cpp as low
    from llama_cpp import Llama

    from maas_ray.engines.llamacpp_engine import plain_weight_buffers

    registry = Registry(llm_home)
    path = registry.local_dir(registry.get(gguf_model)) / "model.gguf"
    default_params, keep = low.llama_model_default_params, []

    def plain_params():  # what Llama() asks for, with our buffer choice
        params = default_params()
        keep.append(plain_weight_buffers(low, params))
        return params

    low.llama_model_default_params = plain_params
    try:
        llm = Llama(model_path=str(path), n_ctx=2048, n_threads=2, flash_attn=True, verbose=False)
    finally:
        low.llama_model_default_params = default_params

    def greedy(messages: list[dict[str, str]], n: int) -> dict:
        return llm.create_chat_completion(messages, temperature=0, max_tokens=n)

    yield greedy
    llm.close()


def _usage(response) -> dict[str, int]:
    """Usage as llama-cpp-python counts it: our engines (both alike) also count the EOS
    token a completion ends with, llama-cpp-python does not."""
    eos = int(response.choices[0].finish_reason == "stop")
    return {"prompt_tokens": response.usage.prompt_tokens, "completion_tokens": response.usage.completion_tokens - eos,
            "total_tokens": response.usage.total_tokens - eos}


def _stats(model_id: str) -> dict[str, int]:
    from ray import serve

    handle = serve.get_deployment_handle("LLMServer", app_name="maas")
    return handle.options(multiplexed_model_id=model_id).stats.remote(model_id).result()


def test_greedy_equals_llama_cpp_python_alone_and_with_8_concurrent(client, gguf_model, llama_cpp_python) -> None:
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    want = [llama_cpp_python(m, n) for m, n in zip(chats, MAX_TOKENS)]
    assert len({w["usage"]["prompt_tokens"] for w in want}) > 5, "prompts should differ in length"

    def ask(messages, n):
        return client.chat.completions.create(model=gguf_model, messages=messages, temperature=0, max_tokens=n)

    alone = ask(chats[0], MAX_TOKENS[0])
    assert alone.choices[0].message.content == want[0]["choices"][0]["message"]["content"]
    assert _usage(alone) == want[0]["usage"]

    peak, done = 0, threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _stats(gguf_model)["running"])
            time.sleep(0.02)

    with cf.ThreadPoolExecutor(10) as pool:
        watcher = pool.submit(watch)
        futures = []
        for m, n in zip(chats, MAX_TOKENS):  # staggered: later ones join a batch already decoding
            futures.append(pool.submit(ask, m, n))
            time.sleep(0.05)
        got = [f.result() for f in futures]
        done.set()
        watcher.result()
    assert peak >= 4, f"only {peak} requests ran together"
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.choices[0].message.content == w["choices"][0]["message"]["content"], f"request {i} diverged"
        assert _usage(g) == w["usage"] and g.choices[0].finish_reason == w["choices"][0]["finish_reason"]
    # The ingress shows which engine served the model and what its batch self-check found.
    engine = httpx.get(f"{client.base_url}models/{gguf_model}", timeout=10).json()["engine"]
    assert engine["engine"] == "llama.cpp" and engine["warning"] is None, engine
    assert engine["batch_check"]["batch_invariant"] and engine["max_batch_size"] > 1, engine


def test_routes_behave_the_same_on_both_engines(client, gguf_model) -> None:
    def check(model: str) -> dict:
        full = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=10)
        pieces, usage, finish = [], None, None
        for chunk in client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=10,
                                                    stream=True, stream_options={"include_usage": True}):
            usage = chunk.usage or usage
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        text = full.choices[0].message.content
        assert "".join(pieces) == text and finish == full.choices[0].finish_reason
        assert usage.model_dump() == full.usage.model_dump()
        assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
        cut = text.strip()[-3:]
        stopped = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=10,
                                                 stop=[cut])
        assert stopped.choices[0].finish_reason == "stop" and cut not in stopped.choices[0].message.content
        assert stopped.usage.completion_tokens <= full.usage.completion_tokens
        seeded = [client.chat.completions.create(model=model, messages=QUESTION, n=2, seed=7, temperature=1.0,
                                                 max_tokens=6) for _ in range(2)]
        assert [c.message.content for c in seeded[0].choices] == [c.message.content for c in seeded[1].choices]
        completion = client.completions.create(model=model, prompt="The capital of France is", temperature=0,
                                               max_tokens=4)
        assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 4
        errors = {}
        for kwargs in ({"max_tokens": 100_000}, {"messages": [{"role": "user", "content": "hello " * 9000}]}):
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(**{"model": model, "messages": QUESTION, **kwargs})
            errors[next(iter(kwargs))] = {k: v for k, v in info.value.body.items() if k != "message"}
            errors[next(iter(kwargs))]["message"] = info.value.body["message"].replace(model, "MODEL")
        # What does not depend on the weights (q8_0 here, its fp32 dequantisation there).
        return {"prompt_tokens": full.usage.prompt_tokens, "errors": errors}

    on_transformers, on_llama_cpp = check(f"{CHAT}:1"), check(gguf_model)
    assert "kv_cells" in _stats(gguf_model) and "kv_cells" not in _stats(f"{CHAT}:1"), "engines as configured"
    assert on_llama_cpp == on_transformers


def test_disconnect_mid_stream_frees_the_kv_cells(serve_url: str, gguf_model: str) -> None:
    # Counting goes on until max_tokens (a story may end early with EOS, and a finished
    # request would leave nothing to free): ~1500 tokens is many seconds of decoding.
    body = {"model": gguf_model, "prompt": "Count from 1 to 2000: 1, 2, 3, 4, 5, 6,", "stream": True,
            "max_tokens": 1500, "temperature": 0}
    with httpx.stream("POST", f"{serve_url}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and '"text":"' in line and '"text":""' not in line:
                break  # tokens are flowing; now hang up
        # The request is in the engine (stats are read between steps: cells or a running slot).
        during = _stats(gguf_model)
        assert during["running"] > 0 or during["kv_cells_used"] > 0, during
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = _stats(gguf_model)
        if stats["running"] == 0 and stats["kv_cells_used"] == 0 and stats["kv_cells_retired"] == 0:
            break
        time.sleep(0.2)
    assert (stats["running"], stats["kv_cells_used"], stats["kv_cells_retired"]) == (0, 0, 0), stats


def test_fine_tuned_smollm2_exported_to_gguf_answers_like_transformers(
        client, llm_home: str, llm_dirs: dict[str, str], tmp_path: Path) -> None:
    """A few real AdamW steps change SmolLM2's weights; exported to f32 GGUF and served by
    llama.cpp, it gives the same greedy answer as the transformers engine on the same version."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from maas_ray.registry.gguf_export import attach_gguf
    from maas_ray.engines import SamplingParams, TransformersEngine

    base_dir = Path(llm_dirs[CHAT])
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    lesson = QUESTION + [{"role": "assistant", "content": "Paris, a city of light and old bridges."}]
    ids = torch.tensor([tok.apply_chat_template(lesson, tokenize=True)["input_ids"]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert (model.model.layers[0].self_attn.q_proj.weight - before).abs().max() > 1e-5, "weights unchanged"
    folder = tmp_path / "ft"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    shutil.copy2(base_dir / "generation_config.json", folder)
    del model, optimizer
    card = {"task": "chat", "format": "hf-transformers", "formats": ["hf-transformers"], "base_model": f"{CHAT}:1",
            "owned_by": "maas"}
    card = attach_gguf(folder, card, "f32")  # what the fine-tune publish step calls
    registry = Registry(llm_home)
    mv = registry.publish("smollm2-ft-gguf-test", folder, card)
    assert json.loads((registry.local_dir(mv) / "card.json").read_text())["gguf"]["outtype"] == "f32"

    served = client.chat.completions.create(model=mv.id, messages=QUESTION, temperature=0, max_tokens=16)
    assert "kv_cells" in _stats(mv.id), "served by the llama.cpp engine"
    import asyncio

    with TransformersEngine(registry.local_dir(mv)) as engine:
        prompt = engine.apply_chat_template(QUESTION)

        async def greedy() -> tuple[str, int]:
            text, n = "", 0
            async for chunk in engine.generate(prompt, SamplingParams(max_tokens=16, temperature=0), "ft"):
                text, n = text + chunk.text, chunk.completion_tokens
            return text, n

        want, n = asyncio.run(greedy())
    assert served.choices[0].message.content == want, (served.choices[0].message.content, want)
    assert (served.usage.prompt_tokens, served.usage.completion_tokens) == (len(prompt), n)
