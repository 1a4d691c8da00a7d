"""Fair scheduling in the LLM engines (issue 14, item 6), on both engines in-process:
one large request cannot lock out a small one, an overall timeout frees what a
request holds, stop strings are matched in linear time, and prompts are
tokenized off the event loop (and refused untokenized when they cannot fit)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from maas_ray.engines import SamplingParams
from maas_ray.engines.detokenize import TextStream
from maas_ray.engines.engine import RequestTimeout
from maas_ray.serve.llm_server import PromptTooLong, tokenize
from tests.engines.test_llm_engine import _ids, _until  # the same helpers as the engine tests

CHAT = "smollm2-135m-instruct"
BATCH = 4  # slots per engine: a request may hold half of them, 2
KV_CELLS = 2048  # llama.cpp: a request may reserve half of them, 1024
HANG_S = 120  # only guards against a hang: a loaded 2-core CI machine decodes slowly


@pytest.fixture(scope="module", params=["transformers", "llama.cpp"])
def engine(request: pytest.FixtureRequest, llm_dirs: dict[str, str]):
    folder = Path(llm_dirs[CHAT])
    if request.param == "transformers":
        from maas_ray.engines import TransformersEngine

        eng = TransformersEngine(folder, max_batch_size=BATCH)
    else:
        pytest.importorskip("llama_cpp", reason="llama.cpp engine not installed (make install LLAMACPP=0)")
        from maas_ray.engines import LlamaCppEngine

        # The base version keeps its q8_0 GGUF as model.gguf; the batch self-check is
        # test_llamacpp.py's business, not this file's.
        eng = LlamaCppEngine(folder / "model.gguf", tokenizer_dir=folder, max_batch_size=BATCH,
                             kv_cells=KV_CELLS, self_check=False)
    with eng:
        yield eng


async def _run(engine, ids, params, rid, group=None):
    """(text, finish_reason) of one streamed request."""
    text, finish = "", None
    async for chunk in engine.generate(ids, params, rid, group=group):
        text, finish = text + chunk.text, chunk.finish_reason
    return text, finish


def _idle(engine) -> bool:
    stats = engine.stats()
    return stats["running"] == stats["waiting"] == stats.get("kv_cells_used", 0) == 0


def test_one_large_request_cannot_lock_out_a_small_one(engine) -> None:
    # n=4 choices, each with room for 700 tokens: all 4 fit the batch and, on llama.cpp,
    # two fit the KV cells; first come first served let them take everything while a
    # one-line question waited for a whole choice to finish.
    ids = _ids(engine, "Tell me a long story.")
    big = SamplingParams(max_tokens=700, temperature=0, ignore_eos=True)
    # At most half the engine per request: 2 of 4 slots; on llama.cpp also 1024 of 2048
    # cells, which one choice (~730) fits and two do not.
    cap = 1 if engine.info()["engine"] == "llama.cpp" else BATCH // 2

    async def main() -> None:
        choices = [asyncio.create_task(_run(engine, ids, big, f"big{i}", group="big")) for i in range(4)]
        try:
            assert await _until(lambda: engine.stats()["running"] == cap
                                and engine.stats()["waiting"] == 4 - cap, HANG_S), engine.stats()
            # The newcomer's group runs nothing: it goes before the big request's waiting choices.
            small = await asyncio.wait_for(
                _run(engine, _ids(engine, "Hi"), SamplingParams(max_tokens=2, temperature=0), "small"), HANG_S)
            assert small[1] == "length"
            assert not any(c.done() for c in choices), "a big choice finished before the small request"
        finally:
            for i, task in enumerate(choices):
                engine.cancel(f"big{i}")
                task.cancel()
        assert await _until(lambda: _idle(engine), HANG_S), engine.stats()

    asyncio.run(main())


def test_timeout_aborts_a_request_and_frees_what_it_held(engine) -> None:
    ids = _ids(engine, "Tell me a long story.")
    slow = SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True, timeout_s=0.5)

    async def main() -> None:
        with pytest.raises(RequestTimeout, match=r"within 0.5 s"):
            await asyncio.wait_for(_run(engine, ids, slow, "slow"), HANG_S)
        assert await _until(lambda: _idle(engine), HANG_S), engine.stats()  # slot and KV cells given back
        text, finish = await asyncio.wait_for(_run(engine, ids, SamplingParams(max_tokens=4, ignore_eos=True), "next"), HANG_S)
        assert finish == "length" and text

    asyncio.run(main())


class _Stream:
    """A model server's answer stream as the ingress sees it: the first chunk, then
    ``end`` (an exception to raise, or None: never answers again)."""

    def __init__(self, end: BaseException | None) -> None:
        self.end, self.first, self.cancelled = end, True, False

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> dict:
        if self.first:
            self.first = False
            return {"prompt_tokens": 3, "engine": None}
        if self.end is None:
            await asyncio.Event().wait()
        raise self.end

    def cancel(self) -> None:
        self.cancelled = True


def test_a_non_streaming_request_past_its_timeout_gets_504_and_its_choices_stop() -> None:
    from types import SimpleNamespace

    from maas_ray.registry import ModelVersion
    from maas_ray.serve.errors import APIError
    from maas_ray.serve.openai import protocol, serving
    from maas_ray.serve.settings import AppArgs

    def complete(ends: list[BaseException | None], settings: AppArgs) -> tuple[APIError, list[_Stream]]:
        streams, sent = [_Stream(end) for end in ends], []
        generate = SimpleNamespace(
            remote=lambda mv_id, prompt, sampling, options: sent.append(options) or streams[len(sent) - 1])
        handle = SimpleNamespace(options=lambda **_: SimpleNamespace(generate=generate))
        ctx = SimpleNamespace(handles={"llm": handle}, settings=settings, engines={})
        req = protocol.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], n=len(ends))
        mv = ModelVersion("m", 1, "file:///nowhere", {"task": "chat"})
        with pytest.raises(APIError) as err:
            asyncio.run(serving.complete(ctx, mv, req, [{"role": "user", "content": "hi"}], chat=True))
        # One group for the request's choices, and the server is told it is not a stream.
        assert len({o.group for o in sent}) == 1 and not any(o.stream for o in sent)
        return err.value, streams

    # The model server aborted choice 0 (RequestTimeout comes back through Ray as itself);
    # choice 1, still running, is stopped so its slot is freed.
    err, streams = complete([RequestTimeout("did not finish within 600 s"), None], AppArgs())
    assert (err.status, err.code) == (504, "timeout") and "llm.request_timeout_s" in err.message
    assert streams[1].cancelled
    # A replica that stops answering altogether: the ingress's own backstop.
    quick = AppArgs(request_timeout_s=0.05, llm={"request_timeout_s": 0.05})
    err, streams = complete([None], quick)
    assert err.status == 504 and streams[0].cancelled


def test_prompts_are_tokenized_off_the_event_loop(engine, monkeypatch: pytest.MonkeyPatch) -> None:
    sentence = "The quick brown fox jumps over the lazy dog. "
    prompt = sentence * (engine.max_prompt_chars // 2 // len(sentence))  # 80k-330k characters
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    async def main() -> list[int]:
        task = asyncio.create_task(ticker())
        try:
            return await tokenize(engine, prompt)
        finally:
            task.cancel()

    ids = asyncio.run(main())
    assert ids == engine.encode(prompt)
    assert ticks > 10, f"the event loop ran only {ticks} times while the prompt was tokenized"

    # More characters than the context can hold in any tokenization: refused untokenized.
    calls: list[str] = []
    monkeypatch.setattr(engine, "encode", lambda text: calls.append(text) or [])
    monkeypatch.setattr(engine, "apply_chat_template", lambda messages: calls.append("chat") or [])
    huge = "a" * (engine.max_prompt_chars + 1)
    with pytest.raises(PromptTooLong, match=f"{engine.context_length} tokens"):
        asyncio.run(tokenize(engine, huge))
    with pytest.raises(PromptTooLong):
        asyncio.run(tokenize(engine, [{"role": "user", "content": huge}]))
    assert calls == []


class _Counted(str):
    """A stop string that counts the characters read from it."""

    reads = 0

    def __getitem__(self, index):  # type: ignore[override]
        _Counted.reads += 1
        return str.__getitem__(self, index)


class _Pieces:
    """A 'tokenizer' whose token i is ``pieces[i]``."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces[i] for i in ids)


