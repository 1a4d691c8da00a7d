"""Continuous batching on llama.cpp for GGUF models, through llama-cpp-python's low-level API.

The high-level ``Llama`` class runs one sequence at a time. Here one
``llama_context`` holds a KV cache shared by up to ``max_batch_size``
sequences, each with its own sequence id (its *slot*), and every scheduler
step is ONE ``llama_decode`` of a ``llama_batch`` that holds

- one token per running request (its last sampled token, at its next
  position, logits wanted), and
- the next chunk of every prompt still being prefilled, up to
  ``prefill_tokens_per_step`` tokens in all (logits only for a prompt's last
  token), so a long prompt never stalls running streams for long.

Requests join the batch the step after they arrive and leave the step they
finish, giving their sequence id back at once. Greedy requests take the
argmax of their logits row; sampled ones run their own llama.cpp sampler
chain (temperature → top-p → a seeded draw), so a seed reproduces a request
whatever else runs.

Same greedy output alone or in a batch. Two things would make a request's
tokens depend on what else runs, and both are avoided:

- kernels: llama.cpp multiplies a one-row batch with ``vec_dot`` and larger
  ones with tinyBLAS, which round differently; flash attention computes each
  query row on its own, so attention is the same for any batch (Q4 weights
  always take ``vec_dot``);
- KV cell order: attention sums a sequence's cells in cache order. Freeing a
  finished sequence's cells leaves holes that llama.cpp fills with the next
  tokens of the sequences still running, out of order, and on a model with
  quantised activations that rounding flips greedy choices (measured: 3 of 4
  long requests diverged). So a finished sequence's cells are *retired*
  (re-tagged to a spare sequence id, no hole, no copy) and freed together
  (``llama_memory_seq_rm``; ``llama_kv_self_seq_rm`` in older bindings) when
  the batch drains, when retired cells outgrow live ones (past
  ``retired_cells_max``), or when a new request needs the room. Only those
  last two reorder; outputs can then differ from a lone run where two logits
  are nearly tied.

Prefix caching (:mod:`.prefix_cache`). A request that finishes hands its cells
(prompt and completion) to one of ``PREFIX_SEQ_IDS`` more spare sequence ids
instead of retiring them: re-tagged, no copy, no hole. A later prompt that
shares at least ``MIN_REUSE_TOKENS`` leading tokens with such an entry has the
common cells tagged with its own sequence id too (``seq_cp`` over positions
``[0, n)``: shared, not copied) and prefills from position ``n``. The cells hold
what a fresh prefill would write (same tokens and positions, row-independent
kernels: the batch self-check below checks that), and the prompt's cells keep
their order, so greedy output equals the uncached run's unless evictions left
holes that later cells filled (as above). Entries hold at most
``prefix_cache_cells`` cells in all, least recently used going first; they also
go, oldest first, when a new request needs the room.

Weights stay in llama.cpp's plain CPU buffers. Its "extra" buffer types
(AMX tiles on Intel Xeons, repacked Q4_0/Q4_K layouts) run one-row matmuls
with other kernels than many-row ones; on AMX CPUs that made batched greedy
output diverge, into garbage. And since no test on one machine covers every
CPU, the engine checks the one it runs on when it loads
(:mod:`maas_ray.engines.batch_check`): if a request's logits alone and in a
batch differ, it says so loudly and decodes one request at a time.

Admission reserves ``prompt + max_tokens`` KV cells per request and never
overcommits ``kv_cells``, so a running request never fails for lack of cache.
One client request (its ``n`` choices) may reserve at most
``max_request_share`` of ``kv_cells`` while it runs anything, so ``n=16`` with
``max_tokens`` near the context runs a few choices at a time instead of taking
every cell while everyone else waits (see :mod:`.batching`).

Tokenisation, the chat template and detokenisation use the version's Hugging
Face tokenizer (or one built from the GGUF's own vocabulary), exactly as the
transformers engine does, so both engines count and decode tokens alike.

llama-cpp-python is optional (a ~5-minute source build; ``make install``
builds it once into the pip cache): it is imported when an engine is made.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from maas_ray.engines.batch_check import BatchCheck
from maas_ray.engines.batching import BatchingEngine
from maas_ray.engines.prefix_cache import PrefixCache
from maas_ray.engines.sequence import Request

logger = logging.getLogger(__name__)

PREFIX_SEQ_IDS = 8
"""Sequence ids set aside for prefix-cache entries (so at most this many entries); llama.cpp
allows 64 ids per context in all, the running slots and the retired cells' id included."""
_MAX_SEQ_IDS = 64

