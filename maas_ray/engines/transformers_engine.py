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

The queue, the scheduler loop, streaming, cancellation, stop rules, fair
admission and timeouts are :class:`~.batching.BatchingEngine`'s, shared with
the llama.cpp engine; this module supplies loading, prefill and the decode step.

Batching is not bit-for-bit batch-invariant: CPU GEMM kernels round
differently for 1 row than for 8+ (≈1e-5 on SmolLM2's logits), so a greedy
token could differ from single-sequence ``generate`` only where the top two
logits are that close. Padding itself contributes exactly nothing.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import torch

from maas_ray.engines.batching import BatchingEngine, Request
from maas_ray.engines.kv_batch import BatchCache, check_supported

logger = logging.getLogger(__name__)


class TransformersEngine(BatchingEngine):
    """Continuous batching over a local HF model folder (safetensors, no remote code).

    ``max_batch_size`` caps running sequences (more wait in line);
    ``prefill_tokens_per_step`` caps prompt tokens prefilled between two decode
    steps (at least one request), so a burst of long prompts stalls running
    streams for a bounded time; ``max_request_share``: the most of the running
    batch one client request (its ``n`` choices) may hold while it runs
    anything. Thread count: whatever ``torch.set_num_threads`` says in the process.
    """

    def __init__(self, model_dir: Path | str, device: str = "cpu", dtype: torch.dtype | None = None,
                 max_batch_size: int = 16, prefill_tokens_per_step: int = 2048,
                 max_request_share: float = 0.5) -> None:
        from transformers import AutoTokenizer, GenerationConfig

        super().__init__(max_batch_size, max_request_share)
        kwargs = {"local_files_only": True, "trust_remote_code": False}
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), **kwargs)
        self.device = torch.device(device)
        self.prefill_tokens_per_step = prefill_tokens_per_step
        try:
            eos = GenerationConfig.from_pretrained(str(model_dir), **kwargs).eos_token_id
        except OSError:  # no generation_config.json: the model config's EOS below
            eos = None
        self._eos_from_config = eos
        self._model_dir, self._dtype = str(model_dir), dtype or torch.float32
        self._batch = BatchCache()  # rows aligned with _running
        # The model is loaded and run on the scheduler thread only. torch ops
        # issued from a second thread start a second OpenMP team; with more
        # OpenMP threads than cores libgomp stops spin-waiting and every
        # parallel region pays a futex wake-up (decode ~30 % slower on 2 cores).
        self._start("maas-llm-scheduler")

    def _run(self, ready: threading.Event, failed: list[BaseException]) -> None:
        with torch.inference_mode():
            super()._run(ready, failed)

    # -- the backend's part ------------------------------------------------------
    def _load(self) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            self._model_dir, dtype=self._dtype, local_files_only=True, trust_remote_code=False,
            use_safetensors=True).to(self.device).eval()
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 2048))
        eos = self._eos_from_config if self._eos_from_config is not None else self.model.config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        # SmolLM2's pad token is its EOS (<|im_end|>): padding never reaches the
        # model here (masks do), so only the stop set needs it.
        self.eos_ids = frozenset(i for i in [*eos_ids, self.tokenizer.eos_token_id] if i is not None)
        probe = torch.tensor([[self.tokenizer.bos_token_id or 0]], device=self.device)
        check_supported(self.model(input_ids=probe, use_cache=True).cache)  # also warms up kernels

    def info(self) -> dict[str, Any]:
        return {"engine": "transformers", "max_batch_size": self.max_batch_size, "warning": None}

    def _admit(self) -> None:
        budget = self.prefill_tokens_per_step
        while len(self._running) < self.max_batch_size:
            with self._lock:
                seq = self._next_waiting()
                if seq is None or (budget < len(seq.prompt) and budget < self.prefill_tokens_per_step):
                    return
                self._waiting.remove(seq)
                self._running.append(seq)  # visible to stats() while it prefills
            budget -= len(seq.prompt)
            try:
                seq.state = _generator(seq)
                ids = torch.tensor([seq.prompt], device=self.device)
                # logits_to_keep=1: generate() computes only the last position's
                # logits too, so the first token matches it bit for bit.
                out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            except Exception as err:  # noqa: BLE001 - this prompt failed, not the batch
                logger.exception("prefill of %s failed", seq.request_id)
                with self._lock:
                    self._running.pop()
                self._retire(seq, err)
                continue
            self._batch.add(out.cache, len(seq.prompt))
            rows = out.logits[:, -1, :]  # (1, V)
            if self._accept(seq, self._sample(rows, [seq])[0], _numpy_rows(rows, [seq])[0]):
                self._remove({len(self._running) - 1})

    def _step(self) -> None:
        last = torch.tensor([[s.generated[-1]] for s in self._running], device=self.device)  # (B, 1)
        mask, positions = self._batch.next_step()  # (B, T + 1), (B, 1)
        out = self.model(input_ids=last, attention_mask=mask, position_ids=positions,
                         cache=self._batch.cache, use_cache=True)
        rows = out.logits[:, -1, :]  # logits (B, 1, V) -> (B, V)
        tokens = self._sample(rows, self._running)
        numpy_rows = _numpy_rows(rows, self._running)
        finished = {i for i, (seq, tok, row) in enumerate(zip(self._running, tokens, numpy_rows))
                    if self._accept(seq, tok, row)}
        self._remove(finished)

    def _sample(self, logits: torch.Tensor, seqs: list[Request]) -> list[int]:
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
            out.append(int(torch.multinomial(probs, 1, generator=seq.state)))
        return out

    def _remove(self, rows: set[int]) -> None:
        if not rows:
            return
        keep = [i for i in range(len(self._running)) if i not in rows]
        with self._lock:
            self._running = [self._running[i] for i in keep]
        self._batch.keep(keep)


def _numpy_rows(logits: torch.Tensor, seqs: list[Request]) -> list[Any]:
    """Each row of ``logits`` (B, V) as float32 NumPy, exactly what :meth:`_sample`'s argmax
    saw, for the requests that asked for logprobs (None for the others)."""
    if all(s.params.logprobs is None for s in seqs):
        return [None] * len(seqs)
    rows = logits.float().cpu().numpy()
    return [row if s.params.logprobs is not None else None for row, s in zip(rows, seqs)]


def _generator(seq: Request) -> torch.Generator | None:
    """The request's own RNG (seeded if it asked), None for greedy."""
    if seq.params.temperature <= 0:
        return None
    generator = torch.Generator(device="cpu")
    if seq.params.seed is None:
        generator.seed()
    else:
        # torch takes 64-bit seeds; larger ones (the API bounds none) wrap, as two's
        # complement already does for negative ones, instead of failing the request.
        generator.manual_seed(seq.params.seed % 2**64)
    return generator
