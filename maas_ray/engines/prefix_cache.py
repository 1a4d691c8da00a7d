"""Prefix caching: the KV cache of finished requests, kept and reused by later prompts that start alike.

A request that finishes leaves its tokens' keys and values behind (prompt and
completion, so the next turn of a conversation finds its whole history). A new
prompt looks for the entry sharing its longest common prefix and prefills only
the rest: a system prompt, few-shot examples or a chat history are computed
once. The backend decides what an entry's value is (a copy of the key/value
tensors in transformers, a spare llama.cpp sequence id whose cells stay
tagged); this module keeps the bookkeeping both share: matching, least
recently used eviction under a size bound in the backend's unit (bytes or KV
cells), and the counters :meth:`PrefixCache.stats` reports.

One scheduler thread owns a cache; nothing here locks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")

MIN_REUSE_TOKENS = 64
"""Shorter common prefixes are prefilled again. A transformers hit is prefilled on its own
rather than in the arrivals' batched forward, which costs more than recomputing a chat
template's short default system line (SmolLM2's is ~30 tokens) saves."""


@dataclass(eq=False)
class Entry(Generic[T]):
    """Cached KV of ``tokens`` (positions 0..len-1), held as the backend's ``value``."""

    tokens: np.ndarray  # (n,) int64
    value: T
    size: int  # in the cache's unit


@dataclass(frozen=True)
class Hit(Generic[T]):
    """``entry`` holds the first ``n`` tokens of the prompt it was found for."""

    entry: Entry[T]
    n: int


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two token arrays."""
    m = min(len(a), len(b))
    differ = np.flatnonzero(a[:m] != b[:m])
    return int(differ[0]) if len(differ) else m


class PrefixCache(Generic[T]):
    """Least-recently-used entries whose sizes add up to at most ``capacity`` (0: off).

    ``free(value)`` releases an entry's value when it is evicted, replaced or
    cleared (the transformers engine needs none: its tensors are garbage
    collected). ``unit`` names the size unit in :meth:`stats` keys.
    """

    def __init__(self, capacity: int, unit: str, free: Callable[[T], None] | None = None,
                 min_tokens: int = MIN_REUSE_TOKENS) -> None:
        if capacity < 0:
            raise ValueError(f"the prefix cache size must be >= 0 (0 turns it off), got {capacity}")
        self.capacity, self.unit, self.min_tokens = capacity, unit, max(1, min_tokens)
        self._free = free
        self._entries: OrderedDict[int, Entry[T]] = OrderedDict()  # id(entry) → entry, oldest first
        self.used = 0
        self.hits = 0
        self.tokens_reused = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: list[int]) -> Hit[T] | None:
        """The entry sharing the longest prefix with ``prompt``, if that is at least
        ``min_tokens`` long. At most ``len(prompt) - 1`` tokens are reused: the prompt's
        last token is always fed, as its logits give the first new token."""
        if not self._entries or len(prompt) <= self.min_tokens:
            return None
        ids = np.asarray(prompt, dtype=np.int64)
        best, best_n = None, 0
        for entry in self._entries.values():
            n = common_prefix(entry.tokens, ids)
            if n > best_n:
                best, best_n = entry, n
        best_n = min(best_n, len(prompt) - 1)
        return Hit(best, best_n) if best is not None and best_n >= self.min_tokens else None

    def use(self, hit: Hit[T]) -> None:
        """Count a hit the backend acted on and mark its entry recently used."""
        self.hits += 1
        self.tokens_reused += hit.n
        if id(hit.entry) in self._entries:
            self._entries.move_to_end(id(hit.entry))

    def wants(self, tokens: list[int], size: int) -> bool:
        """Whether :meth:`put` would keep ``tokens`` (of ``size``), so the backend copies
        only what it will store. An entry that already starts with them is marked used."""
        if not self.capacity or len(tokens) < self.min_tokens or size > self.capacity:
            return False
        ids = np.asarray(tokens, dtype=np.int64)
        for key, entry in self._entries.items():
            if len(entry.tokens) >= len(ids) and common_prefix(entry.tokens, ids) == len(ids):
                self._entries.move_to_end(key)
                return False
        return True

    def put(self, tokens: list[int], value: T, size: int) -> None:
        """Keep ``value`` (the KV of ``tokens``; call :meth:`wants` first). Entries it
        extends go (it holds all they held); then the least recently used go while the
        sizes exceed the capacity."""
        ids = np.asarray(tokens, dtype=np.int64)
        for key, entry in list(self._entries.items()):
            if len(entry.tokens) <= len(ids) and common_prefix(entry.tokens, ids) == len(entry.tokens):
                self._drop(key)
        entry = Entry(ids, value, size)
        self._entries[id(entry)] = entry
        self.used += size
        while self.used > self.capacity:
            self.evict_lru()

    def evict_lru(self) -> bool:
        """Free the least recently used entry; False if there is none."""
        if not self._entries:
            return False
        self._drop(next(iter(self._entries)))
        self.evictions += 1
        return True

    def clear(self) -> None:
        for key in list(self._entries):
            self._drop(key)

    def stats(self) -> dict[str, int]:
        return {"prefix_cache_entries": len(self._entries), f"prefix_cache_{self.unit}": self.used,
                f"prefix_cache_max_{self.unit}": self.capacity, "prefix_cache_hits": self.hits,
                "prefix_cache_tokens_reused": self.tokens_reused, "prefix_cache_evictions": self.evictions}

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        self.used -= entry.size
        if self._free is not None:
            self._free(entry.value)
