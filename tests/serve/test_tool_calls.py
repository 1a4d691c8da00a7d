"""Tool calling through the official ``openai`` SDK against the running app, on both engines,
streamed and not (issue 16, item 2): forced calls fit their function's parameters (constrained
decoding), stream as OpenAI streams them, and a tool's result goes back for the model to
continue. SmolLM2's template has no tool format, so this runs the generic one."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

FORECAST = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_forecast", "description": "Weather forecast for a city.",
                                      "parameters": FORECAST}},
    {"type": "function", "function": {"name": "get_time", "description": "The local time in a city.",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
]
ASK = [{"role": "user", "content": "What will the weather be in Paris for the next 3 days?"}]
NAMED = {"type": "function", "function": {"name": "get_forecast"}}
# A call is ~45 tokens here: the tags and name (~20), the arguments, the close; room to spare.
MAX_TOKENS = 96


def test_named_tool_call_round_trip(client: openai.OpenAI, model: str) -> None:
    first = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice=NAMED,
                                           temperature=0, max_tokens=MAX_TOKENS)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id and call.type == "function" and call.function.name == "get_forecast"
    jsonschema.validate(json.loads(call.function.arguments), FORECAST)

    # The client runs the tool and sends its result back; the model answers in words.
    history = [*ASK, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": ["sun", "rain", "sun"]}'}]
    second = client.chat.completions.create(model=model, messages=history, tools=TOOLS, tool_choice="none",
                                            temperature=0, max_tokens=12)
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls
    # The call and its result are in the prompt: longer than the question alone under the same
    # tool_choice ("none" leaves the tools' descriptions out, so `first` is no baseline).
    alone = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="none",
                                           temperature=0, max_tokens=1)
    assert second.usage.prompt_tokens > alone.usage.prompt_tokens + 20

    # "auto": words or calls, and a call is always well-formed.
    auto = client.chat.completions.create(model=model, messages=history, tools=TOOLS, temperature=0,
                                          max_tokens=MAX_TOKENS).choices[0]
    if auto.message.tool_calls:
        assert auto.finish_reason == "tool_calls"
        for c in auto.message.tool_calls:
            assert c.function.name in {"get_forecast", "get_time"} and isinstance(json.loads(c.function.arguments), dict)
    else:
        assert auto.message.content and auto.finish_reason in ("stop", "length")


def test_required_tool_call_streams_name_then_arguments(client: openai.OpenAI, model: str) -> None:
    deltas, finish = [], None
    for chunk in client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required",
                                                parallel_tool_calls=False, temperature=0, max_tokens=MAX_TOKENS,
                                                stream=True):
        for c in chunk.choices:
            deltas += c.delta.tool_calls or []
            assert not c.delta.content
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and len(deltas) > 2
    head, rest = deltas[0], deltas[1:]
    assert head.index == 0 and head.id and head.function.name in {"get_forecast", "get_time"}
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in rest)
    arguments = "".join(d.function.arguments for d in deltas)
    schema = FORECAST if head.function.name == "get_forecast" else TOOLS[1]["function"]["parameters"]
    jsonschema.validate(json.loads(arguments), schema)


def test_tool_choice_must_name_a_tool(client: openai.OpenAI, model: str) -> None:
    other = {"type": "function", "function": {"name": "book_flight"}}
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice=other, max_tokens=4)
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=ASK, tools=bad, tool_choice="required", max_tokens=4)
    assert info.value.body["param"] == "tools" and "not" in info.value.body["message"]
