"""Stream pacing in the LLM deployment: fewer chunks, the same text, nothing held back."""

from __future__ import annotations

import asyncio

from maas_ray.engines.engine import GenerationChunk
from maas_ray.serve.llm_server import paced


async def _tokens(n: int, gap_s: float, closed: list[bool]):
    try:
        for i in range(n):
            await asyncio.sleep(gap_s)
            yield GenerationChunk(f"t{i} ", [i], "length" if i == n - 1 else None, 5, i + 1)
    finally:
        closed.append(True)


def test_chunks_are_merged_per_interval_and_the_text_is_unchanged() -> None:
    async def run() -> list[GenerationChunk]:
        return [c async for c in paced(_tokens(40, 0.005, []), 0.05)]

    out = asyncio.run(run())
    assert "".join(c.text for c in out) == "".join(f"t{i} " for i in range(40))
    assert [t for c in out for t in c.token_ids] == list(range(40))
    assert out[0].token_ids == [0]  # the first token is not held
    assert out[-1].finish_reason == "length" and out[-1].completion_tokens == 40
    assert all(c.finish_reason is None for c in out[:-1])
    assert len(out) < 40 / 2  # ~0.2 s of tokens at one chunk per 50 ms


def test_interval_zero_sends_every_token() -> None:
    async def run() -> list[GenerationChunk]:
        return [c async for c in paced(_tokens(10, 0.001, []), 0.0)]

    assert [c.token_ids for c in asyncio.run(run())] == [[i] for i in range(10)]


def test_a_consumer_that_leaves_closes_the_engine_stream_at_once() -> None:
    closed: list[bool] = []

    async def run() -> None:
        stream = paced(_tokens(1000, 0.001, closed), 0.01)
        async for _ in stream:
            break
        await stream.aclose()
        assert closed == [True]  # the engine's generator ran its finally (it cancels the sequence)

    asyncio.run(run())
