"""The continuous-batching engine in-process: exact greedy output, joins/leaves, stops."""

from __future__ import annotations

import asyncio

import pytest
import torch

from maas_ray.serve.llm import SamplingParams, TransformersEngine

CHAT = "smollm2-135m-instruct"
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Count from 1 to 20.",
           "Hi", "Explain gravity in one sentence.", "List three colors.", "What is 2+2?",
           "Name a famous scientist.", "Tell me a joke about cats."]


@pytest.fixture(scope="module")
def engine(base_models: dict[str, str]):
    eng = TransformersEngine(base_models[CHAT], max_batch_size=16)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def reference(base_models: dict[str, str]):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_models[CHAT]).eval()

    def generate(ids: list[int], n: int) -> list[int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
        return out[0, len(ids):].tolist()

    return generate


async def _run(engine, ids, params, rid):
    tokens, text, finish, last = [], "", None, None
    async for chunk in engine.generate(ids, params, rid):
        tokens += chunk.token_ids
        text += chunk.text
        finish, last = chunk.finish_reason, chunk
    return tokens, text, finish, last


def _ids(engine, prompt: str) -> list[int]:
    return engine.apply_chat_template([{"role": "user", "content": prompt}])


def test_greedy_equals_generate_alone_and_with_8_others(engine, reference) -> None:
    ids = [_ids(engine, p) for p in PROMPTS]
    n = [20, 16, 12, 20, 16, 12, 20, 16, 12]
    expected = [reference(i, k) for i, k in zip(ids, n)]

    async def main():
        alone = await _run(engine, ids[0], SamplingParams(max_tokens=n[0], temperature=0), "alone")
        together = await asyncio.gather(*[
            _run(engine, i, SamplingParams(max_tokens=k, temperature=0), f"r{j}")
            for j, (i, k) in enumerate(zip(ids, n))])
        return alone, together

    alone, together = asyncio.run(main())
    # generate stops at EOS too; our tokens include the EOS it emitted
    assert alone[0] == expected[0][:len(alone[0])] and len(alone[0]) == len(expected[0])
    for got, want in zip(together, expected):
        assert got[0] == want, (got, want)
    assert engine.stats() == {"running": 0, "waiting": 0}


def test_short_request_finishes_while_long_one_runs(engine) -> None:
    order: list[str] = []

    async def one(rid: str, n: int, delay: float) -> None:
        await asyncio.sleep(delay)
        await _run(engine, _ids(engine, "Count from 1 to 100."), SamplingParams(max_tokens=n, temperature=0), rid)
        order.append(rid)

    async def main():
        await asyncio.gather(one("long", 64, 0.0), one("short", 4, 0.3))

    asyncio.run(main())
    assert order == ["short", "long"]


def test_length_and_stop_string_and_usage(engine) -> None:
    ids = _ids(engine, "Count from 1 to 20, separated by commas.")
    tokens, text, finish, last = asyncio.run(_run(engine, ids, SamplingParams(max_tokens=5, temperature=0), "len"))
    assert finish == "length" and len(tokens) == 5 and last.completion_tokens == 5
    assert last.prompt_tokens == len(ids)
    full = asyncio.run(_run(engine, ids, SamplingParams(max_tokens=40, temperature=0), "full"))[1]
    assert len(full) > 10, full
    stop = full[len(full) // 2: len(full) // 2 + 3]  # a string the greedy output will reach
    _, text, finish, _ = asyncio.run(_run(engine, ids, SamplingParams(max_tokens=40, temperature=0, stop=[stop]), "stop"))
    assert finish == "stop"
    assert text == full[:full.find(stop)]


def test_abandoned_stream_frees_its_slot(engine) -> None:
    async def main():
        gen = engine.generate(_ids(engine, "Tell me a long story."), SamplingParams(max_tokens=200, temperature=0), "gone")
        await gen.__anext__()
        assert engine.stats()["running"] == 1
        await gen.aclose()  # what a disconnecting client does
        for _ in range(100):
            if engine.stats()["running"] == 0:
                return True
            await asyncio.sleep(0.05)
        return False

    assert asyncio.run(main())


def test_seeded_sampling_is_reproducible(engine) -> None:
    ids = _ids(engine, "Write a random word.")
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=123)
    a = asyncio.run(_run(engine, ids, params, "s1"))[0]
    b = asyncio.run(_run(engine, ids, params, "s2"))[0]
    assert a == b
