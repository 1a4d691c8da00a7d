"""Iteration-level (continuous) batching on any transformers causal LM.

One scheduler thread owns the model (torch releases the GIL inside ops, so the
event loop stays responsive). Every step it

1. drops cancelled requests and admits waiting ones: each is prefilled alone —
   exactly what ``generate`` does for one prompt — and its KV cache joins the
   running batch left-padded and masked (:mod:`.kv_batch`);
2. runs ONE batched decode forward for all running sequences;
3. samples each row with its own settings (greedy, or temperature/top-p with
   the request's own seeded ``torch.Generator``), streams the new text, and
   removes rows that hit EOS, a stop token, a stop string, ``max_tokens`` or
   the context length.

Why not transformers' own ``init_continuous_batching`` (v5)? It streams and
cancels, but sampling is configured once per manager: greedy vs sampling and
the RNG are global, per-request temperature/top-p only exist if enabled at
creation, and there are no per-request seeds or stop strings. Exact greedy
parity with ``generate`` also matters more to us than paged-attention
throughput on CPU.

Batching is not bit-for-bit batch-invariant: CPU GEMM kernels round
differently for 1 row than for 8+ (≈1e-5 on SmolLM2's logits), so a greedy
token could differ from single-sequence ``generate`` only where the top two
logits are that close. Padding itself contributes exactly nothing.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from maas_ray.serve.llm.detokenize import TextStream
from maas_ray.serve.llm.engine import (EngineClosed, FinishReason, GenerationChunk,
                                       GenerationEngine, SamplingParams)
from maas_ray.serve.llm.kv_batch import BatchCache, check_supported

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Seq:
    """One request's state; owned by the scheduler thread once admitted."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    text: TextStream
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[GenerationChunk | BaseException]
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    unsent: list[int] = field(default_factory=list)  # token ids not yet in a chunk
    done: bool = False

    def send(self, item: GenerationChunk | BaseException) -> bool:
        """Hand ``item`` to the consumer's event loop; False if that loop is gone."""
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
            return True
        except RuntimeError:  # loop closed: nobody is listening any more
            return False


