"""The generation engine interface: what a model replica needs from a backend.

A backend (transformers today; llama.cpp for GGUF next) owns a running batch:
requests join it after their prefill and leave it the step they finish, so a
short request never waits for a long one. Callers stream chunks from
:meth:`GenerationEngine.generate`; abandoning the iterator cancels the request
and frees its slot.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings (validated by the HTTP layer)."""

    max_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass(frozen=True)
class GenerationChunk:
    """New text since the previous chunk; the last one carries ``finish_reason``."""

    text: str
    token_ids: list[int]
    finish_reason: str | None  # None | "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


class GenerationEngine(abc.ABC):
    """A model plus its scheduler."""

    context_length: int

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Tokenise a raw prompt (``/v1/completions``)."""

    @abc.abstractmethod
    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        """Messages → prompt token ids, ending with the assistant's turn."""

    @abc.abstractmethod
    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 request_id: str) -> AsyncIterator[GenerationChunk]:
        """Stream the completion of ``prompt_ids``."""

    @abc.abstractmethod
    def cancel(self, request_id: str) -> None:
        """Stop a request and free its slot (no-op if it already finished)."""

    @abc.abstractmethod
    def stats(self) -> dict[str, int]:
        """``{"running": ..., "waiting": ...}`` sequences."""

    def close(self) -> None:
        """Release threads and memory; the engine is unusable afterwards."""
