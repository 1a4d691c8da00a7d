"""The generation engine interface: what a model replica needs from a backend.

A backend (transformers today, llama.cpp for GGUF next) owns a running batch:
requests join it after their prefill and leave it the step they finish, so a
short request never waits for a long one. Callers stream chunks from
:meth:`GenerationEngine.generate`; abandoning the iterator (client disconnect →
``GeneratorExit`` / ``CancelledError``) cancels the request and frees its slot.

Usage from an async caller (a Serve replica)::

    ids = engine.apply_chat_template(messages)
    async for chunk in engine.generate(ids, SamplingParams(max_tokens=64), request_id):
        send(chunk.text)                  # finish_reason is set on the last chunk
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings. Plain data: the HTTP layer validates them."""

    max_tokens: int | None = None
    """Completion tokens to generate at most (finish_reason "length"). None, as a request
    model builds it without ``max_tokens``: as many as fit, which the server resolves from
    the prompt's length (:func:`maas_ray.serve.llm_server.admit`) before an engine runs it."""
    temperature: float = 1.0
    """0 means greedy (argmax); otherwise logits are divided by it."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    stop: list[str] = field(default_factory=list)
    """Strings that end the completion; the text never includes them."""
    seed: int | None = None
    """Seeds this request's own RNG, so the same request samples the same tokens."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end the completion, in addition to the model's EOS."""
    ignore_eos: bool = False
    """Keep going past EOS (benchmarks that need exactly ``max_tokens``)."""
    timeout_s: float | None = None
    """Longest the request may take from its arrival, waiting included; then it ends
    with :class:`RequestTimeout` and frees its slot and KV cells. None: no limit."""
    logprobs: int | None = None
    """Report each generated token's log-probability and this many most likely
    alternatives (0–20) in :attr:`GenerationChunk.logprobs`; None: report nothing."""
    grammar: str | None = None
    """A Lark grammar (llguidance's dialect, :mod:`.constraints`) the completion must follow:
    tokens outside it are masked before sampling. None: free text."""
    adapter: str | None = None
    """The LoRA adapter (its registry id, loaded with the engine's ``load_adapter``) this
    request decodes with; None: the base model. Engines without adapters refuse it."""


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model, with the top alternatives.

    Log-softmax of the model's raw logits for that position, before temperature and
    top-p (the model's own distribution, as OpenAI and vLLM report it, so the values
    do not depend on how the token was sampled). ``top``: ``(token id, logprob)``
    most likely first, ties in token id order (as argmax breaks them, so a greedy
    token is ``top[0]``).
    """

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class GenerationChunk:
    """What one decode step added to a request; the last chunk has ``finish_reason``.

    ``token_ids`` are the new tokens (a stop token included); ``text`` is the
    new text, which may be empty while a multi-byte character or a possible
    stop string is still incomplete. Stop strings and stop tokens never appear
    in ``text``.
    """

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None
    """One entry per token in ``token_ids`` when the request asked for logprobs."""


class EngineClosed(RuntimeError):
    """The engine was closed; requests in flight end with this error."""


class RequestTimeout(RuntimeError):
    """The request ran past ``SamplingParams.timeout_s`` and was aborted.

    Not a ``TimeoutError``: callers map that to "the model did not answer" (503);
    this one means the request itself took too long (504). One string argument,
    so Ray can pickle it across the replica hop and re-raise it as this type.
    """


class GenerationEngine(abc.ABC):
    """A model, its tokenizer and a scheduler that batches concurrent requests."""

    context_length: int
    """Prompt plus completion tokens the model takes at most."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Tokenise a raw prompt (``/v1/completions``)."""

    @abc.abstractmethod
    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Messages → prompt token ids, ending with the assistant's turn (unless
        ``add_generation_prompt`` is False: ``/v1/tokenize`` may ask for that). ``tools`` and
        messages with ``tool_calls`` or role ``tool`` are rendered as :mod:`.tool_format` says."""

    @abc.abstractmethod
    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                 group: str | None = None) -> AsyncIterator[GenerationChunk]:
        """Stream the completion of ``prompt_ids`` (an async generator).

        ``group`` names the client request this sequence belongs to (the ``n``
        choices of one HTTP request share it; default: ``request_id``): the
        scheduler admits groups fairly and caps what one group holds.

        Raises ``ValueError`` for an empty prompt or one that leaves no room in
        the context, :class:`EngineClosed` after :meth:`close`,
        :class:`RequestTimeout` past ``params.timeout_s``.
        """

    @abc.abstractmethod
    def cancel(self, request_id: str) -> None:
        """Stop a request and free its slot (no-op if it already finished)."""

    @abc.abstractmethod
    def stats(self) -> dict[str, int]:
        """``{"running": ..., "waiting": ...}`` sequences right now."""

    def info(self) -> dict[str, Any]:
        """What ``/v1/models`` shows of the engine serving a model: its name, batch size,
        and ``warning`` when it serves in a degraded way (and why)."""
        return {"engine": type(self).__name__, "max_batch_size": getattr(self, "max_batch_size", None),
                "warning": None}

    def close(self) -> None:  # noqa: B027 - optional for backends without threads
        """Stop the scheduler and fail requests in flight; the engine is unusable after."""

    def __enter__(self) -> GenerationEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
