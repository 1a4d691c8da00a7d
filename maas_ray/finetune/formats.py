"""Fine-tuning data formats and their validation, with line numbers.

Four JSONL shapes, one per line, the same shape on every line of a file:

* ``chat``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
  (OpenAI's chat fine-tuning format; loss on assistant turns only);
* ``completion``: ``{"prompt": "...", "completion": "..."}`` (loss on the completion);
* ``classification``: ``{"text": "...", "label": "..." | int}``;
* ``preference``: ``{"input": {"messages": [...]}, "preferred_output": [{"role": "assistant",
  ...}], "non_preferred_output": [...]}`` (OpenAI's DPO format; trains with ``method: dpo``).

:func:`validate_lines` checks the shape (what an upload needs);
:func:`check_for_task` then checks that a validated file suits a base model's
task (what a job needs before it trains).

Batch API input files (purpose ``batch``) are JSONL too, one request per line;
:class:`BatchLineValidator` checks them as they upload, with the same line numbers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from maas_ray.json_depth import json_too_deep

DataFormat = Literal["chat", "completion", "classification", "preference"]
FORMATS = ("chat", "completion", "classification", "preference")
ROLES = ("system", "user", "assistant")
MAX_ERRORS = 5
# One example per line: the longest a line may be, and how deep its JSON may nest. The
# formats above nest 5 deep; a 32,768-token example is ~130 KB of text.
MAX_LINE_BYTES = 1 << 20
MAX_DEPTH = 16


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
        extra = set(row) - {"messages"}
        if extra:
            return f"unexpected field(s) {sorted(extra)} next to 'messages'"
        return _messages_error(row["messages"], "messages", ROLES) or "chat"
    if {"input", "preferred_output", "non_preferred_output"} & set(row):
        return _preference_error(row) or "preference"
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
            "'text'+'label', or 'input'+'preferred_output'+'non_preferred_output' (preference)")


def _messages_error(msgs: Any, where: str, roles: tuple[str, ...]) -> str | None:
    """What is wrong with a list of chat messages, or None."""
    if not isinstance(msgs, list) or not msgs:
        return f"'{where}' must be a non-empty list"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            return f"{where}[{i}] must be an object"
        if m.get("role") not in roles:
            return f"{where}[{i}].role must be one of {list(roles)} (got {m.get('role')!r})"
        if not isinstance(m.get("content"), str):
            return f"{where}[{i}].content must be a string"
        extra = set(m) - {"role", "content", "name", "weight"}
        if extra:
            return f"{where}[{i}] has unexpected field(s) {sorted(extra)}"
    return None


def _preference_error(row: dict[str, Any]) -> str | None:
    """OpenAI's preference example: a prompt (``input.messages``) and two assistant answers."""
    fields = ("input", "preferred_output", "non_preferred_output")
    missing = [f for f in fields if f not in row]
    if missing:
        return f"a preference example needs {', '.join(repr(f) for f in missing)}"
    if set(row) - set(fields):
        return f"unexpected field(s) {sorted(set(row) - set(fields))} in a preference example"
    prompt = row["input"]
    if not isinstance(prompt, dict) or "messages" not in prompt:
        return "'input' must be an object with 'messages'"
    if set(prompt) != {"messages"}:  # tools are not trained on: refuse rather than ignore them
        return f"'input' has unexpected field(s) {sorted(set(prompt) - {'messages'})}"
    for where, msgs, roles in (("input.messages", prompt["messages"], ROLES),
                               ("preferred_output", row["preferred_output"], ("assistant",)),
                               ("non_preferred_output", row["non_preferred_output"], ("assistant",))):
        error = _messages_error(msgs, where, roles)
        if error:
            return error
    return None


class LineValidator:
    """:func:`validate_lines` fed one chunk of bytes at a time, as an upload arrives.

    Memory is bounded whatever the file's size: one line at most :data:`MAX_LINE_BYTES`
    is held (a longer one is an error, skipped without being kept), and a line is checked
    for depth before the JSON parser recurses into it. After :data:`MAX_ERRORS` errors it
    raises at once, so a bad upload is refused before the rest of it is read.
    """

    def __init__(self) -> None:
        self._line = bytearray()  # the current line's bytes so far (a bytearray: appends are O(1))
        self._skipping = False  # inside an overlong line: drop bytes until its newline
        self._n = 0  # lines finished
        self._errors: list[str] = []
        self._fmt: str | None = None
        self._first_line = 0
        self._rows = 0
        self._labels: set[str] = set()

    def feed(self, chunk: bytes) -> None:
        start = 0
        while start < len(chunk):
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if not self._skipping:
                if len(self._line) + len(piece) > MAX_LINE_BYTES:
                    self._error(self._n + 1, f"longer than {MAX_LINE_BYTES} bytes")
                    self._line.clear()
                    self._skipping = True
                else:
                    self._line += piece
            if end < 0:
                return
            self._end_line()
            start = end + 1

    def close(self) -> FileSummary:
        """The file's summary, or :class:`DataFormatError` naming up to five bad lines."""
        if self._line or self._skipping:
            self._end_line()
        if self._errors:
            raise DataFormatError("; ".join(self._errors))
        if self._fmt is None:
            raise DataFormatError("the file has no examples")
        return FileSummary(self._fmt, self._rows, sorted(self._labels))  # type: ignore[arg-type]

    def _end_line(self) -> None:
        self._n += 1
        raw, skipped = bytes(self._line), self._skipping
        self._line.clear()
        self._skipping = False
        if skipped:
            self._rows += 1
        elif raw.strip():
            self._rows += 1
            self._check(self._n, raw)

    def _parse(self, n: int, raw: bytes) -> tuple[bool, Any]:
        """(True, the line's JSON value), or (False, None) with the error recorded."""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            self._error(n, f"not UTF-8 text ({err.reason} at byte {err.start + 1})")
            return False, None
        if json_too_deep(raw, MAX_DEPTH):
            self._error(n, f"nests deeper than {MAX_DEPTH} levels")
            return False, None
        try:
            return True, json.loads(text)
        except json.JSONDecodeError as err:
            self._error(n, f"not valid JSON ({err.msg} at column {err.colno})")
            return False, None

    def _check(self, n: int, raw: bytes) -> None:
        ok, row = self._parse(n, raw)
        if not ok:
            return
        shape = _shape(row)
        if shape not in FORMATS:
            self._error(n, shape)
        elif self._fmt is None:
            self._fmt, self._first_line = shape, n
        elif shape != self._fmt:
            self._error(n, f"a {shape} example, but line {self._first_line} is {self._fmt}: "
                        "use one format per file")
        if shape == "classification":
            self._labels.add(str(row["label"]))

    def _error(self, n: int, message: str) -> None:
        self._errors.append(f"line {n}: {message}")
        if len(self._errors) >= MAX_ERRORS:
            self._errors.append(f"(stopped after {MAX_ERRORS} errors)")
            raise DataFormatError("; ".join(self._errors))


BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
MAX_CUSTOM_ID_CHARS = 512


class BatchLineValidator(LineValidator):
    """The Batch API's input lines, as an upload arrives: ``{"custom_id", "method": "POST",
    "url", "body": {...}}``, one ``url`` per file, each ``custom_id`` once. Only the envelope
    is checked here; each ``body`` is validated as the online route validates it when the
    batch runs, and a bad one fails alone, in the batch's error file. The summary's
    ``format`` is the file's ``url``."""

    def __init__(self) -> None:
        super().__init__()
        self._ids: set[str] = set()  # bounded by the upload size limit, as the file is

    def _check(self, n: int, raw: bytes) -> None:
        ok, row = self._parse(n, raw)
        if not ok:
            return
        why = _batch_envelope(row, self._ids)
        if why:
            self._error(n, why)
            return
        self._ids.add(row["custom_id"])
        if self._fmt is None:
            self._fmt, self._first_line = row["url"], n
        elif row["url"] != self._fmt:
            self._error(n, f"url {row['url']!r}, but line {self._first_line} is {self._fmt!r}: "
                        "a batch file holds requests to one endpoint")

    def close(self) -> FileSummary:
        if self._line or self._skipping:
            self._end_line()
        if not self._errors and self._fmt is None:
            raise DataFormatError("the file has no requests")
        return super().close()


def _batch_envelope(row: Any, seen: set[str]) -> str | None:
    """What is wrong with one batch line's envelope, or None."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    extra = set(row) - {"custom_id", "method", "url", "body"}
    if extra:
        return f"unexpected field(s) {sorted(extra)}: a line is custom_id, method, url and body"
    custom_id = row.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID_CHARS:
        return f"'custom_id' must be a non-empty string of at most {MAX_CUSTOM_ID_CHARS} characters"
    if custom_id in seen:
        return f"custom_id {custom_id!r} appears twice: each request needs its own"
    if row.get("method") != "POST":
        return f"'method' must be \"POST\" (got {row.get('method')!r})"
    if row.get("url") not in BATCH_ENDPOINTS:
        return f"'url' must be one of {list(BATCH_ENDPOINTS)} (got {row.get('url')!r})"
    if not isinstance(row.get("body"), dict):
        return "'body' must be a JSON object: the request as it would be sent to the url"
    return None


def validate_lines(lines: Iterable[bytes | str]) -> FileSummary:
    """Validate JSONL line by line (streaming); raise :class:`DataFormatError`
    listing up to five bad lines (1-based), or return the file's format."""
    validator = LineValidator()
    for raw in lines:
        data = raw.encode() if isinstance(raw, str) else raw
        validator.feed(data if data.endswith(b"\n") else data + b"\n")
    return validator.close()


TASK_FORMATS: dict[str, tuple[str, ...]] = {
    "chat": ("chat", "completion"),
    "text-classification": ("classification",),
    "embedding": ("classification",),  # an encoder base fine-tunes into a classifier
}


def check_for_task(summary: FileSummary, task: str, what: str = "training file",
                   preference: bool = False) -> None:
    """Raise :class:`DataFormatError` if a file's format cannot train a ``task`` model
    (``preference``: by DPO, which needs preference pairs and a chat model)."""
    allowed = TASK_FORMATS.get(task)
    if allowed is None:
        raise DataFormatError(f"models of task {task!r} cannot be fine-tuned")
    if preference:
        if task != "chat":
            raise DataFormatError(f"DPO trains chat models, not {task} models")
        if summary.format != "preference":
            raise DataFormatError(f"{what} is in {summary.format} format, but a DPO job needs "
                                  "preference examples (input, preferred_output, non_preferred_output)")
        return
    if summary.format not in allowed:
        hint = " (preference examples train with method dpo)" if summary.format == "preference" else ""
        raise DataFormatError(f"{what} is in {summary.format} format, but a {task} base model "
                              f"needs {' or '.join(allowed)} examples{hint}")
