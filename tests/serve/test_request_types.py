"""What crosses the Ray hop between the ingress and a model replica is typed: the request
model builds a frozen ``SamplingParams``, the replica admits it against the prompt, and
input the model cannot take comes back as an ``APIError`` that pickles whole. No Ray."""

from __future__ import annotations

import asyncio
import dataclasses
import pickle

import pytest
from pydantic import ValidationError

from maas_ray.serve.errors import APIError, error_body
from maas_ray.serve.llm_server import DEFAULT_MAX_TOKENS, GenerateOptions, PromptTooLong, admit
from maas_ray.serve.openai import protocol as p


class WordEngine:
    """An engine's admission surface: one token per word, a 32-token context."""

    context_length = 32
    max_prompt_chars = 32 * 20

    def encode(self, text: str) -> list[int]:
        return [len(w) for w in text.split()]

    def apply_chat_template(self, messages, add_generation_prompt=True, tools=None) -> list[int]:
        return self.encode(" ".join(m["content"] for m in messages) + " <assistant>")


def chat(**fields) -> p.ChatCompletionRequest:
    return p.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi there"}],
                                   **fields)


def test_api_error_pickles_with_every_field() -> None:
    err = APIError(429, "over budget", "input", "insufficient_quota", {"Retry-After": "7"})
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is APIError
    assert (back.status, back.message, back.param, back.code, back.headers) == (
        429, "over budget", "input", "insufficient_quota", {"Retry-After": "7"})
    short = pickle.loads(pickle.dumps(PromptTooLong("too long", "messages")))
    assert (short.status, short.param, short.code) == (400, "messages", "context_length_exceeded")


def test_one_error_body_per_protocol() -> None:
    assert error_body("/v2/models/m/infer", 400, "bad shape") == {"error": "bad shape"}
    assert error_body("/v1/chat/completions", 429, "slow down", None, "rate_limited") == {
        "error": {"message": "slow down", "type": "rate_limit_error", "param": None,
                  "code": "rate_limited"}}


def test_the_request_model_builds_frozen_sampling_params() -> None:
    req = chat(temperature=0.5, top_p=0.9, seed=10, stop=["\n"], logprobs=True, top_logprobs=3,
               max_completion_tokens=7, n=2)
    first, second = req.sampling_params(0, "start: /x/"), req.sampling_params(1)
    assert (first.max_tokens, first.temperature, first.top_p, first.stop, first.seed,
            first.logprobs, first.grammar) == (7, 0.5, 0.9, ["\n"], 10, 3, "start: /x/")
    assert second.seed == 11 and second.grammar is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.max_tokens = 8  # type: ignore[misc]
    assert chat().sampling_params().max_tokens is None  # resolved by the server from the prompt


def test_a_stop_string_too_long_is_refused_by_the_request_model() -> None:
    with pytest.raises(ValidationError, match="at most 4096 characters"):
        chat(stop=["x" * 4097])


def test_admit_fits_max_tokens_to_the_context_and_the_budget() -> None:
    engine, prompt = WordEngine(), [{"role": "user", "content": "a b c"}]
    ids, fitted = asyncio.run(admit(engine, "m", prompt, chat().sampling_params()))
    assert len(ids) == 4 and fitted.max_tokens == min(DEFAULT_MAX_TOKENS, 32 - 4)
    # a daily budget of 20 tokens left, shared by 2 choices: (20 - 4) // 2 each
    _, cut = asyncio.run(admit(engine, "m", prompt, chat(max_tokens=20).sampling_params(),
                               tokens_left=20, choices=2))
    assert cut.max_tokens == 8
    with pytest.raises(APIError) as over:
        asyncio.run(admit(engine, "m", prompt, chat().sampling_params(), tokens_left=4))
    assert over.value.status == 429 and over.value.code == "insufficient_quota"
    assert int(over.value.headers["Retry-After"]) > 0
    with pytest.raises(APIError) as big:
        asyncio.run(admit(engine, "m", prompt, chat(max_tokens=29).sampling_params()))
    assert (big.value.status, big.value.param) == (400, "max_tokens")
    with pytest.raises(APIError) as full:
        asyncio.run(admit(engine, "m", [{"role": "user", "content": "w " * 40}], chat().sampling_params()))
    assert (full.value.status, full.value.param, full.value.code) == (
        400, "messages", "context_length_exceeded")


def test_generate_options_cross_the_hop_whole() -> None:
    options = GenerateOptions(group="req-1", stream=True, tokens_left=100, choices=2,
                              tools=[{"type": "function", "function": {"name": "f"}}])
    assert pickle.loads(pickle.dumps(options)) == options
