"""Constrained decoding: a grammar decides which tokens a request may sample next.

Structured outputs (``response_format``) and forced tool calls are grammars in
llguidance's Lark dialect (``%json {schema}`` embeds a JSON schema); llguidance
(what llama.cpp and vLLM use) compiles them against the model's tokenizer and
tracks each request's position in them. Both engines use it the same way at
token-selection time: before sampling a row they set every token outside
:meth:`Constraint.allowed` to -inf, and :meth:`~.batching.BatchingEngine._accept`
feeds the chosen token back with :meth:`Constraint.consume`. When the grammar
is complete only EOS stays allowed, so the request ends with ``"stop"``; if
``max_tokens`` runs out first it ends with ``"length"`` and the text is cut
short, as OpenAI's is.

Grammars are compiled twice: once without a tokenizer where the request
arrives (:func:`compile_grammar`, cached by text), so a schema llguidance
cannot handle is refused with its own message naming the feature, and once
per engine with its tokenizer (:class:`Grammars`, cached too); each request
then starts from a copy of that compiled matcher.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

# Compact JSON with the separators models write by habit (", " and ": "): no free whitespace,
# so a small model cannot stall in endless newlines between tokens that matter.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A grammar or JSON schema llguidance cannot compile; the message says what is wrong."""


class ConstraintViolated(RuntimeError):
    """A token outside the grammar was chosen (a bug: the mask should make that impossible)."""


def json_schema(schema: dict[str, Any] | None) -> str:
    """``%json`` of ``schema`` with :data:`JSON_STYLE` (None: any JSON object)."""
    body = dict(schema) if schema is not None else {"type": "object"}
    body["x-guidance"] = JSON_STYLE  # ours, whatever the client put there
    return "%json " + json.dumps(body)  # key order kept: properties are generated in schema order


def json_grammar(schema: dict[str, Any] | None) -> str:
    """A Lark grammar for one JSON value fitting ``schema`` (None: any JSON object)."""
    return "start: " + json_schema(schema)


@functools.lru_cache(maxsize=256)
def compile_grammar(lark: str) -> str:
    """llguidance's serialised grammar for ``lark``, checked; :class:`GrammarError` if it does
    not compile. Cached by text: the same schema arrives with every request of a client."""
    from llguidance import LLMatcher

    grammar = LLMatcher.grammar_from_lark(lark)
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise GrammarError(_what_failed(error))
    return grammar


def _what_failed(error: str) -> str:
    """llguidance's message without its position in and excerpt of the Lark text, which the
    client never wrote: 'failed to compile JSON schema: Unimplemented keys: ["uniqueItems"]'."""
    message = re.split(r"\n\s*\d+ \| ", error, maxsplit=1)[0]
    message = re.sub(r"^at \d+\(\d+\): ", "", message.strip())
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


class Constraint:
    """One request's position in its grammar."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self._words = np.zeros((vocab_size + 31) // 32, dtype=np.int32)  # llguidance's bitmask

    def allowed(self, width: int) -> np.ndarray:
        """Which of ``width`` token ids may come next, as a bool array (width,)."""
        self._matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        bits = np.unpackbits(self._words.view(np.uint8), bitorder="little").astype(bool)
        if bits.size < width:  # logits wider than the tokenizer's vocabulary: padding ids stay out
            bits = np.concatenate([bits, np.zeros(width - bits.size, dtype=bool)])
        return bits[:width]

    def consume(self, token: int) -> None:
        """Advance past ``token``; :class:`ConstraintViolated` if the grammar does not allow it."""
        if not self._matcher.consume_token(token):
            raise ConstraintViolated(f"token {token} is outside the request's grammar: "
                                     f"{self._matcher.get_error()}")


class Grammars:
    """An engine's compiled grammars: its tokenizer as llguidance sees it (built once, ~1 s)
    and the last ``max_cached`` grammars compiled against it, each request starting from a copy."""

    def __init__(self, hf_tokenizer: Any, eos_id: int | None, max_cached: int = 64) -> None:
        import llguidance.hf

        self._tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, eos_token=eos_id)
        self.vocab_size = int(self._tokenizer.vocab_size)
        self.max_cached = max_cached
        self._matchers: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def start(self, lark: str) -> Constraint:
        """A fresh :class:`Constraint` at the start of ``lark``; :class:`GrammarError` if it
        does not compile for this tokenizer."""
        from llguidance import LLMatcher

        with self._lock:
            matcher = self._matchers.get(lark)
            if matcher is not None:
                self._matchers.move_to_end(lark)
        if matcher is None:
            matcher = LLMatcher(self._tokenizer, compile_grammar(lark), log_level=0)
            if matcher.is_error():
                raise GrammarError(matcher.get_error())
            with self._lock:
                self._matchers[lark] = matcher
                while len(self._matchers) > self.max_cached:
                    self._matchers.popitem(last=False)
        return Constraint(matcher.deep_copy(), self.vocab_size)
