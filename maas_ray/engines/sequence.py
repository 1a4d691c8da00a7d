"""One request's state inside a continuous batch, and how its queued chunks merge.

Kept apart from :mod:`.batching` (the scheduler that owns these) so backends and the
replica can name a request's fields without the scheduler loop around them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from maas_ray.engines.constraints import Constraint
from maas_ray.engines.detokenize import TextStream
from maas_ray.engines.engine import GenerationChunk, SamplingParams, TokenLogprob


@dataclass(eq=False)
class Request:
    """One request's state; owned by the scheduler thread once admitted."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    text: TextStream
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[GenerationChunk | BaseException]
    group: str = ""
    """The client request it belongs to (its ``n`` choices share one): the unit of fairness."""
    deadline: float | None = None
    """``time.monotonic()`` past which it is aborted with :class:`RequestTimeout`."""
    generated: list[int] = field(default_factory=list)
    unsent: list[int] = field(default_factory=list)  # token ids not yet in a chunk
    unsent_logprobs: list[TokenLogprob] = field(default_factory=list)  # theirs, if asked for
    done: bool = False
    constraint: Constraint | None = None
    """Its grammar's state when ``params.grammar`` is set: the backend's ``_sample`` masks
    tokens outside it, :meth:`BatchingEngine._accept` advances it."""
    state: Any = None
    """The backend's per-request data (KV slot, sampler, RNG)."""

    def send(self, item: GenerationChunk | BaseException) -> bool:
        """Hand ``item`` to the consumer's event loop; False if that loop is gone."""
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
            return True
        except RuntimeError:  # loop closed: nobody is listening any more
            return False


def merge(chunks: list[GenerationChunk]) -> GenerationChunk:
    """Chunks that queued up while the consumer was busy, as one (same text, same ids)."""
    if len(chunks) == 1:
        return chunks[0]
    last = chunks[-1]
    logprobs = None if last.logprobs is None else [e for c in chunks for e in c.logprobs or []]
    return GenerationChunk("".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids],
                           last.finish_reason, last.prompt_tokens, last.completion_tokens, logprobs)
