"""Fine-tuning data formats and their validation, with line numbers.

Three JSONL shapes, one per line, the same shape on every line of a file:

* ``chat``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
  (OpenAI's chat fine-tuning format; loss on assistant turns only);
* ``completion``: ``{"prompt": "...", "completion": "..."}`` (loss on the completion);
* ``classification``: ``{"text": "...", "label": "..." | int}``.

:func:`validate_lines` checks the shape (what an upload needs);
:func:`check_for_task` then checks that a validated file suits a base model's
task (what a job needs before it trains).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

DataFormat = Literal["chat", "completion", "classification"]
ROLES = ("system", "user", "assistant")
MAX_ERRORS = 5


class DataFormatError(ValueError):
    """A training file that cannot be used; the message names the line(s)."""


@dataclass
class FileSummary:
    format: DataFormat
    rows: int
    labels: list[str] = field(default_factory=list)


def _shape(row: Any) -> DataFormat | str:
    """The format of one parsed line, or an error message."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    if "messages" in row:
        msgs = row["messages"]
        extra = set(row) - {"messages"}
        if extra:
            return f"unexpected field(s) {sorted(extra)} next to 'messages'"
        if not isinstance(msgs, list) or not msgs:
            return "'messages' must be a non-empty list"
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                return f"messages[{i}] must be an object"
            if m.get("role") not in ROLES:
                return f"messages[{i}].role must be one of {list(ROLES)} (got {m.get('role')!r})"
            if not isinstance(m.get("content"), str):
                return f"messages[{i}].content must be a string"
            if set(m) - {"role", "content", "name", "weight"}:
                return f"messages[{i}] has unexpected field(s) {sorted(set(m) - {'role', 'content'})}"
        return "chat"
    if "prompt" in row or "completion" in row:
        if set(row) != {"prompt", "completion"}:
            return "a completion example needs exactly 'prompt' and 'completion'"
        if not isinstance(row["prompt"], str) or not isinstance(row["completion"], str):
            return "'prompt' and 'completion' must be strings"
        if not row["completion"]:
            return "'completion' is empty: nothing to learn"
        return "completion"
    if "text" in row or "label" in row:
        if set(row) != {"text", "label"}:
            return "a classification example needs exactly 'text' and 'label'"
        if not isinstance(row["text"], str) or not row["text"].strip():
            return "'text' must be a non-empty string"
        if isinstance(row["label"], bool) or not isinstance(row["label"], (str, int)):
            return "'label' must be a string or an integer"
        return "classification"
    return ("unrecognised example: expected 'messages' (chat), 'prompt'+'completion', "
            "or 'text'+'label'")


def validate_lines(lines: Iterable[bytes | str]) -> FileSummary:
    """Validate JSONL line by line (streaming); raise :class:`DataFormatError`
    listing up to five bad lines (1-based), or return the file's format."""
    errors: list[str] = []
    fmt: str | None = None
    first_line = 0
    rows = 0
    labels: set[str] = set()
    for n, raw in enumerate(lines, start=1):
        text = raw.decode("utf-8", errors="strict") if isinstance(raw, bytes) else raw
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            errors.append(f"line {n}: not valid JSON ({err.msg} at column {err.colno})")
        else:
            shape = _shape(row)
            if shape not in ("chat", "completion", "classification"):
                errors.append(f"line {n}: {shape}")
            elif fmt is None:
                fmt, first_line = shape, n
            elif shape != fmt:
                errors.append(f"line {n}: a {shape} example, but line {first_line} is {fmt}: "
                              "use one format per file")
            if shape == "classification":
                labels.add(str(row["label"]))
        rows += 1
        if len(errors) >= MAX_ERRORS:
            errors.append("(stopped after 5 errors)")
            break
    if errors:
        raise DataFormatError("; ".join(errors))
    if fmt is None:
        raise DataFormatError("the file has no examples")
    return FileSummary(fmt, rows, sorted(labels))  # type: ignore[arg-type]


TASK_FORMATS: dict[str, tuple[str, ...]] = {
    "chat": ("chat", "completion"),
    "text-classification": ("classification",),
    "embedding": ("classification",),  # an encoder base fine-tunes into a classifier
}


def check_for_task(summary: FileSummary, task: str, what: str = "training file") -> None:
    """Raise :class:`DataFormatError` if a file's format cannot train a ``task`` model."""
    allowed = TASK_FORMATS.get(task)
    if allowed is None:
        raise DataFormatError(f"models of task {task!r} cannot be fine-tuned")
    if summary.format not in allowed:
        raise DataFormatError(f"{what} is in {summary.format} format, but a {task} base model "
                              f"needs {' or '.join(allowed)} examples")
