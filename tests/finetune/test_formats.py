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
