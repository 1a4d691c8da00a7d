"""Tool calling on the chat API: what a request lets the model call, and its calls read back.

``tool_choice`` decides the grammar the answer is decoded under
(:func:`~maas_ray.engines.tool_format.calls_grammar`):

- ``required`` / a named function: only calls (one call of that function), so every
  answer is a call whose ``arguments`` fit the function's ``parameters``;
- ``auto`` (the default with tools): free text (or the ``response_format``'s JSON), or
  calls — a model may answer in words, but once its answer begins with ``<tool_call>``
  the call must be complete and fit its schema;
- ``none``: no tools in the prompt and no grammar.

:class:`ToolCallReader` turns the model's text into OpenAI's message: ``tool_calls``
with ids (``finish_reason: "tool_calls"``), streamed as OpenAI streams them — per
call a delta with its index, id and name, then fragments of its arguments. The
grammar fixes the text around the arguments, so the reader splits it on those
fixed strings; it never parses JSON.
"""

from __future__ import annotations

import uuid
from typing import Any

from maas_ray.engines.tool_format import (ARGUMENTS_PREFIX, CALL_CLOSE, CALL_SEPARATOR, FREE_TEXT,
                                          NAME_PREFIX, calls_grammar)
from maas_ray.serve.openai import protocol as p

CALL_TAG = NAME_PREFIX.split("\n")[0]  # "<tool_call>"


def prompt_tools(req: p.ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """The tools the prompt shows the model (none with ``tool_choice: "none"``)."""
    if req.tool_mode() == "none":
        return None
    return [t.model_dump(exclude_none=True, include={"type", "function"}) for t in req.tools or []]


def tools_grammar(req: p.ChatCompletionRequest, answer: str | None) -> str | None:
    """The answer's grammar when tools may be called (None with ``tool_choice: "none"``);
    ``answer``: a ``%json`` expression the non-call answer must fit (None: free text)."""
    mode = req.tool_mode()
    if mode == "none":
        return None
    functions = [t.function for t in req.tools or []]
    if mode == "named":
        functions = [f for f in functions if f.name == req.tool_choice.function.name]  # type: ignore[union-attr]
    free = None if mode in ("required", "named") else (answer or FREE_TEXT)
    # A named function is called once, as vLLM does: allowed to repeat it, a small greedy
    # model calls it again and again until max_tokens.
    return calls_grammar([{"name": f.name, "parameters": f.parameters} for f in functions], free,
                         req.parallel_tool_calls and mode != "named")


class ToolCallReader:
    """One choice's text, fed as it streams, as OpenAI deltas: ``{"content"}`` or
    ``{"tool_calls": [{"index", ...}]}``. :attr:`calls` holds the calls read so far."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.content: list[str] = []
        self._buf = ""
        self._state = "start"  # start | text | name | arguments | close | between

    def feed(self, text: str, final: bool = False) -> list[dict[str, Any]]:
        """Deltas for ``text``; ``final``: nothing follows, send what is held back."""
        self._buf += text
        out: list[dict[str, Any]] = []
        while (delta := self._next(final)) is not None:
            out.append(delta)
        if final and self._buf:  # a call cut short (finish_reason "length"): its text as content
            if self._state == "arguments":
                out.append(self._arguments(self._buf))
            else:
                out.append(self._text(self._buf))
            self._buf = ""
        return out

    def message(self) -> dict[str, Any]:
        """The whole answer as an assistant message."""
        content = "".join(self.content)
        msg: dict[str, Any] = {"role": "assistant", "content": content if content or not self.calls else None}
        if self.calls:
            msg["tool_calls"] = self.calls
        return msg

    def finish_reason(self, finish: str) -> str:
        """OpenAI's finish_reason: "tool_calls" for an answer that ended after its calls."""
        return "tool_calls" if finish == "stop" and self.calls else finish

    def _next(self, final: bool) -> dict[str, Any] | None:
        """One delta from the buffer, or None when it needs more text."""
        buf, state = self._buf, self._state
        if state == "start":
            head = buf.lstrip()
            if head.startswith(CALL_TAG):
                self._buf, self._state = head, "name"
                return self._next(final)
            if not final and CALL_TAG.startswith(head):
                return None
            self._state = "text"
            return self._next(final)
        if state == "text":
            self._buf = ""
            return self._text(buf) if buf else None
        if state == "name":
            end = buf.find(ARGUMENTS_PREFIX, len(NAME_PREFIX))
            if not buf.startswith(NAME_PREFIX[:len(buf)]) or end < 0:
                return None
            call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                    "function": {"name": buf[len(NAME_PREFIX):end], "arguments": ""}}
            self.calls.append(call)
            self._buf, self._state = buf[end + len(ARGUMENTS_PREFIX):], "arguments"
            return {"tool_calls": [{"index": len(self.calls) - 1, **call,
                                    "function": dict(call["function"])}]}
        if state == "arguments":
            # Compact JSON has no raw newline: the first one begins CALL_CLOSE ("}\n</tool_call>"),
            # whose "}" closes the call object. Until it comes, hold back one character.
            newline = buf.find("\n")
            cut = len(buf) - 1 if newline < 0 else newline - 1
            if newline >= 0:
                self._state = "close"
            self._buf = buf[cut:]
            return self._arguments(buf[:cut]) if cut > 0 else (self._next(final) if newline >= 0 else None)
        if state == "close":
            if len(buf) < len(CALL_CLOSE) or not buf.startswith(CALL_CLOSE):
                return None
            self._buf, self._state = buf[len(CALL_CLOSE):], "between"
            return self._next(final)
        # between calls: another one, or the end
        nxt = CALL_SEPARATOR + CALL_TAG
        if buf.startswith(nxt):
            self._buf, self._state = buf[len(CALL_SEPARATOR):], "name"
            return self._next(final)
        if not final and nxt.startswith(buf):
            return None
        self._state = "text"
        return self._next(final)

    def _text(self, text: str) -> dict[str, Any]:
        self.content.append(text)
        return {"content": text}

    def _arguments(self, fragment: str) -> dict[str, Any]:
        self.calls[-1]["function"]["arguments"] += fragment
        return {"tool_calls": [{"index": len(self.calls) - 1, "function": {"arguments": fragment}}]}
