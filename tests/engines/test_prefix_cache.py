"""Prefix caching on both engines (no Ray): greedy output with and without a cached prefix,
hits and reused tokens in the engine's figures, only the common part of a diverging prompt
reused, least recently used entries evicted under the size bound; the LRU bookkeeping alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from maas_ray.engines import SamplingParams, TransformersEngine
from maas_ray.engines.prefix_cache import MIN_REUSE_TOKENS, PrefixCache, common_prefix
from maas_ray.engines.transformers_engine import PREFIX_LOGIT_TOLERANCE

CHAT = "smollm2-135m-instruct"
RULES = " ".join(f"Rule {i}: when asked about item {i}, answer in one short sentence." for i in range(1, 13))


def system(topic: str) -> str:
    """A ~250-token system prompt; prompts for different topics share < 10 tokens."""
    return f"You answer questions about {topic}. {RULES}"


@pytest.fixture(scope="module", params=["transformers", "llama.cpp"])
def engine(request, llm_dirs: dict[str, str]):
    folder = Path(llm_dirs[CHAT])
    if request.param == "transformers":
        eng = TransformersEngine(folder, max_batch_size=4)
    else:
        pytest.importorskip("llama_cpp", reason="llama.cpp engine not installed (make install LLAMACPP=0)")
        from maas_ray.engines import LlamaCppEngine

        eng = LlamaCppEngine(folder / "model.gguf", tokenizer_dir=folder, max_batch_size=4, self_check=False)
    with eng:
        yield eng


def _prompt(engine, topic: str, question: str) -> list[int]:
    return engine.apply_chat_template([{"role": "system", "content": system(topic)},
                                       {"role": "user", "content": question}])


def _generate(engine, ids: list[int], rid: str, max_tokens: int = 8) -> tuple[list[int], list]:
    """Greedy tokens and their logprobs (top 2), once the request's KV is cached (or not kept)."""
    async def main() -> tuple[list[int], list]:
        tokens, logprobs = [], []
        async for chunk in engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=2), rid):
            tokens += chunk.token_ids
            logprobs += chunk.logprobs or []
        # Its cells go to the cache on the scheduler thread just after its last chunk; the
        # cache's stats are read there too, after that.
        return tokens, logprobs

    return asyncio.run(main())


def _stats(engine) -> dict[str, int]:
    return engine.prefix_cache_stats()


def test_greedy_output_is_the_same_with_and_without_a_cached_prefix(engine) -> None:
    a = _prompt(engine, "a shop", "What is rule 3?")
    b = _prompt(engine, "a shop", "Which rule is about item 7?")
    engine.reset_prefix_cache()
    cold, cold_lp = _generate(engine, b, "cold")  # empty cache: the whole prompt is prefilled
    engine.reset_prefix_cache()
    _generate(engine, a, "a")
    before = _stats(engine)
    warm, warm_lp = _generate(engine, b, "warm")
    after = _stats(engine)
    assert after["prefix_cache_hits"] == before["prefix_cache_hits"] + 1
    # b leaves a where the user's question starts: the system prompt and the template's
    # tokens up to there are reused, nothing past them.
    shared = common_prefix(np.array(a), np.array(b))
    assert shared >= 200
    assert after["prefix_cache_tokens_reused"] - before["prefix_cache_tokens_reused"] == shared
    # Why equal: the cached keys/values are what a full prefill computes up to rounding
    # (transformers: other GEMM shapes; llama.cpp: the same kernels and cell order, measured
    # 0.0), so no logit moves by more than PREFIX_LOGIT_TOLERANCE (a logprob by at most twice
    # that), and on these prompts every greedy token leads the runner-up by more than
    # 2 x the tolerance, so the argmax cannot change. Both are checked, so a CPU whose
    # rounding differs more fails here with the figures, not as a silent token flip.
    moved = max(abs(c.logprob - w.logprob) for c, w in zip(cold_lp, warm_lp))
    assert moved <= 2 * PREFIX_LOGIT_TOLERANCE, f"a cached prefix moved a logprob by {moved:.3g}"
    margin = min(e.top[0][1] - e.top[1][1] for e in cold_lp)
    assert margin > 4 * PREFIX_LOGIT_TOLERANCE, f"top two logits {margin:.3g} apart: a near tie"
    assert warm == cold