class TransformersEngine(GenerationEngine):
    """Continuous batching over a local HF model folder (safetensors, no remote code).

    ``max_batch_size`` caps running sequences (more wait in line);
    ``prefill_tokens_per_step`` caps prompt tokens prefilled between two decode
    steps (at least one request), so a burst of long prompts stalls running
    streams for a bounded time. Thread count: whatever ``torch.set_num_threads``
    says in the process.
    """

    def __init__(self, model_dir: Path | str, device: str = "cpu", dtype: torch.dtype | None = None,
                 max_batch_size: int = 16, prefill_tokens_per_step: int = 2048) -> None:
        from transformers import AutoTokenizer, GenerationConfig

        kwargs = {"local_files_only": True, "trust_remote_code": False}
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), **kwargs)
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.prefill_tokens_per_step = prefill_tokens_per_step
        try:
            eos = GenerationConfig.from_pretrained(str(model_dir), **kwargs).eos_token_id
        except OSError:  # no generation_config.json: the model config's EOS below
            eos = None
        self._eos_from_config = eos

        self._lock = threading.Lock()  # guards _waiting, _cancelled, _live, _running
        self._waiting: deque[_Seq] = deque()
        self._cancelled: set[_Seq] = set()  # admitted, then abandoned
        self._live: dict[str, _Seq] = {}
        self._running: list[_Seq] = []  # rows of _batch; changed by the scheduler only
        self._batch = BatchCache()
        self._closed = threading.Event()
        self._wake = threading.Event()
        ready = threading.Event()
        failed: list[BaseException] = []
        # The model is loaded and run on the scheduler thread only. torch ops
        # issued from a second thread start a second OpenMP team; with more
        # OpenMP threads than cores libgomp stops spin-waiting and every
        # parallel region pays a futex wake-up (decode ~30 % slower on 2 cores).
        self._thread = threading.Thread(
            target=self._run, args=(str(model_dir), dtype or torch.float32, ready, failed),
            name="maas-llm-scheduler", daemon=True)
        self._thread.start()
        ready.wait()
        if failed:
            raise failed[0]

    def _load(self, model_dir: str, dtype: torch.dtype) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, local_files_only=True, trust_remote_code=False,
            use_safetensors=True).to(self.device).eval()
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 2048))
        eos = self._eos_from_config if self._eos_from_config is not None else self.model.config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        # SmolLM2's pad token is its EOS (<|im_end|>): padding never reaches the
        # model here (masks do), so only the stop set needs it.
        self.eos_ids = frozenset(i for i in [*eos_ids, self.tokenizer.eos_token_id] if i is not None)
        probe = torch.tensor([[self.tokenizer.bos_token_id or 0]], device=self.device)
        check_supported(self.model(input_ids=probe, use_cache=True).cache)  # also warms up kernels

    # -- public API ----------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[GenerationChunk]:
        if self._closed.is_set():
            raise EngineClosed("the engine is closed")
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.context_length:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the context holds "
                             f"{self.context_length} (prompt + completion)")
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device="cpu")
            if params.seed is None:
                generator.seed()
            else:
                generator.manual_seed(params.seed)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        seq = _Seq(request_id, list(prompt_ids), params, stop_ids, TextStream(self.tokenizer, params.stop),
                   asyncio.get_running_loop(), asyncio.Queue(), generator)
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
                item = await seq.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:  # normal end, error, or the consumer went away (disconnect, cancellation)
            if not seq.done:
                self.cancel(request_id)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            seq = self._live.pop(request_id, None)
            if seq is None:
                return
            if seq in self._waiting:  # never admitted: nothing to free but the slot in line
                self._waiting.remove(seq)
                seq.done = True
                return
            self._cancelled.add(seq)
        self._wake.set()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"running": len(self._running), "waiting": len(self._waiting)}

    def info(self) -> dict[str, Any]:
        return {"engine": "transformers", "max_batch_size": self.max_batch_size, "warning": None}

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    def __del__(self) -> None:  # Serve's multiplexer calls this when it evicts the model
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- scheduler thread ----------------------------------------------------
    def _run(self, model_dir: str, dtype: torch.dtype, ready: threading.Event,
             failed: list[BaseException]) -> None:
        with torch.inference_mode():
            try:
                self._load(model_dir, dtype)
            except BaseException as err:  # noqa: BLE001 - re-raised by __init__
                failed.append(err)
                self._closed.set()
                return
            finally:
                ready.set()
            while not self._closed.is_set():
                try:
                    self._drop_cancelled()
                    self._admit()
                    if not self._running:
                        self._wake.wait(timeout=1.0)
                        self._wake.clear()
                        continue
                    self._decode_step()
                except Exception as err:  # noqa: BLE001 - fail these requests, keep the replica
                    logger.exception("decode step failed; failing %d running requests", len(self._running))
                    self._fail(err, waiting_too=False)
            self._fail(EngineClosed("the engine was closed"), waiting_too=True)

    def _fail(self, err: BaseException, waiting_too: bool) -> None:
        """End running (and waiting) requests with ``err`` and empty the batch."""
        with self._lock:
            seqs, self._running = self._running, []
            if waiting_too:
                seqs += self._waiting
                self._waiting.clear()
            for seq in seqs:
                self._live.pop(seq.request_id, None)
            self._cancelled.clear()
        self._batch = BatchCache()
        for seq in seqs:
            seq.done = True
            seq.send(err)

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
        if cancelled:
            self._remove({i for i, s in enumerate(self._running) if s in cancelled})

    def _admit(self) -> None:
        budget = self.prefill_tokens_per_step
        while len(self._running) < self.max_batch_size:
            with self._lock:
                if not self._waiting or (budget < len(self._waiting[0].prompt)
                                         and budget < self.prefill_tokens_per_step):
                    return
                seq = self._waiting.popleft()
                self._running.append(seq)  # visible to stats() while it prefills
            budget -= len(seq.prompt)
            try:
                ids = torch.tensor([seq.prompt], device=self.device)
                # logits_to_keep=1: generate() computes only the last position's
                # logits too, so the first token matches it bit for bit.
                out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            except Exception as err:  # noqa: BLE001 - this prompt failed, not the batch
                logger.exception("prefill of %s failed", seq.request_id)
                self._running.pop()
                self._retire(seq, err)
                continue
            self._batch.add(out.cache, len(seq.prompt))
            if self._accept(seq, self._sample(out.logits[:, -1, :], [seq])[0]):
                self._remove({len(self._running) - 1})

    def _decode_step(self) -> None:
        last = torch.tensor([[s.generated[-1]] for s in self._running], device=self.device)  # (B, 1)
        mask, positions = self._batch.next_step()  # (B, T + 1), (B, 1)
        out = self.model(input_ids=last, attention_mask=mask, position_ids=positions,
                         cache=self._batch.cache, use_cache=True)
        tokens = self._sample(out.logits[:, -1, :], self._running)  # logits (B, 1, V)
        finished = {i for i, (seq, tok) in enumerate(zip(self._running, tokens)) if self._accept(seq, tok)}
        self._remove(finished)

    def _sample(self, logits: torch.Tensor, seqs: list[_Seq]) -> list[int]:
        """One token per row (``logits`` (B, V)), each with its own settings."""
        out = []
        for row, seq in zip(logits.float(), seqs):
            p = seq.params
            if p.temperature <= 0:
                out.append(int(torch.argmax(row)))
                continue
            probs = torch.softmax(row / p.temperature, dim=-1)
            if p.top_p < 1.0:
                sorted_p, order = torch.sort(probs, descending=True)
                keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < p.top_p  # the top token always stays
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
            out.append(int(torch.multinomial(probs, 1, generator=seq.generator)))
        return out

    def _accept(self, seq: _Seq, token: int) -> bool:
        """Record a sampled token, stream what is safe to send; True if ``seq`` is finished."""
        seq.generated.append(token)
        seq.unsent.append(token)
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
            chunk = GenerationChunk(delta, seq.unsent, finish, len(seq.prompt), len(seq.generated))
            seq.unsent = []
            if finish:
                self._retire(seq, chunk)
            elif not seq.send(chunk):  # the consumer's loop is gone
                self.cancel(seq.request_id)
        return finish is not None

    def _retire(self, seq: _Seq, last: GenerationChunk | BaseException) -> None:
        with self._lock:
            self._live.pop(seq.request_id, None)
        seq.done = True
        seq.send(last)

    def _remove(self, rows: set[int]) -> None:
        if not rows:
            return
        keep = [i for i in range(len(self._running)) if i not in rows]
        with self._lock:
            self._running = [self._running[i] for i in keep]
        self._batch.keep(keep)
