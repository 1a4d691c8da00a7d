"""Token log-probabilities from a logits row, and what a token id looks like on the wire.

Both engines hand :func:`token_logprob` the raw logits their sampler sees (one
float32 row over the vocabulary), so they report the same quantity: the
log-softmax of the model's own distribution, before temperature and top-p.
That is what OpenAI and vLLM report; values after temperature would describe
the sampler, not the model, and would differ between two requests that only
differ in temperature. It is computed in float64 (the log-sum-exp of 49,152
float32 logits loses ~1e-6 in float32), which costs ~0.1 ms per token.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from maas_ray.engines.engine import TokenLogprob

MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs


def token_logprob(logits: np.ndarray, token: int, k: int) -> TokenLogprob:
    """``token``'s logprob and the ``k`` most likely tokens of ``logits`` (V,).

    The top list is ordered by logit, ties by token id: ``np.argmax`` and
    ``torch.argmax`` (the engines' greedy choice) return the first maximal index,
    so a greedy token is always ``top[0]`` with exactly its logprob.
    """
    row = np.asarray(logits, dtype=np.float64)  # (V,)
    peak = row.max()
    lse = peak + np.log(np.exp(row - peak).sum())
    top: list[tuple[int, float]] = []
    if k > 0:
        k = min(k, row.size)
        cand = np.argpartition(-row, k - 1)[:k]
        # Ties at the k-th value may fall either side of argpartition's cut; take them all
        # and keep the k with the lowest ids, so the list is the same on every machine.
        cand = np.union1d(cand, np.flatnonzero(row == row[cand].min()))
        order = np.lexsort((cand, -row[cand]))[:k]  # by logit descending, then token id
        top = [(int(t), float(row[t] - lse)) for t in cand[order]]
    return TokenLogprob(int(token), float(row[token] - lse), top)


class TokenPieces:
    """Token id → ``(text, UTF-8 bytes)`` as OpenAI's logprobs show a token, cached.

    ``text`` is the token decoded alone (special tokens spelt out); ``bytes`` are
    the token's own bytes, which for a byte-level BPE piece of a multi-byte
    character are not valid UTF-8 alone (its ``text`` is then U+FFFD): joining
    the bytes of consecutive tokens gives the exact text.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}
        self._byte_of: dict[str, int] | None = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and type(backend.decoder).__name__ == "ByteLevel":
            self._byte_of = {c: b for b, c in _bytes_to_unicode().items()}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        piece = self._cache.get(token_id)
        if piece is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            raw = text.encode("utf-8")
            if self._byte_of is not None and token_id not in self.tokenizer.all_special_ids:
                chars = self.tokenizer.convert_ids_to_tokens(token_id)
                if isinstance(chars, str) and all(c in self._byte_of for c in chars):
                    raw = bytes(self._byte_of[c] for c in chars)
            piece = self._cache[token_id] = (text, list(raw))
        return piece


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: each byte as the printable character its vocabulary
    spells it with (printable Latin-1 bytes as themselves, the rest shifted past 255)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table
