"""The continuous-batching engine in-process (no Ray): exact greedy output while
requests join and leave, stops and usage, freed slots, seeded sampling."""

from __future__ import annotations

import asyncio

import pytest
import torch

from maas_ray.engines import EngineClosed, SamplingParams, TransformersEngine
from maas_ray.engines.detokenize import TextStream
from maas_ray.engines.kv_batch import left_pad
from maas_ray.engines.transformers_engine import PREFILL_LOGIT_TOLERANCE

CHAT = "smollm2-135m-instruct"
# Different prompt lengths, so rows are left-padded differently in the batch.
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Count from 1 to 20.",
           "Hi", "Explain gravity in one sentence to a curious child who likes football.",
           "List three colors.", "What is 2+2?", "Name a famous scientist.", "Tell me a joke about cats."]
MAX_TOKENS = [24, 16, 20, 24, 16, 20, 24, 16, 20]
# Sixteen arrivals at once, one prefill forward: PROMPTS and seven more, all lengths.
BURST = PROMPTS + ["Why is the sky blue?", "Translate 'good morning' into French.", "Say yes.",
                   "What do bees make?", "Give me one word that rhymes with moon.",
                   "Describe a sunset over the mountains in two short sentences.", "Spell cat."]


@pytest.fixture(scope="module")
def engine(llm_dirs: dict[str, str]):
    with TransformersEngine(llm_dirs[CHAT], max_batch_size=16) as eng:
        yield eng


@pytest.fixture(scope="module")
def hf_model(llm_dirs: dict[str, str]):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llm_dirs[CHAT]).eval()


@pytest.fixture(scope="module")
def reference(hf_model):
    """In-process ``model.generate(do_sample=False)``, one prompt at a time."""
    def generate(ids: list[int], n: int) -> list[int]:
        with torch.inference_mode():
            prompt = torch.tensor([ids])
            out = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                 do_sample=False)
        return out[0, len(ids):].tolist()

    return generate


async def _run(engine, ids, params, rid, delay_s: float = 0.0):
    """(tokens, text, finish_reason, last chunk) of one streamed request."""
    await asyncio.sleep(delay_s)
    tokens, text, last = [], "", None
    async for chunk in engine.generate(ids, params, rid):
        tokens += chunk.token_ids
        text += chunk.text
        last = chunk
    return tokens, text, last.finish_reason, last


def _ids(engine, prompt: str) -> list[int]:
    return engine.apply_chat_template([{"role": "user", "content": prompt}])


async def _until(predicate, timeout_s: float = 10.0) -> bool:
    for _ in range(int(timeout_s / 0.02)):
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


def test_greedy_equals_generate_alone_and_with_8_others(engine, reference) -> None:
    ids = [_ids(engine, p) for p in PROMPTS]
    assert len({len(i) for i in ids}) > 5, "prompts should differ in length"
    expected = [reference(i, n) for i, n in zip(ids, MAX_TOKENS)]
    greedy = [SamplingParams(max_tokens=n, temperature=0) for n in MAX_TOKENS]

    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, engine.stats()["running"])
            await asyncio.sleep(0.01)

    async def main():
        alone = await _run(engine, ids[0], greedy[0], "alone")
        watcher = asyncio.create_task(watch())
        # Staggered arrivals: later requests join a batch that is already decoding.
        together = await asyncio.gather(*[
            _run(engine, i, p, f"r{j}", delay_s=0.05 * j) for j, (i, p) in enumerate(zip(ids, greedy))])
        watcher.cancel()
        return alone, together

    alone, together = asyncio.run(main())
    assert peak >= 8, f"only {peak} requests ran together"
    assert alone[0] == expected[0]
    assert "Paris" in alone[1], alone[1]  # the GGUF → safetensors conversion kept the model sane
    for j, (got, want) in enumerate(zip(together, expected)):
        assert got[0] == want, f"request {j} diverged: {got[0]} vs {want}"
        assert got[3].completion_tokens == len(want) and got[3].prompt_tokens == len(ids[j])
        assert got[2] == ("stop" if want[-1] in engine.eos_ids else "length")
    # The engine thread retires finished sequences right after their last chunk.
    assert asyncio.run(_until(lambda: engine.stats() == {"running": 0, "waiting": 0})), engine.stats()


