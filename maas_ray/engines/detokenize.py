"""Incremental detokenisation with stop strings, shared by every engine backend.

Decoding the whole completion at every step costs O(n²) over a long answer;
re-decoding only a short window of recent tokens costs O(1) per step. The
window trick (vLLM's prefix/read offsets): decode ``tokens[prefix:]`` and
``tokens[prefix:read]`` and emit the difference. Byte-level BPE pieces that
only form a character together (emoji, CJK) decode to U+FFFD until complete
and are held back until then; tokenisers that drop a leading space at the
start of a decode see the same start in both decodes, so the difference is
right.

Stop strings are matched as the text arrives (:class:`StopMatcher`), in time
linear in the text: a token costs the same whatever the length of the text so
far or of the stop strings. Rescanning for every stop at every token cost
3.9 ms per token on the engine thread with 4,000-character stops.
"""

from __future__ import annotations

from typing import Any, Protocol

_INCOMPLETE = "\ufffd"  # what a decoder returns for a partial UTF-8 sequence


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class StopMatcher:
    """Finds the first stop string in text fed piece by piece, in linear time.

    One Knuth–Morris–Pratt automaton per stop string (at most 4 in the OpenAI
    API, so Aho–Corasick would buy nothing): each character advances each
    automaton in amortised O(1), and the automaton's state is the longest tail
    of the text that could still begin that stop string, which is exactly the
    text to hold back. Nothing already fed is ever read again.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._fail = [_prefix_function(s) for s in self.stops]
        self._state = [0] * len(self.stops)  # characters of each stop matched at the end
        self.fed = 0  # characters fed so far

    def feed(self, piece: str) -> int | None:
        """Advance over ``piece``; the start (an index into all the text fed) of
        the first stop string it completes, else None. Of stops completed by the
        same character the one that starts first wins; nothing is fed after a hit."""
        first: tuple[int, int] | None = None  # (end in piece, start in all text) of the first hit
        for j, stop in enumerate(self.stops):
            k, fail, i = self._state[j], self._fail[j], 0
            while i < len(piece):
                if k == 0:  # no match under way: jump to where this stop can begin, at C speed
                    i = piece.find(stop[0], i)
                    if i == -1:
                        break
                    k, i = 1, i + 1
                else:
                    char = piece[i]
                    while k and stop[k] != char:
                        k = fail[k - 1]
                    if stop[k] == char:
                        k += 1
                    i += 1
                if k == len(stop):
                    hit = (i, self.fed + i - k)
                    first = hit if first is None else min(first, hit)
                    break
            self._state[j] = k
        if first is not None:
            self.fed += first[0]
            return first[1]
        self.fed += len(piece)
        return None

    def partial(self) -> int:
        """Characters at the end of the text fed that could begin a stop string."""
        return max(self._state, default=0)


def _prefix_function(s: str) -> list[int]:
    """KMP's failure table: ``fail[i]`` is the longest proper border of ``s[:i + 1]``."""
    fail = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


class TextStream:
    """Turns a completion's tokens into text deltas that respect stop strings.

    ``push`` each generated token (not the EOS / stop token), then ``take`` the
    text that is safe to send: it never ends in half a character or in the
    beginning of a stop string, and it stops right before a stop string.
    Only text not sent yet is kept (at most the longest stop string plus the
    newest piece), so a long completion costs no more per token than a short one.
    """

    def __init__(self, tokenizer: Decoder | Any, stop: list[str] | None = None) -> None:
        self._tok = tokenizer
        self._stops = StopMatcher(stop or [])
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens before this index are already decoded
        self._held = ""  # decoded text not handed out yet (complete characters only)
        self._sent = 0  # characters handed out (the index in the whole text where _held starts)
        self._stop_at: int | None = None  # where the first stop string starts, once one appeared
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
        if self._stop_at is not None:
            self.stopped = True
            return self._emit(self._stop_at - self._sent)
        keep = 0 if final else self._stops.partial()
        return self._emit(len(self._held) - keep)

    def _emit(self, n: int) -> str:
        n = max(0, min(n, len(self._held)))
        delta, self._held = self._held[:n], self._held[n:]
        self._sent += n
        return delta

    def _decode(self, final: bool) -> None:
        if self._read == len(self._ids):
            return
        window = self._ids[self._prefix:]
        before = self._tok.decode(self._ids[self._prefix:self._read], skip_special_tokens=True)
        after = self._tok.decode(window, skip_special_tokens=True)
        if (len(after) > len(before) and not after.endswith(_INCOMPLETE)) or final:
            piece = after[len(before):]
            if self._stop_at is None:  # text after a stop string is never sent: no need to scan it
                self._held += piece
                self._stop_at = self._stops.feed(piece)
            # The next window starts at this one's read point: a character
            # boundary, rendered at the start of both decodes alike.
            self._prefix, self._read = self._read, len(self._ids)
