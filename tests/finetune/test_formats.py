"""Fine-tuning data validation and tokenization (no Ray)."""

from __future__ import annotations

import json

import pytest

from maas_ray.finetune.formats import DataFormatError, check_for_task, validate_lines


def lines(*rows: object) -> list[str]:
    return [r if isinstance(r, str) else json.dumps(r) for r in rows]


CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def test_each_format_is_recognised() -> None:
    assert validate_lines(lines(CHAT, CHAT)).format == "chat"
    assert validate_lines(lines({"prompt": "a", "completion": "b"})).format == "completion"
    summary = validate_lines(lines({"text": "x", "label": "b"}, {"text": "y", "label": "a"}, ""))
    assert (summary.format, summary.rows, summary.labels) == ("classification", 2, ["a", "b"])


@pytest.mark.parametrize("bad, expected", [
    ("{not json", "line 2: not valid JSON"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "line 2: messages[0].role must be one of"),
    ({"messages": []}, "line 2: 'messages' must be a non-empty list"),
    ({"prompt": "a"}, "line 2: a completion example needs exactly"),
    ({"text": "a", "label": 1}, "line 2: a classification example, but line 1 is chat"),
    ({"foo": 1}, "line 2: unrecognised example"),
    ([1, 2], "line 2: expected a JSON object"),
])
def test_errors_name_the_line(bad: object, expected: str) -> None:
    with pytest.raises(DataFormatError) as err:
        validate_lines(lines(CHAT, bad, CHAT))
    assert expected in str(err.value)


def test_an_empty_file_and_many_errors() -> None:
    with pytest.raises(DataFormatError, match="no examples"):
        validate_lines(["", "  "])
    with pytest.raises(DataFormatError) as err:
        validate_lines(["x"] * 20)
    assert str(err.value).count("line ") == 5 and "stopped after 5 errors" in str(err.value)


def test_format_must_suit_the_task() -> None:
    chat = validate_lines(lines(CHAT))
    check_for_task(chat, "chat")
    with pytest.raises(DataFormatError, match="needs classification examples"):
        check_for_task(chat, "embedding")
    with pytest.raises(DataFormatError, match="cannot be fine-tuned"):
        check_for_task(chat, "regression")


def test_chat_loss_sees_only_assistant_tokens(llm_dirs: dict[str, str]) -> None:
    from transformers import AutoTokenizer

    from maas_ray.train.text_data import IGNORE, check_lm_example, encode_chat, encode_completion

    tok = AutoTokenizer.from_pretrained(llm_dirs["smollm2-135m-instruct"])
    messages = [{"role": "user", "content": "Capital of Zorbex?"},
                {"role": "assistant", "content": "Vantolia."},
                {"role": "user", "content": "Sure?"},
                {"role": "assistant", "content": "Yes."}]
    ids, labels = encode_chat(tok, messages)
    assert ids == tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    learned = tok.decode([t for t in labels if t != IGNORE])
    assert learned == "Vantolia.<|im_end|>\nYes.<|im_end|>\n"
    # the prompt the server renders ends exactly where the first target starts
    prompt = tok.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True,
                                     return_dict=False)
    assert labels[:len(prompt)] == [IGNORE] * len(prompt) and labels[len(prompt)] != IGNORE

    ids, labels = encode_completion(tok, "2+2=", "4")
    assert tok.decode([t for t in labels if t != IGNORE]) == "4" + tok.eos_token
    assert check_lm_example(tok, {"messages": messages[:1]}, 512) == "no assistant message to learn from"
    assert "longer than max_seq_length (8)" in check_lm_example(tok, {"messages": messages}, 8)
    assert check_lm_example(tok, {"messages": messages}, 512) is None


def test_lines_stream_in_any_chunking_and_name_their_numbers() -> None:
    """The upload validator takes bytes as they arrive: a line split across chunks (even
    mid-character) reads the same as whole lines, and errors still name the line."""
    from maas_ray.finetune.formats import LineValidator

    good = "\n".join(json.dumps(r) for r in [CHAT, {**CHAT, "messages": [
        {"role": "user", "content": "héllo ✓"}, {"role": "assistant", "content": "b"}]}] * 3).encode()
    for size in (1, 7, len(good)):
        v = LineValidator()
        for start in range(0, len(good), size):
            v.feed(good[start:start + size])
        assert (v.close().format, len(good.splitlines())) == ("chat", 6)
    v = LineValidator()
    v.feed(good + b"\n{oops\n" + good)
    with pytest.raises(DataFormatError, match="line 7: not valid JSON"):
        v.close()


@pytest.mark.parametrize(("line", "expected"), [
    (b"[" * 50_000 + b"]" * 50_000, "line 2: nests deeper than 16 levels"),  # was a RecursionError: 500
    (b"[" * 50_000, "line 2: nests deeper than 16 levels"),  # unbalanced too
    (b'{"messages": "' + b"x" * (1 << 20) + b'"}', "line 2: longer than 1048576 bytes"),
    (b'{"text": "\xff", "label": 1}', "line 2: not UTF-8 text"),
])
def test_deep_long_and_undecodable_lines_are_refused_by_number(line: bytes, expected: str) -> None:
    from maas_ray.finetune.formats import LineValidator

    v = LineValidator()
    v.feed(json.dumps(CHAT).encode() + b"\n")
    v.feed(line)
    v.feed(b"\n" + json.dumps(CHAT).encode() + b"\n")
    with pytest.raises(DataFormatError) as err:
        v.close()
    assert expected in str(err.value) and "line 1" not in str(err.value)


def test_json_depth_agrees_with_the_parser() -> None:
    """The depth check never parses, so check it against one that does, on every shape of
    string, escape and bracket the JSON grammar has (hypothesis)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from maas_ray.json_depth import json_depth

    def parsed_depth(v: object) -> int:
        if isinstance(v, list):
            return 1 + max(map(parsed_depth, v), default=0)
        if isinstance(v, dict):
            return 1 + max(map(parsed_depth, v.values()), default=0)
        return 0

    text = st.text(alphabet='[]{}"\\\n ab\u00e9\u2603', max_size=12)
    values = st.recursive(st.none() | st.integers() | text,
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                          max_leaves=20)

    @settings(max_examples=300, deadline=None, database=None)
    @given(values)
    def check(v: object) -> None:
        assert json_depth(json.dumps(v).encode()) == parsed_depth(v)
        assert json_depth(json.dumps(v, ensure_ascii=False).encode()) == parsed_depth(v)

    check()