def test_padded_prefill_stays_within_its_stated_tolerance(engine, hf_model) -> None:
    """The prefill the engine runs for arrivals together (:func:`left_pad`'s inputs in one
    forward) against each prompt's own prefill: the bound the transformers engine's module doc states, which is what makes
    greedy tokens equal wherever the top two logits are further apart than twice it."""
    prompts = [_ids(engine, p) for p in BURST]
    with torch.inference_mode():
        alone = torch.cat([hf_model(input_ids=torch.tensor([p]), logits_to_keep=1).logits[:, -1]
                           for p in prompts])  # (16, V)
        ids, mask, positions = left_pad(prompts, torch.device("cpu"))
        together = hf_model(input_ids=ids, attention_mask=mask, position_ids=positions,
                            logits_to_keep=1).logits[:, -1]
    assert torch.isfinite(together).all()
    drift = float((together - alone).abs().max())
    assert drift < PREFILL_LOGIT_TOLERANCE, drift
    top2 = alone.topk(2).values
    assert ((top2[:, 0] - top2[:, 1]) > 2 * drift).all()  # so the first tokens agree, as below
    assert together.argmax(dim=1).tolist() == alone.argmax(dim=1).tolist()


def test_sixteen_simultaneous_arrivals_of_different_lengths_equal_generate(engine, reference) -> None:
    ids = [_ids(engine, p) for p in BURST]
    assert len({len(i) for i in ids}) >= 8, "prompts should differ in length"
    expected = [reference(i, 8) for i in ids]
    greedy = SamplingParams(max_tokens=8, temperature=0)

    prefills: list[int] = []  # rows of each prefill forward (decode steps feed 1 token a row)
    hook = engine.model.register_forward_pre_hook(
        lambda _m, _a, kw: prefills.append(len(kw["input_ids"])) if kw["input_ids"].shape[1] > 1 else None,
        with_kwargs=True)

    async def main():
        return await asyncio.gather(*[_run(engine, i, greedy, f"burst{j}") for j, i in enumerate(ids)])

    try:
        results = asyncio.run(main())
    finally:
        hook.remove()
    # The scheduler may wake for the first arrival alone; the rest wait for one forward.
    assert sum(prefills) == 16 and max(prefills) >= 8, prefills
    for j, (got, want) in enumerate(zip(results, expected)):
        assert got[0] == want, f"request {j} diverged: {got[0]} vs {want}"


def test_short_request_finishes_while_long_one_runs(engine) -> None:
    order: list[str] = []
    ids = _ids(engine, "Count from 1 to 100.")

    async def one(rid: str, n: int, delay_s: float) -> None:
        await _run(engine, ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), rid, delay_s)
        order.append(rid)

    async def main():
        await asyncio.gather(one("long", 48, 0.0), one("short", 4, 0.3))

    asyncio.run(main())
    assert order == ["short", "long"]


def test_length_stop_string_stop_token_and_usage(engine) -> None:
    ids = _ids(engine, "Count from 1 to 20, separated by commas.")
    run = lambda params, rid: asyncio.run(_run(engine, ids, params, rid))  # noqa: E731

    tokens, text, finish, last = run(SamplingParams(max_tokens=5, temperature=0), "len")
    assert (finish, len(tokens), last.completion_tokens, last.prompt_tokens) == ("length", 5, 5, len(ids))
    full_tokens, full, _, _ = run(SamplingParams(max_tokens=30, temperature=0), "full")
    assert len(full) > 10, full
    assert text == engine.tokenizer.decode(tokens, skip_special_tokens=True)

    stop = full[len(full) // 2: len(full) // 2 + 3]  # a string the greedy output will reach
    tokens, text, finish, last = run(SamplingParams(max_tokens=30, temperature=0, stop=["@@", stop]), "stop")
    assert finish == "stop" and text == full[:full.find(stop)]
    assert last.completion_tokens == len(tokens) < len(full_tokens)

    third = full_tokens[2]
    tokens, text, finish, _ = run(SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[third]), "tok")
    assert finish == "stop" and tokens == full_tokens[:3]
    assert text == engine.tokenizer.decode(full_tokens[:2], skip_special_tokens=True)

    with pytest.raises(ValueError, match="context"):
        asyncio.run(_run(engine, [1] * engine.context_length, SamplingParams(max_tokens=1), "huge"))