def test_the_next_turn_reuses_the_reply_and_a_diverging_prompt_only_the_common_part(engine) -> None:
    engine.reset_prefix_cache()
    question = "What is rule 5?"
    first = _prompt(engine, "a library", question)
    reply, _ = _generate(engine, first, "turn-1", max_tokens=12)
    history = engine.apply_chat_template([
        {"role": "system", "content": system("a library")}, {"role": "user", "content": question},
        {"role": "assistant", "content": engine.tokenizer.decode(reply, skip_special_tokens=True)},
        {"role": "user", "content": "And rule 6?"}])
    before = _stats(engine)
    _generate(engine, history, "turn-2")
    reused = _stats(engine)["prefix_cache_tokens_reused"] - before["prefix_cache_tokens_reused"]
    assert reused > len(first), "the first reply's cells should be reused too"

    # The rules change half-way: only the tokens before the change are reused.
    changed = engine.apply_chat_template([
        {"role": "system", "content": system("a library").replace("Rule 7:", "Rule seven:")},
        {"role": "user", "content": question}])
    shared = common_prefix(np.array(history), np.array(changed))
    assert MIN_REUSE_TOKENS <= shared < len(changed) - 50
    before = _stats(engine)
    _generate(engine, changed, "changed", max_tokens=2)
    assert _stats(engine)["prefix_cache_tokens_reused"] - before["prefix_cache_tokens_reused"] == shared


def test_least_recently_used_entries_go_under_the_size_bound(engine) -> None:
    engine.reset_prefix_cache()
    shop, zoo = _prompt(engine, "a shop", "What is rule 2?"), _prompt(engine, "a zoo", "What is rule 2?")
    assert common_prefix(np.array(shop), np.array(zoo)) < MIN_REUSE_TOKENS
    _generate(engine, shop, "shop")
    one = _stats(engine)[f"prefix_cache_{engine.prefix_cache.unit}"]  # bytes or cells
    capacity = engine.prefix_cache.capacity
    engine.prefix_cache.capacity = one * 3 // 2  # room for one such entry, not two (set while idle)
    try:
        before = _stats(engine)
        _generate(engine, zoo, "zoo")  # shop is the least recently used: it goes
        after = _stats(engine)
        assert after["prefix_cache_entries"] == 1
        assert after["prefix_cache_evictions"] == before["prefix_cache_evictions"] + 1
        _generate(engine, zoo, "zoo-again")  # still there
        assert _stats(engine)["prefix_cache_hits"] == after["prefix_cache_hits"] + 1
        _generate(engine, shop, "shop-again")  # gone: prefilled in full
        assert _stats(engine)["prefix_cache_hits"] == after["prefix_cache_hits"] + 1
    finally:
        engine.prefix_cache.capacity = capacity
        engine.reset_prefix_cache()


def test_prefix_cache_bookkeeping() -> None:
    freed: list[str] = []
    cache: PrefixCache[str] = PrefixCache(300, "cells", free=freed.append, min_tokens=4)
    x, y, z = list(range(100)), list(range(1000, 1100)), list(range(2000, 2100))
    for tokens, name in ((x, "x"), (y, "y")):
        assert cache.wants(tokens, 100)
        cache.put(tokens, name, 100)
    hit = cache.lookup(x[:50] + [7, 7])
    assert hit is not None and hit.entry.value == "x" and hit.n == 50
    cache.use(hit)  # x is now the most recently used
    cache.put(z, "z", 100)
    cache.put(list(range(3000, 3100)), "w", 100)  # over 300: y, the least recently used, goes
    assert freed == ["y"] and cache.evictions == 1 and cache.used == 300
    assert cache.lookup(y) is None
    assert cache.lookup(x) is not None and cache.lookup(x).n == 99  # the last token is always fed
    assert not cache.wants(x[:60], 60)  # x already holds it
    cache.put(x + [1, 2], "x+", 100)  # extends x: x goes, without counting as an eviction
    assert freed == ["y", "x"] and cache.evictions == 1 and len(cache) == 3
    assert cache.lookup(list(range(10)) + [5]) is not None  # 10 tokens >= min_tokens 4
    assert cache.lookup([0, 1, 2, 9]) is None  # 3 common tokens: too few
    assert not cache.wants(list(range(5000, 5400)), 400)  # larger than the whole cache
    cache.clear()
    assert len(cache) == 0 and cache.used == 0 and sorted(freed) == ["w", "x", "x+", "y", "z"]
    assert not PrefixCache(0, "bytes").wants(x, 1)  # 0: off
