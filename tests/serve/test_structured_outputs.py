"""``response_format`` (json_object, json_schema) through the official ``openai`` SDK against the
running app, on both engines, streamed and not (issue 16, item 1). The 135M model left alone
writes prose; every answer here must still parse and fit the schema, because the engines mask
every token the schema's grammar does not allow (llguidance)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

# Nested object, array, enum, required fields. Strings and arrays are bounded and numbers are
# small integers so a complete answer fits MAX_TOKENS (past it the JSON is cut: "length").
CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "country": {"enum": ["France", "Italy", "Spain"]},
        "rivers": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 2},
        "location": {"type": "object", "properties": {"lat": {"type": "integer", "minimum": -90, "maximum": 90},
                                                      "lon": {"type": "integer", "minimum": -180, "maximum": 180}},
                     "required": ["lat", "lon"], "additionalProperties": False},
    },
    "required": ["city", "country", "rivers", "location"],
    "additionalProperties": False,
}
MAX_TOKENS = 96
ASK = [{"role": "user", "content": "Describe Paris as JSON."}]


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}


def test_json_schema_output_fits_streamed_and_not(client: openai.OpenAI, model: str) -> None:
    fmt = _schema_format(CITY)
    greedy = client.chat.completions.create(model=model, messages=ASK, temperature=0, max_tokens=MAX_TOKENS,
                                            response_format=fmt)
    assert greedy.choices[0].finish_reason == "stop", greedy.choices[0].message.content
    jsonschema.validate(json.loads(greedy.choices[0].message.content), CITY)

    # Sampled at temperature 1 (the model's own distribution, most of it prose) and streamed.
    parts, finish = [], None
    for chunk in client.chat.completions.create(model=model, messages=ASK, temperature=1, seed=7,
                                                max_tokens=MAX_TOKENS, response_format=fmt, stream=True):
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert finish == "stop", "".join(parts)
    jsonschema.validate(json.loads("".join(parts)), CITY)


def test_json_object_on_chat_and_completions(client: openai.OpenAI, model: str) -> None:
    fmt = {"type": "json_object"}
    chat = client.chat.completions.create(model=model, messages=ASK, temperature=0, max_tokens=MAX_TOKENS,
                                          response_format=fmt)
    choice = chat.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:  # an open object may outrun the budget: then it is cut, as OpenAI cuts it
        assert choice.finish_reason == "length" and choice.message.content.startswith("{")

    # Completions, with the schema, streamed; a budget too small for the object ends "length".
    text, finish = "", None
    for chunk in client.completions.create(model=model, prompt="Paris:", temperature=0, max_tokens=MAX_TOKENS,
                                           stream=True, extra_body={"response_format": _schema_format(CITY)}):
        text += chunk.choices[0].text if chunk.choices else ""
        finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
    assert finish == "stop", text
    jsonschema.validate(json.loads(text), CITY)
    cut = client.completions.create(model=model, prompt="Paris:", max_tokens=3,
                                    extra_body={"response_format": _schema_format(CITY)})
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].text.startswith("{")


def test_unsupported_schema_feature_is_a_400_naming_it(client: openai.OpenAI, model: str) -> None:
    schema = {"type": "array", "items": {"type": "string"}, "uniqueItems": True}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=ASK, max_tokens=4,
                                       response_format=_schema_format(schema))
    assert info.value.body["param"] == "response_format" and "uniqueItems" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError):  # json_schema without its schema
        client.chat.completions.create(model=model, messages=ASK, max_tokens=4,
                                       response_format={"type": "json_schema"})
