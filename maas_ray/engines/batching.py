"""What every continuous-batching backend shares: the request's life around the model.

A backend subclasses :class:`BatchingEngine` and supplies the model part —
``_load`` (on the scheduler thread), ``_admit`` (waiting → running),
``_step`` (one forward pass for the running batch, then :meth:`_accept` per
sampled token) and ``_release`` (free a request's resources when it leaves).
This class owns the rest, identical for every backend, so every engine streams
the same chunks: the queue and the scheduler thread, streaming to the caller's
event loop, cancellation by id or by an abandoned iterator, and the stop rules
(EOS and stop tokens, stop strings via :class:`TextStream`, ``max_tokens``,
the context length) with usage counts on every chunk.

Fairness. One client request may be many sequences (``n`` choices share a
*group*), and a sequence keeps its slot and KV cells until it finishes: there
is no preemption. So admission (:meth:`BatchingEngine._next_waiting`) takes
the waiting sequence whose group runs the fewest sequences (arrival order
among equals), and no group may hold more than ``max_request_share`` of the
engine (of its slots here; of its KV cells too in llama.cpp) while it already
runs something. One ``n=16`` request can then never lock everyone else out,
and one lone sequence is always admitted, however large. Requests past their
``timeout_s`` are aborted on the scheduler thread, which frees what they hold.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from maas_ray.engines.constraints import Grammars
from maas_ray.engines.detokenize import TextStream
from maas_ray.engines.engine import (EngineClosed, FinishReason, GenerationChunk,
                                       GenerationEngine, RequestTimeout, SamplingParams)
from maas_ray.engines.logprobs import TokenPieces, token_logprob
from maas_ray.engines.prefix_cache import PrefixCache
from maas_ray.engines.sequence import Request, merge
from maas_ray.engines.tool_format import for_template

logger = logging.getLogger(__name__)


class BatchingEngine(GenerationEngine):
    """Queue, scheduler thread, streaming, cancellation and stop rules; see the module doc.

    Subclasses set ``tokenizer`` (a Hugging Face tokenizer: both engines count,
    template and decode tokens alike), ``eos_ids`` and ``context_length`` in
    ``_load`` and keep ``_running`` (admitted requests) up to date in
    ``_admit`` (which takes requests from :meth:`_next_waiting`) and
    :meth:`_remove`. ``max_request_share``: the most of the engine one group
    may hold while it runs anything (see the module doc); 1 turns the cap off.
    """

    tokenizer: Any
    eos_ids: frozenset[int]
    max_prompt_chars: int
    """Prompts longer than this (in characters) cannot fit the context: refuse them untokenized."""

    def __init__(self, max_batch_size: int, max_request_share: float = 0.5) -> None:
        if not 0 < max_request_share <= 1:
            raise ValueError(f"max_request_share must be in (0, 1], got {max_request_share}")
        self.max_batch_size = max_batch_size
        self.max_request_share = max_request_share
        self._lock = threading.Lock()  # guards _waiting, _cancelled, _live, _running
        self._waiting: deque[Request] = deque()
        self._cancelled: set[Request] = set()  # admitted, then abandoned
        self._live: dict[str, Request] = {}
        self._running: list[Request] = []  # changed by the scheduler thread only
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.prefix_cache: PrefixCache[Any] = PrefixCache(0, "tokens")
        """Finished requests' KV reused by later prompts (:mod:`.prefix_cache`); backends that
        support it replace this disabled one in ``__init__``. Scheduler thread only."""
        self._calls: list[tuple[Any, concurrent.futures.Future[Any]]] = []  # for the scheduler thread

    def _start(self, name: str) -> None:
        """Run ``_load`` then the scheduling loop on a new thread; re-raise a load error."""
        ready = threading.Event()
        failed: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(ready, failed), name=name, daemon=True)
        self._thread.start()
        ready.wait()
        if failed:
            raise failed[0]

    # -- the backend's part ------------------------------------------------------
    @abc.abstractmethod
    def _load(self) -> None:
        """Load the model (scheduler thread); set tokenizer, eos_ids, context_length."""

    @abc.abstractmethod
    def _admit(self) -> None:
        """Move waiting requests into the running batch (scheduler thread)."""

    @abc.abstractmethod
    def _step(self) -> None:
        """One forward pass for the running batch; :meth:`_accept` each sampled token."""

    @abc.abstractmethod
    def _remove(self, rows: set[int]) -> None:
        """Drop the requests at these indices of ``_running`` and free what they hold."""

    def _group_may_grow(self, seq: Request, mates: list[Request]) -> bool:
        """Whether ``seq`` may join its group's running ``mates`` (none: always).
        Backends with other shared resources (KV cells) add their own share."""
        return not mates or len(mates) + 1 <= max(1, int(self.max_request_share * self.max_batch_size))

    def _next_waiting(self) -> Request | None:
        """The waiting request to admit next (call with ``_lock`` held; it stays in
        ``_waiting``): from the group running the fewest sequences, first come first
        served among equals, skipping groups at their share. None if none may start."""
        mates: dict[str, list[Request]] = {}
        for seq in self._running:
            mates.setdefault(seq.group, []).append(seq)
        best, best_running = None, 0
        for seq in self._waiting:
            running = mates.get(seq.group, [])
            if (best is None or len(running) < best_running) and self._group_may_grow(seq, running):
                best, best_running = seq, len(running)
                if not running:
                    break
        return best

    def _check_adapter(self, name: str) -> None:
        """Raise ValueError unless requests may name LoRA adapter ``name``."""
        raise ValueError(f"the {self.info()['engine']} engine serves no LoRA adapters ({name!r})")

    def _scheduler_stats(self) -> dict[str, int]:
        """Backend figures added to :meth:`stats` (read without the scheduler's help)."""
        return {}

    def _shutdown(self) -> None:  # noqa: B027 - optional
        """Free the model (scheduler thread, after the loop ends)."""

    # -- public API --------------------------------------------------------------
    @functools.cached_property
    def token_pieces(self) -> TokenPieces:
        """Token id → ``(text, bytes)`` as logprobs show it (cached per engine)."""
        return TokenPieces(self.tokenizer)

    @functools.cached_property
    def grammars(self) -> Grammars:
        """Grammars compiled for this engine's tokenizer (built on first use, ~1 s)."""
        return Grammars(self.tokenizer, self.tokenizer.eos_token_id)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> list[int]:
        messages, extra = for_template(self.tokenizer, messages, tools)
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                 tokenize=True, **extra)
        if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                       group: str | None = None) -> AsyncIterator[GenerationChunk]:
        """Stream the completion; chunks that pile up while the consumer is busy
        arrive merged into one (same text and token ids, fewer messages)."""
        if self._closed.is_set():
            raise EngineClosed("the engine is closed")
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.context_length:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the context holds "
                             f"{self.context_length} (prompt + completion)")
        if params.adapter is not None:
            self._check_adapter(params.adapter)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        deadline = None if params.timeout_s is None else time.monotonic() + params.timeout_s
        # Off the event loop: the first grammar builds the tokenizer's index (~1 s).
        constraint = None if params.grammar is None else await asyncio.to_thread(
            lambda: self.grammars.start(params.grammar))
        seq = Request(request_id, list(prompt_ids), params, stop_ids, TextStream(self.tokenizer, params.stop),
                      asyncio.get_running_loop(), asyncio.Queue(), group or request_id, deadline,
                      constraint=constraint)
        with self._lock:  # checked under the lock: close() fails whatever is queued by then
            if self._closed.is_set():
                raise EngineClosed("the engine is closed")
            if request_id in self._live:
                raise ValueError(f"request id {request_id!r} is already running")
            self._live[request_id] = seq
            self._waiting.append(seq)
        self._wake.set()
        try:
            while True:
                items = [await seq.out.get()]
                while not seq.out.empty() and not isinstance(items[-1], BaseException):
                    items.append(seq.out.get_nowait())
                chunks = [i for i in items if isinstance(i, GenerationChunk)]
                if chunks:
                    chunk = merge(chunks)
                    yield chunk
                    if chunk.finish_reason is not None:
                        return
                if isinstance(items[-1], BaseException):
                    raise items[-1]
        finally:  # normal end, error, or the consumer went away (disconnect, cancellation)
            if not seq.done:
                self.cancel(request_id)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            seq = self._live.pop(request_id, None)
            if seq is None:
                return
            if seq in self._waiting:  # never admitted: nothing to free but the place in line
                self._waiting.remove(seq)
                seq.done = True
                return
            self._cancelled.add(seq)
        self._wake.set()

    def stats(self) -> dict[str, int]:
        # A finished sequence stays in ``_running`` until the backend's ``_remove`` (which
        # may store its KV in the prefix cache) runs after the step; its caller already
        # has the last chunk, so it no longer counts as running.
        with self._lock:
            counts = {"running": sum(not s.done for s in self._running), "waiting": len(self._waiting)}
        return counts | self._scheduler_stats()

    def prefix_cache_stats(self, timeout_s: float = 30.0) -> dict[str, int]:
        """Prefix cache figures: entries, size, hits, prompt tokens reused, evictions. Read
        on the scheduler thread between two steps, so a request whose last chunk has arrived
        has had its prefix stored (or not) by then."""
        return self._on_scheduler(self.prefix_cache.stats, timeout_s)

    def reset_prefix_cache(self, timeout_s: float = 30.0) -> None:
        """Drop every cached prefix (as vLLM's ``reset_prefix_cache``); the scheduler
        thread does it between two steps, and this returns once it has."""
        self._on_scheduler(self.prefix_cache.clear, timeout_s)

    def _on_scheduler(self, fn: Any, timeout_s: float) -> Any:
        """``fn()`` run on the scheduler thread between two steps (it owns the model);
        its result, or its exception raised here. :class:`EngineClosed` if the engine
        closes first."""
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._closed.is_set():
                raise EngineClosed("the engine is closed")
            self._calls.append((fn, done))
        self._wake.set()
        return done.result(timeout=timeout_s)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake.set()
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    def __del__(self) -> None:  # Serve's multiplexer calls this when it evicts the model
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- scheduler thread --------------------------------------------------------
    def _run(self, ready: threading.Event, failed: list[BaseException]) -> None:
        try:
            self._load()
            self.max_prompt_chars = self.context_length * _longest_token_chars(self.tokenizer)
        except BaseException as err:  # noqa: BLE001 - re-raised by _start
            failed.append(err)
            self._closed.set()
            return
        finally:
            ready.set()
        try:
            while not self._closed.is_set():
                try:
                    # Cleared before the queues are read: a request or cancel that
                    # arrives after this line sets it again, so the wait below
                    # returns at once instead of sleeping on it.
                    self._wake.clear()
                    self._run_calls()
                    self._drop_cancelled()
                    self._expire()
                    self._admit()
                    if not self._running:
                        self._wake.wait(timeout=1.0)
                        continue
                    self._step()
                except Exception as err:  # noqa: BLE001 - fail these requests, keep the replica
                    logger.exception("decode step failed; failing %d running requests", len(self._running))
                    self._fail(err, waiting_too=False)
            self._fail(EngineClosed("the engine was closed"), waiting_too=True)
            with self._lock:
                calls, self._calls = self._calls, []
            for _, done in calls:
                done.set_exception(EngineClosed("the engine was closed"))
        finally:
            self._shutdown()

    def _fail(self, err: BaseException, waiting_too: bool) -> None:
        """End running (and waiting) requests with ``err`` and free what they held."""
        self._remove(set(range(len(self._running))))
        with self._lock:
            seqs = [s for s in self._live.values() if waiting_too or s not in self._waiting]
            if waiting_too:
                self._waiting.clear()
            for seq in seqs:
                self._live.pop(seq.request_id, None)
            self._cancelled.clear()
        for seq in seqs:
            seq.done = True
            seq.send(err)

    def _run_calls(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
        for fn, done in calls:
            try:
                done.set_result(fn())
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                done.set_exception(err)

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
        if cancelled:
            self._remove({i for i, s in enumerate(self._running) if s in cancelled})

    def _expire(self) -> None:
        """Abort requests past their deadline, waiting or running, and free what they hold."""
        now = time.monotonic()
        with self._lock:
            late = [s for s in self._live.values() if s.deadline is not None and s.deadline <= now]
            for seq in late:
                self._live.pop(seq.request_id, None)
                self._cancelled.discard(seq)
                if seq in self._waiting:
                    self._waiting.remove(seq)
        if not late:
            return
        self._remove({i for i, s in enumerate(self._running) if s in late})
        for seq in late:
            seq.done = True
            seq.send(RequestTimeout(f"the request did not finish within {seq.params.timeout_s:g} s "
                                    f"({len(seq.generated)} tokens generated); it was aborted"))

    def _accept(self, seq: Request, token: int, logits: Any = None) -> bool:
        """Record a sampled token, stream what is safe to send; True if ``seq`` is finished.

        ``logits``: the raw logits row (V,) the token was sampled from, as a NumPy array;
        backends pass it when ``seq.params.logprobs`` is not None (:mod:`.logprobs`)."""
        if seq.constraint is not None:
            seq.constraint.consume(token)
        seq.generated.append(token)
        seq.unsent.append(token)
        if seq.params.logprobs is not None:
            seq.unsent_logprobs.append(token_logprob(logits, token, seq.params.logprobs))
        finish: FinishReason | None = None
        if token in seq.stop_ids:
            finish = "stop"
        else:
            seq.text.push(token)
        if len(seq.generated) >= seq.params.max_tokens:
            finish = finish or "length"
        elif len(seq.prompt) + len(seq.generated) >= self.context_length:
            finish = finish or "length"
        delta = seq.text.take(final=finish is not None)
        if seq.text.stopped:
            finish = "stop"
        if delta or finish:
            logprobs = seq.unsent_logprobs if seq.params.logprobs is not None else None
            chunk = GenerationChunk(delta, seq.unsent, finish, len(seq.prompt), len(seq.generated), logprobs)
            seq.unsent, seq.unsent_logprobs = [], []
            if finish:
                self._retire(seq, chunk)
            elif not seq.send(chunk):  # the consumer's loop is gone
                self.cancel(seq.request_id)
        return finish is not None

    def _retire(self, seq: Request, last: GenerationChunk | BaseException) -> None:
        with self._lock:
            self._live.pop(seq.request_id, None)
        seq.done = True
        seq.send(last)


def _longest_token_chars(tokenizer: Any) -> int:
    """Characters one token can stand for, at most: the longest vocabulary entry.

    A byte-level BPE entry spells one byte per character and a SentencePiece
    entry one character per character (``▁`` for a space, ``<0xNN>`` for a
    byte), so no token covers more text than its entry is long, and a prompt of
    more than ``context_length`` × this many characters has more tokens than
    the context. (It holds for tokenizers that do not drop characters, as chat
    models' do not.)
    """
    return max(1, max((len(t) for t in tokenizer.get_vocab()), default=1))
