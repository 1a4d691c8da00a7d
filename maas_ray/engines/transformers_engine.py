"""Iteration-level (continuous) batching on any transformers causal LM.

One scheduler thread owns the model (torch releases the GIL inside ops, so the
event loop stays responsive). Every step it

1. drops cancelled requests and admits waiting ones: those that arrived
   together are prefilled in ONE forward, left-padded and masked, and their KV
   cache joins the running batch (:mod:`.kv_batch`), so 16 arrivals wait for
   one prefill instead of for up to 16 in a row;
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

Greedy output equals ``generate``'s up to a stated tolerance, not bit for bit.
A lone prompt, or prompts of one length, run unpadded and unmasked: row for
row what ``generate`` runs. Two things round differently: CPU GEMM kernels for
1 row and for many (decode batches, ≈1e-5 on SmolLM2's logits), and, in a
padded prefill, the attention reductions over a longer, partly masked row (a
masked key adds an exact zero, but the order of the sum changes). Together
they move SmolLM2's logits by < 1e-4 (``PREFILL_LOGIT_TOLERANCE``, checked by
tests/engines/test_llm_engine.py on every run), so a greedy token can differ
from single-sequence ``generate`` only where its top two logits are closer
than 2e-4.

Prefix caching (:mod:`.prefix_cache`). A request that finishes leaves a copy of
its row of the batch's KV cache (padding cut off: prompt and completion), up to
``prefix_cache_max_bytes`` in all. A prompt that shares at least
``MIN_REUSE_TOKENS`` leading tokens with an entry is prefilled on its own: only
its new tokens, on top of the entry's keys and values cut to the common part.
Those keys and values were computed in another forward (a padded prefill, batched
decode steps), so they are the ones a fresh prefill would compute up to the same
rounding as above: logits move by < ``PREFIX_LOGIT_TOLERANCE`` (checked by
tests/engines/test_prefix_cache.py), and a greedy token can differ from the
uncached run's only where its top two logits are closer than twice that.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from maas_ray.engines.adapters import Adapters
from maas_ray.engines.batching import BatchingEngine
from maas_ray.engines.kv_batch import BatchCache, check_supported, left_pad
from maas_ray.engines.prefix_cache import Hit, PrefixCache
from maas_ray.engines.sequence import Request

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each (1, heads, n, head_dim)

logger = logging.getLogger(__name__)

PREFILL_LOGIT_TOLERANCE = 1e-4
"""How far batched (padded) prefill may move a logit from the prompt's own prefill."""

PREFIX_LOGIT_TOLERANCE = 1e-4
"""How far prefilling on a cached prefix's keys and values may move a logit from a full prefill."""