def test_abandoned_or_cancelled_streams_free_their_slots(engine) -> None:
    ids = _ids(engine, "Tell me a long story.")
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)

    async def main() -> None:
        gen = engine.generate(ids, params, "gone")
        await gen.__anext__()
        assert engine.stats()["running"] == 1
        await gen.aclose()  # what a disconnecting client's handler does
        assert await _until(lambda: engine.stats()["running"] == 0)

        task = asyncio.create_task(_run(engine, ids, params, "task"))  # Serve cancels the task
        assert await _until(lambda: engine.stats()["running"] == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await _until(lambda: engine.stats()["running"] == 0)

        task = asyncio.create_task(_run(engine, ids, params, "by-id"))
        assert await _until(lambda: engine.stats()["running"] == 1)
        engine.cancel("by-id")
        assert await _until(lambda: engine.stats() == {"running": 0, "waiting": 0})
        task.cancel()

    asyncio.run(main())


def test_seeded_sampling_is_reproducible(engine) -> None:
    ids = _ids(engine, "Write a random word.")
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=123)
    a = asyncio.run(_run(engine, ids, params, "s1"))[0]
    b = asyncio.run(_run(engine, ids, params, "s2"))[0]
    c = asyncio.run(_run(engine, ids, SamplingParams(max_tokens=8, temperature=1.5, seed=7), "s3"))[0]
    assert a == b and a != c
    # Seeds past 64 bits (the API does not bound them) wrap instead of failing the request.
    assert asyncio.run(_run(engine, ids, SamplingParams(max_tokens=2, temperature=1.0, seed=2**70), "s4"))[0]


def test_waiting_cancel_and_close_fail_requests_in_flight(llm_dirs: dict[str, str]) -> None:
    eng = TransformersEngine(llm_dirs[CHAT], max_batch_size=1)

    async def main() -> None:
        ids = eng.apply_chat_template([{"role": "user", "content": "Hi"}])
        params = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)
        first = asyncio.create_task(_run(eng, ids, params, "a"))
        gone = asyncio.create_task(_run(eng, ids, params, "gone"))  # waits: batch size 1
        assert await _until(lambda: eng.stats() == {"running": 1, "waiting": 1})
        gone.cancel()  # leaving the line frees its place at once
        assert await _until(lambda: eng.stats() == {"running": 1, "waiting": 0})
        second = asyncio.create_task(_run(eng, ids, params, "b"))
        assert await _until(lambda: eng.stats() == {"running": 1, "waiting": 1})
        await asyncio.to_thread(eng.close)
        for task in (first, second):
            with pytest.raises(EngineClosed):
                await task
        with pytest.raises(EngineClosed):
            await _run(eng, ids, params, "c")

    asyncio.run(main())


class _Bytes:
    """A byte-level 'tokenizer': one token per UTF-8 byte, like byte-level BPE at worst."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def _stream(text: str, stop: list[str]) -> tuple[list[str], bool]:
    s, out = TextStream(_Bytes(), stop), []
    for b in text.encode():
        s.push(b)
        out.append(s.take())
        if s.stopped:
            return out, True
    out.append(s.take(final=True))
    return out, s.stopped


def test_text_stream_never_splits_characters_or_leaks_stop_strings() -> None:
    deltas, stopped = _stream("héllo 👋 wörld", [])
    assert "".join(deltas) == "héllo 👋 wörld" and not stopped
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # the 4 bytes of 👋 were held until complete

    deltas, stopped = _stream("one, two END three", ["END"])
    assert stopped and "".join(deltas) == "one, two "
    deltas, stopped = _stream("abc EN", ["END"])  # a partial stop at the end is real text
    assert not stopped and "".join(deltas) == "abc EN"
    deltas, stopped = _stream("x👋y", ["👋"])
    assert stopped and "".join(deltas) == "x"



def test_a_finished_request_no_longer_counts_as_running(llm_dirs: dict[str, str]) -> None:
    """The replica reads ``stats()`` as soon as a reply ends (the sequences gauge); the
    backend frees the row after its step, slowly here, as storing a prefix can be."""
    class SlowRemove(TransformersEngine):
        def _remove(self, rows: set[int]) -> None:
            import time
            time.sleep(1.0)
            super()._remove(rows)

    with SlowRemove(llm_dirs[CHAT], max_batch_size=2) as eng:
        ids = _ids(eng, "Say yes.")
        tokens, _, finish, _ = asyncio.run(_run(eng, ids, SamplingParams(max_tokens=3, temperature=0), "r"))
        assert finish is not None and tokens
        assert eng.stats()["running"] == 0, eng.stats()