from maas_ray.engines.llamacpp_lib import (  # noqa: F401 - re-exported
    INSTALL_HINT, KVCells, LlamaCppUnavailable, llama_cpp_available, load_llama_cpp,
    plain_weight_buffers)


@dataclass(eq=False)
class _Slot:
    """What a running request holds in llama.cpp."""

    seq_id: int
    reserved: int  # KV cells promised to this request (prompt + max_tokens)
    n_past: int = 0  # tokens of this sequence already in the KV cache
    sampler: Any = None  # llama_sampler chain, None for greedy


class LlamaCppEngine(BatchingEngine):
    """Continuous batching over one GGUF file with llama.cpp (CPU by default).

    ``tokenizer_dir``: a folder with the HF tokenizer (a registry version); by
    default the tokenizer is built from the GGUF's vocabulary. ``kv_cells``:
    KV cache size shared by all sequences (a request's own context is the
    model's, capped at this). ``n_threads``: llama.cpp compute threads
    (default: the CPUs this process may use). ``retired_cells_max``: finished
    requests' cells kept (see the module doc) beyond the live ones before
    they are freed while others still run. ``flash_attn=False`` trades
    batch-independent greedy output for llama.cpp's matmul attention (the
    self-check then finds the difference and the engine decodes one request at
    a time). ``self_check=False`` skips the load-time batch check (~1 s).
    ``max_request_share``: the most of the slots and KV cells one client
    request may hold while it runs anything (its first sequence always starts).
    ``prefix_cache_cells``: the most KV cells finished requests may keep for reuse by
    prompts that start alike (see the module doc; 0 turns prefix caching off); they
    count against ``kv_cells`` and give way to new requests that need the room.
    """

    def __init__(self, gguf_path: Path | str, tokenizer_dir: Path | str | None = None,
                 max_batch_size: int = 16, prefill_tokens_per_step: int = 512,
                 kv_cells: int = 16384, n_threads: int | None = None, flash_attn: bool = True,
                 retired_cells_max: int = 2048, self_check: bool = True,
                 max_request_share: float = 0.5, prefix_cache_cells: int = 4096) -> None:
        super().__init__(max_batch_size, max_request_share)
        self._lib = load_llama_cpp()
        self.gguf_path = Path(gguf_path)
        if not self.gguf_path.is_file():
            raise FileNotFoundError(f"GGUF file {self.gguf_path} does not exist")
        self.prefill_tokens_per_step = prefill_tokens_per_step
        self.kv_cells = kv_cells
        self.flash_attn = flash_attn
        self.retired_cells_max = retired_cells_max
        self.n_threads = n_threads or len(os.sched_getaffinity(0))
        self.self_check = self_check
        self.batch_check: BatchCheck | None = None
        self.warning: str | None = None
        self.tokenizer, hf_eos = _hf_tokenizer(self.gguf_path, tokenizer_dir)
        self._hf_eos = hf_eos
        self._free_ids = list(range(max_batch_size))
        self._retired_id = max_batch_size  # the spare sequence id finished cells move to
        n_cache_ids = max(0, min(PREFIX_SEQ_IDS, _MAX_SEQ_IDS - max_batch_size - 1))
        self._cache_ids = list(range(max_batch_size + 1, max_batch_size + 1 + n_cache_ids))  # free ones
        self._n_seq = max_batch_size + 1 + n_cache_ids
        self.prefix_cache: PrefixCache[int] = PrefixCache(prefix_cache_cells if n_cache_ids else 0, "cells",
                                                          free=self._forget_entry)
        self._retired = 0  # cells tagged with it
        self._reserved = 0  # KV cells promised to admitted requests
        self._kv_used = 0  # cells of running sequences, as llama.cpp last reported them
        self._start("maas-llamacpp-scheduler")

    # -- the backend's part ------------------------------------------------------
    def _load(self) -> None:
        lib = self._lib
        lib.llama_backend_init()
        mparams = lib.llama_model_default_params()
        self._overrides = plain_weight_buffers(lib, mparams)  # kept alive: read during the load
        self._model = lib.llama_model_load_from_file(str(self.gguf_path).encode(), mparams)
        if not self._model:
            raise ValueError(f"llama.cpp could not load {self.gguf_path} (not a GGUF model it supports)")
        cparams = lib.llama_context_default_params()
        self.max_batch_tokens = self.prefill_tokens_per_step + self.max_batch_size
        cparams.n_ctx = self.kv_cells
        cparams.n_batch = cparams.n_ubatch = self.max_batch_tokens  # one step = one graph
        cparams.n_seq_max = self._n_seq  # + the retired cells' id and the prefix cache's
        cparams.n_threads = cparams.n_threads_batch = self.n_threads
        cparams.no_perf = True
        cparams.flash_attn = self.flash_attn
        self._ctx = lib.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            lib.llama_model_free(self._model)
            raise RuntimeError(f"llama.cpp could not create a context for {self.gguf_path}")
        self._kv = KVCells(lib, self._ctx)
        vocab = lib.llama_model_get_vocab(self._model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(vocab))
        self.context_length = min(int(lib.llama_model_n_ctx_train(self._model)), self.kv_cells)
        # The model's EOS as transformers sees it, plus every end-of-generation
        # token llama.cpp knows (what llama-cpp-python itself stops on).
        eog = {t for t in range(self.n_vocab) if lib.llama_vocab_is_eog(vocab, t)}
        self.eos_ids = frozenset(eog | self._hf_eos)
        self._batch = lib.llama_batch_init(self.max_batch_tokens, 0, 1)
        cap = self.max_batch_tokens
        self._b_token = np.ctypeslib.as_array(self._batch.token, shape=(cap,))
        self._b_pos = np.ctypeslib.as_array(self._batch.pos, shape=(cap,))
        self._b_nseq = np.ctypeslib.as_array(self._batch.n_seq_id, shape=(cap,))
        self._b_logits = np.ctypeslib.as_array(self._batch.logits, shape=(cap,))
        self._b_seq = [self._batch.seq_id[i] for i in range(cap)]
        self._b_nseq[:] = 1
        self._check_batching()

    def _check_batching(self) -> None:
        """Run the batch self-check; fall back to one request at a time if it fails."""
        from maas_ray.engines.batch_check import check_batch_invariance

        if self.max_batch_size < 2 or not self.self_check:
            return
        self.batch_check = check_batch_invariance(self)
        if self.batch_check.batch_invariant:
            logger.info("llama.cpp batch self-check passed for %s (%.2f s)", self.gguf_path.name,
                        self.batch_check.seconds)
            return
        self.warning = (
            f"llama.cpp on this machine is not batch-invariant for {self.gguf_path.name}: a request's "
            f"logits changed by up to {self.batch_check.max_logit_diff:.3g} when others ran beside it "
            f"(greedy tokens {'agree' if self.batch_check.tokens_agree else 'DIFFER'}). Serving one "
            "request at a time (max_batch_size 1) so answers stay correct; rebuild llama-cpp-python "
            "as the README says, or serve this model with the transformers engine.")
        logger.error("BATCH SELF-CHECK FAILED: %s", self.warning)
        self.max_batch_size = 1
        self._free_ids = [0]

    def info(self) -> dict[str, Any]:
        return {"engine": "llama.cpp", "max_batch_size": self.max_batch_size,
                "batch_check": self.batch_check.as_dict() if self.batch_check else None,
                "warning": self.warning}

    def _shutdown(self) -> None:
        lib = self._lib
        lib.llama_batch_free(self._batch)
        lib.llama_free(self._ctx)
        lib.llama_model_free(self._model)

    def _scheduler_stats(self) -> dict[str, int]:
        """KV cells of running sequences (as llama.cpp reported them after the
        last step), cells of finished ones not freed yet, and the cache size."""
        return {"kv_cells_used": self._kv_used, "kv_cells_retired": self._retired, "kv_cells": self.kv_cells}

    def _need(self, seq: Request) -> int:
        """KV cells ``seq`` may fill: its prompt and every token it may generate."""
        return min(len(seq.prompt) + seq.params.max_tokens, self.context_length)

    def _group_may_grow(self, seq: Request, mates: list[Request]) -> bool:
        held = sum(m.state.reserved for m in mates)
        return super()._group_may_grow(seq, mates) and (
            not mates or held + self._need(seq) <= self.max_request_share * self.kv_cells)

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._free_ids or (seq := self._next_waiting()) is None:
                    return
                need = self._need(seq)
                if self._reserved + self._retired + self.prefix_cache.used + need > self.kv_cells:
                    if self._retired:
                        self._free_retired()
                        continue
                    if self.prefix_cache.evict_lru():
                        continue
                    return  # the fairest request waits until running ones give cells back
                self._waiting.remove(seq)
                seq.state = slot = _Slot(self._free_ids.pop(), need, sampler=self._sampler(seq))
                if hit := self.prefix_cache.lookup(seq.prompt):  # its cells, shared: prefill the rest
                    self._kv.share(hit.entry.value, slot.seq_id, hit.n)
                    slot.n_past = hit.n
                    self.prefix_cache.use(hit)
                self._reserved += need
                self._running.append(seq)  # visible to stats() while it prefills

    def _step(self) -> None:
        n, rows = 0, []  # rows: (batch index, request) whose logits are sampled
        budget = self.prefill_tokens_per_step
        fed: list[tuple[Request, int]] = []  # (request, tokens added this step)
        for seq in self._running:
            slot: _Slot = seq.state
            if slot.n_past >= len(seq.prompt):  # decoding: feed the last sampled token
                tokens = seq.generated[-1:]
            elif budget > 0:  # prefilling: the next chunk of the prompt
                tokens = seq.prompt[slot.n_past:slot.n_past + budget]
                budget -= len(tokens)
            else:
                continue
            k = len(tokens)
            self._b_token[n:n + k] = tokens
            self._b_pos[n:n + k] = np.arange(slot.n_past, slot.n_past + k)
            self._b_logits[n:n + k] = 0
            for i in range(n, n + k):
                self._b_seq[i][0] = slot.seq_id
            if slot.n_past + k >= len(seq.prompt):  # wants the next token's logits
                self._b_logits[n + k - 1] = 1
                rows.append((n + k - 1, seq))
            fed.append((seq, k))
            n += k
        self._batch.n_tokens = n
        self._decode()
        for seq, k in fed:
            seq.state.n_past += k
        done = [seq for i, seq in rows if self._accept(seq, *self._sample(seq, i))]
        self._remove({i for i, seq in enumerate(self._running) if seq in done})
        self._kv_used = self._kv.used(self.max_batch_size)

    def _decode(self) -> None:
        status = self._lib.llama_decode(self._ctx, self._batch)
        if status == 1 and self._retired:  # no contiguous room (llama.cpp defragmented already)
            self._free_retired()
            status = self._lib.llama_decode(self._ctx, self._batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status} "
                               f"({self._batch.n_tokens} tokens, {len(self._running)} sequences)")

    def _sample(self, seq: Request, index: int) -> tuple[int, np.ndarray | None]:
        """The next token of batch row ``index``, and its raw logits (V,) if ``seq`` asked for
        logprobs (read before the sampler runs: the chain works on its own copy; before the
        grammar's mask, so they are the model's own distribution)."""
        slot: _Slot = seq.state
        logits = raw = None
        if slot.sampler is None or seq.params.logprobs is not None or seq.constraint is not None:
            logits = np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self._ctx, index), shape=(self.n_vocab,))
            raw = logits
        if seq.constraint is not None:  # in llama.cpp's own buffer, which its sampler chain reads
            if seq.params.logprobs is not None:
                raw = logits.copy()
            logits[~seq.constraint.allowed(self.n_vocab)] = -np.inf
        if slot.sampler is not None:
            token = int(self._lib.llama_sampler_sample(slot.sampler, self._ctx, index))
        else:
            token = int(np.argmax(logits))
        return token, raw if seq.params.logprobs is not None else None

    def _sampler(self, seq: Request) -> Any:
        """temperature → top-p → seeded draw, as the transformers engine samples; None for greedy."""
        p = seq.params
        if p.temperature <= 0:
            return None
        lib = self._lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(p.temperature))
        if p.top_p < 1.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(p.top_p, 1))
        seed = lib.LLAMA_DEFAULT_SEED if p.seed is None else min(p.seed % 2**32, 2**32 - 2)
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed))
        return chain

    def _remove(self, rows: set[int]) -> None:
        if not rows:
            return
        leaving = [self._running[i] for i in sorted(rows)]
        with self._lock:
            self._running = [s for i, s in enumerate(self._running) if i not in rows]
        for seq in leaving:
            slot: _Slot = seq.state
            if not self._keep_prefix(seq):
                self._kv.retag(slot.seq_id, self._retired_id)  # no hole (see the module doc)
                self._retired += slot.n_past
            if slot.sampler is not None:
                self._lib.llama_sampler_free(slot.sampler)
                slot.sampler = None
            with self._lock:
                self._free_ids.append(slot.seq_id)
                self._reserved -= slot.reserved
        self._kv_used = self._kv.used(self.max_batch_size)
        if not self._running or self._retired > max(self._kv_used, self.retired_cells_max):
            self._free_retired()

    def _keep_prefix(self, seq: Request) -> bool:
        """Hand a finished request's cells to a prefix-cache entry; False if they are not kept
        (too few, already cached, over the bound). Cancelled, timed-out and failed requests
        keep nothing: a failed decode may have left their cells half-written."""
        slot: _Slot = seq.state
        tokens = (seq.prompt + seq.generated)[:slot.n_past]  # the last sampled token was never fed
        if not seq.done or not self.prefix_cache.wants(tokens, slot.n_past):
            return False
        if not self._cache_ids:
            self.prefix_cache.evict_lru()  # gives its sequence id back
        cache_id = self._cache_ids.pop()
        self._kv.retag(slot.seq_id, cache_id)
        self.prefix_cache.put(tokens, cache_id, slot.n_past)
        return True

    def _forget_entry(self, cache_id: int) -> None:
        """Free a prefix-cache entry's cells (those no running sequence shares) and its id."""
        self._kv.forget(cache_id)
        self._cache_ids.append(cache_id)

    def _free_retired(self) -> None:
        self._kv.forget(self._retired_id)
        self._retired = 0


def _hf_tokenizer(gguf_path: Path, tokenizer_dir: Path | str | None) -> tuple[Any, frozenset[int]]:
    """The HF tokenizer and EOS ids the transformers engine would use for this model."""
    from transformers import AutoTokenizer, GenerationConfig

    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    folder = Path(tokenizer_dir) if tokenizer_dir else None
    if folder is None or not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        folder, kwargs["gguf_file"] = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
    try:
        eos = GenerationConfig.from_pretrained(str(folder), **kwargs).eos_token_id
    except OSError:  # no generation config: the tokenizer's EOS below
        eos = None
    eos_ids = eos if isinstance(eos, list) else [eos]
    return tokenizer, frozenset(i for i in [*eos_ids, tokenizer.eos_token_id] if i is not None)