class TransformersEngine(BatchingEngine):
    """Continuous batching over a local HF model folder (safetensors, no remote code).

    ``max_batch_size`` caps running sequences (more wait in line);
    ``prefill_tokens_per_step`` caps the tokens of one prefill forward between
    two decode steps, padding included (at least one request), so a burst of
    long prompts stalls running streams for a bounded time;
    ``max_prefill_batch`` caps the prompts in it (1: one at a time, as
    before arrivals were batched); ``max_request_share``: the most of the
    running batch one client request (its ``n`` choices) may hold while it
    runs anything. ``prefix_cache_max_bytes``: the most memory finished requests' keys and
    values may keep for reuse by prompts that start alike (least recently used go first;
    0 turns prefix caching off; SmolLM2-135M in float32 takes 45 KiB a token).
    ``adapter_cache_max_bytes``: the most memory LoRA adapters loaded on this base may
    take (:mod:`.adapters`; least recently used go first, never one in use).
    Thread count: whatever ``torch.set_num_threads`` says in the process.
    """

    def __init__(self, model_dir: Path | str, device: str = "cpu", dtype: torch.dtype | None = None,
                 max_batch_size: int = 16, prefill_tokens_per_step: int = 2048,
                 max_request_share: float = 0.5, max_prefill_batch: int = 16,
                 prefix_cache_max_bytes: int = 256 * 2**20, adapter_cache_max_bytes: int = 256 * 2**20) -> None:
        from transformers import AutoTokenizer, GenerationConfig

        super().__init__(max_batch_size, max_request_share)
        kwargs = {"local_files_only": True, "trust_remote_code": False}
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), **kwargs)
        self.device = torch.device(device)
        self.prefill_tokens_per_step = prefill_tokens_per_step
        self.max_prefill_batch = max(1, max_prefill_batch)
        try:
            eos = GenerationConfig.from_pretrained(str(model_dir), **kwargs).eos_token_id
        except OSError:  # no generation_config.json: the model config's EOS below
            eos = None
        self._eos_from_config = eos
        self._model_dir, self._dtype = str(model_dir), dtype or torch.float32
        self._batch = BatchCache()  # rows aligned with _running
        self.prefix_cache: PrefixCache[KV] = PrefixCache(prefix_cache_max_bytes, "bytes")
        self.adapters = Adapters(adapter_cache_max_bytes)  # scheduler thread only
        self._adapter_dirs: dict[str, str] = {}  # every adapter requests may name, loaded or not
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

    def add_adapter(self, name: str, adapter_dir: Path | str) -> None:
        """Let requests name LoRA adapter ``name`` (``SamplingParams.adapter``): a peft
        folder trained on this base. It loads on the scheduler thread when a request
        that names it is admitted, and leaves again under memory pressure."""
        self._adapter_dirs[name] = str(adapter_dir)

    def has_adapter(self, name: str) -> bool:
        return name in self._adapter_dirs

    def _check_adapter(self, name: str) -> None:
        if name not in self._adapter_dirs:
            raise ValueError(f"LoRA adapter {name!r} was not added to this engine")

    def _scheduler_stats(self) -> dict[str, int]:
        return self.adapters.stats() if self._adapter_dirs else {}

    def _use_adapters(self, seqs: list[Request]) -> None:
        """Name each row's adapter for the next forward, loading those not loaded yet
        (here: the scheduler thread owns the model)."""
        for seq in seqs:
            name = seq.params.adapter
            if name is None:
                continue
            if name in self.adapters:
                self.adapters.touch(name)
            else:
                with self._lock:
                    in_use = {s.params.adapter for s in [*self._running, *self._waiting] if s.params.adapter}
                self.adapters.load(self.model, name, self._adapter_dirs[name], in_use)
        self.adapters.select([seq.params.adapter for seq in seqs], self.device)

    def _admit(self) -> None:
        budget = self.prefill_tokens_per_step
        while True:
            seqs, hit = self._take_arrivals(budget, first=budget == self.prefill_tokens_per_step)
            if not seqs:
                return
            budget -= len(seqs) * max(len(seq.prompt) for seq in seqs) - (hit.n if hit else 0)
            self._prefill(seqs, hit)

    def _take_arrivals(self, budget: int, first: bool) -> tuple[list[Request], Hit[KV] | None]:
        """Waiting requests to prefill in one forward, moved to ``_running`` (visible
        to stats() while they prefill): in admission order, at most
        ``max_prefill_batch``, while their padded size (count × longest prompt)
        stays within ``budget``; the ``first`` forward of a step takes one anyway.
        A request whose prompt starts with a cached prefix goes alone, with that hit."""
        seqs: list[Request] = []
        while len(self._running) < self.max_batch_size and len(seqs) < self.max_prefill_batch:
            with self._lock:
                seq = self._next_waiting()
                if seq is None:
                    break
                # An adapter changes every layer's keys and values: only the base's are cached.
                hit = None if seq.params.adapter else self.prefix_cache.lookup(seq.prompt)
                width = max(len(s.prompt) for s in [*seqs, seq]) - (hit.n if hit else 0)
                if (hit and seqs) or ((len(seqs) + 1) * width > budget and (seqs or not first)):
                    break
                self._waiting.remove(seq)
                self._running.append(seq)
            seqs.append(seq)
            if hit:
                return seqs, hit
        return seqs, None

    def _prefill(self, seqs: list[Request], hit: Hit[KV] | None = None) -> None:
        """Prefill the last ``len(seqs)`` running requests in one forward; stream their first
        tokens. With a ``hit`` (one request), only the prompt past the cached prefix is fed."""
        try:
            for seq in seqs:
                seq.state = _generator(seq)
            self._use_adapters(seqs)
            prompts = [seq.prompt for seq in seqs]
            ids, mask, positions = left_pad(prompts, self.device)  # (b, T) each
            if hit is not None:  # one row, no padding: the cache's length gives the positions
                past = DynamicCache(ddp_cache_data=[(k[:, :, :hit.n], v[:, :, :hit.n]) for k, v in hit.entry.value])
                out = self.model(input_ids=ids[:, hit.n:], cache=past, use_cache=True, logits_to_keep=1)
                self.prefix_cache.use(hit)
            else:
                # logits_to_keep=1: generate() computes only the last position's logits
                # too. Prompts of one length need no mask, so a lone prompt runs exactly
                # what generate() runs for it; see the module doc for padded ones.
                padded = len({len(p) for p in prompts}) > 1
                out = self.model(input_ids=ids, attention_mask=mask if padded else None,
                                 position_ids=positions if padded else None, use_cache=True, logits_to_keep=1)
        except Exception as err:  # noqa: BLE001 - these prompts failed, not the running batch
            logger.exception("prefill of %s failed", [s.request_id for s in seqs])
            with self._lock:
                self._running = self._running[:len(self._running) - len(seqs)]
            for seq in seqs:
                self._retire(seq, err)
            return
        self._batch.add(out.cache, mask)
        rows = out.logits[:, -1, :]  # (b, V)
        first = len(self._running) - len(seqs)
        finished = {first + i for i, (seq, tok, row) in
                    enumerate(zip(seqs, self._sample(rows, seqs), _numpy_rows(rows, seqs)))
                    if self._accept(seq, tok, row)}
        self._remove(finished)

    def _step(self) -> None:
        last = torch.tensor([[s.generated[-1]] for s in self._running], device=self.device)  # (B, 1)
        mask, positions = self._batch.next_step()  # (B, T + 1), (B, 1)
        self._use_adapters(self._running)
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
            if seq.constraint is not None:  # a copy: the raw row stays for logprobs
                allowed = torch.from_numpy(seq.constraint.allowed(row.shape[-1])).to(row.device)
                row = row.masked_fill(~allowed, float("-inf"))
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
        for row in rows:
            self._keep_prefix(row)
        keep = [i for i in range(len(self._running)) if i not in rows]
        with self._lock:
            self._running = [self._running[i] for i in keep]
        self._batch.keep(keep)


    def _keep_prefix(self, row: int) -> None:
        """Copy a finished request's KV (row ``row`` of the batch, padding cut off) into the
        prefix cache. Cancelled, timed-out and failed requests leave nothing: a failed step
        may have left their row half-written, and a client that hung up rarely comes back."""
        seq, cache, mask = self._running[row], self._batch.cache, self._batch.mask
        if not seq.done or cache is None or mask is None or not self.prefix_cache.capacity or seq.params.adapter:
            return
        n = int(mask[row].sum())  # real tokens: a suffix of the row (left padding)
        tokens = (seq.prompt + seq.generated)[:n]  # the last sampled token was never fed
        layers = cache.layers
        size = n * sum(t.shape[1] * t.shape[3] * t.element_size()  # (B, heads, T, head_dim)
                       for layer in layers for t in (layer.keys, layer.values))
        if len(tokens) != n or not self.prefix_cache.wants(tokens, size):
            return
        kv = [(layer.keys[row:row + 1, :, -n:].clone(), layer.values[row:row + 1, :, -n:].clone())
              for layer in layers]  # clones: a view would keep the whole batch tensor alive
        self.prefix_cache.put(tokens, kv, size)


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
