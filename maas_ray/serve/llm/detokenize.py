"""Incremental detokenisation with stop strings, shared by every engine backend.

Decoding the whole completion at every step costs O(n²) over a long answer;
re-decoding only a short window of recent tokens costs O(1) per step. The
window trick (vLLM's prefix/read offsets): decode ``tokens[prefix:]`` and
``tokens[prefix:read]`` and emit the difference. Byte-level BPE pieces that
only form a character together (emoji, CJK) decode to U+FFFD until complete
and are held back until then; tokenisers that drop a leading space at the
start of a decode see the same start in both decodes, so the difference is
right.
"""

from __future__ import annotations

from typing import Any, Protocol

_INCOMPLETE = "\ufffd"  # what a decoder returns for a partial UTF-8 sequence


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class TextStream:
    """Turns a completion's tokens into text deltas that respect stop strings.

    ``push`` each generated token (not the EOS / stop token), then ``take`` the
    text that is safe to send: it never ends in half a character or in the
    beginning of a stop string, and it stops right before a stop string.
    """

    def __init__(self, tokenizer: Decoder | Any, stop: list[str] | None = None) -> None:
        self._tok = tokenizer
        self._stop = [s for s in (stop or []) if s]
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens before this index are already in ``text``
        self.text = ""  # everything decoded so far (complete characters only)
        self._sent = 0  # characters of ``text`` already handed out
        self.stopped = False

    def push(self, token_id: int) -> None:
        """Add one generated token and decode whatever it completes."""
        self._ids.append(token_id)
        self._decode(final=False)

    def take(self, final: bool = False) -> str:
        """The next safe text delta; ``final`` flushes everything held back.

        Sets :attr:`stopped` (and drops the rest) when a stop string appears.
        """
        if self.stopped:
            return ""
        if final:
            self._decode(final=True)
        if self._stop:
            # A stop string may straddle what was sent and what is new.
            start = max(0, self._sent - self._longest_stop + 1)
            hits = [i for s in self._stop if (i := self.text.find(s, start)) != -1]
            if hits:
                self.stopped = True
                return self._emit(max(min(hits), self._sent))
        end = len(self.text) if final else len(self.text) - _partial_stop(self.text, self._stop)
        return self._emit(max(end, self._sent))

    def _emit(self, end: int) -> str:
        delta = self.text[self._sent:end]
        self._sent = end
        return delta

    def _decode(self, final: bool) -> None:
        if self._read == len(self._ids):
            return
        window = self._ids[self._prefix:]
        before = self._tok.decode(self._ids[self._prefix:self._read], skip_special_tokens=True)
        after = self._tok.decode(window, skip_special_tokens=True)
        if (len(after) > len(before) and not after.endswith(_INCOMPLETE)) or final:
            self.text += after[len(before):]
            # The next window starts at this one's read point: a character
            # boundary, rendered at the start of both decodes alike.
            self._prefix, self._read = self._read, len(self._ids)

def _partial_stop(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