def test_stop_strings_are_matched_in_linear_time() -> None:
    # Four 4,000-character stops (periodic, the KMP worst case) and ~100k characters of
    # text with a 3,999-character near miss in it; one stop completes at the very end.
    stops = [_Counted(("ab" * 2000)[:3999] + str(i)) for i in range(4)]
    filler = "x" * 50_000 + stops[2][:-1] + "Z" + "y" * 46_000
    text = filler + stops[3] + "tail"
    pieces = [text[i:i + 7] for i in range(0, len(text), 7)]  # the stop spans ~570 tokens
    stream = TextStream(_Pieces(pieces), list(stops))
    _Counted.reads = 0
    out, fed = [], 0
    for token, piece in enumerate(pieces):
        stream.push(token)
        out.append(stream.take())
        fed += len(piece)
        # Linear: a few reads per character and stop, plus each stop's table once.
        # Rescanning read ~16,000 characters of the stops per token.
        assert _Counted.reads <= 4 * fed * len(stops) + 8 * sum(map(len, stops)), (token, _Counted.reads)
        if stream.stopped:
            break
    assert stream.stopped and "".join(out) == filler  # everything before the stop, nothing of it


def test_stop_string_across_tokens_and_the_first_stop_wins() -> None:
    def run(text: str, stops: list[str], size: int) -> tuple[str, bool]:
        pieces = [text[i:i + size] for i in range(0, len(text), size)]
        stream, out = TextStream(_Pieces(pieces), stops), []
        for token in range(len(pieces)):
            stream.push(token)
            out.append(stream.take())
            if stream.stopped:
                break
        else:
            out.append(stream.take(final=True))
        return "".join(out), stream.stopped

    assert run("hello wor", ["world"], 2) == ("hello wor", False)  # a partial stop is released at the end
    assert run("say ENENDx", ["END"], 1) == ("say EN", True)  # a failed start is text, then a stop
    assert run("a<|im_end|>b", ["<|im_end|>", "|im"], 3) == ("a<", True)  # the first to complete wins
    assert run("abcd", ["bc", "abcd"], 4) == ("a", True)

    def reference(text: str, stops: list[str]) -> tuple[str, bool]:
        """The text before the stop that completes first (at a tie, the one starting first)."""
        for end in range(1, len(text) + 1):
            starts = [end - len(s) for s in stops if text[:end].endswith(s)]
            if starts:
                return text[:min(starts)], True
        return text, False

    rng = random.Random(0)
    for _ in range(300):  # small alphabets: many overlapping near misses
        text = "".join(rng.choices("abc", k=rng.randint(0, 40)))
        stops = ["".join(rng.choices("abc", k=rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
        assert run(text, stops, rng.randint(1, 5)) == reference(text, stops), (text, stops)


@pytest.mark.integration
@pytest.mark.e2e
def test_the_app_takes_grouped_choices_and_refuses_oversized_stops(serve_url: str, llm_dirs) -> None:
    import httpx

    url = f"{serve_url}/v1/chat/completions"
    body = {"model": CHAT, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}
    with httpx.Client(timeout=300) as http:
        # n choices go to the engine as one group, with the overall timeout (not a stream).
        answer = http.post(url, json={**body, "n": 2})
        assert answer.status_code == 200, answer.text
        assert [c["finish_reason"] for c in answer.json()["choices"]] == ["length", "length"]
        # A stop string longer than any useful one is refused before any work.
        refused = http.post(url, json={**body, "stop": ["x" * 5000]})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    # (The model server's own check says "at most 4096 characters"; a schema bound may answer first.)
    assert "stop" in (error["param"] or "") and "4096" in error["message"], error
