"""Iteration-level (continuous) batching on any transformers causal LM.

One scheduler thread owns the model. Each step it (1) prefills newly arrived
requests one by one — exactly what ``generate`` does for a single prompt — and
merges their KV caches into the running batch (left-padded, masked), then (2)
runs ONE batched decode forward for every running sequence, samples each row
with its own settings, streams the new text, and drops finished or cancelled
rows from the batch. Sequences join and leave at every step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from maas_ray.serve.llm.engine import GenerationChunk, GenerationEngine, SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Seq:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of text already sent
    next_token: int | None = None  # sampled, not yet fed to the model
    finished: bool = False

    def send(self, chunk: GenerationChunk) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, chunk)


class TransformersEngine(GenerationEngine):
    def __init__(self, model_dir: Path | str, device: str = "cpu", dtype: torch.dtype | None = None,
                 max_batch_size: int = 16) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        kwargs = {"local_files_only": True, "trust_remote_code": False}
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), **kwargs)
        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=dtype or torch.float32, **kwargs).to(device).eval()
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        config = self.model.config
        self.context_length = int(getattr(config, "max_position_embeddings", 2048))
        try:
            gen = GenerationConfig.from_pretrained(str(model_dir), **kwargs)
            eos = gen.eos_token_id
        except OSError:
            eos = None
        eos_ids = eos if isinstance(eos, list) else [eos]
        self.stop_ids = {i for i in [*eos_ids, self.tokenizer.eos_token_id] if i is not None}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else next(iter(self.stop_ids), 0)

        self._inbox: queue.Queue[_Seq] = queue.Queue()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._running: list[_Seq] = []
        self._cache = None  # the batch's DynamicCache, rows aligned with _running
        self._mask: torch.Tensor | None = None  # (B, T) 1 = real token
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="maas-llm-engine", daemon=True)
        self._thread.start()

    # -- public API ----------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[GenerationChunk]:
        if self._closed.is_set():
            raise RuntimeError("engine is closed")
        if not prompt_ids:
            raise ValueError("empty prompt")
        gen = None
        if params.temperature > 0 and params.seed is not None:
            gen = torch.Generator(device="cpu").manual_seed(params.seed)
        seq = _Seq(request_id, list(prompt_ids), params, asyncio.get_running_loop(),
                   asyncio.Queue(), gen)
        self._inbox.put(seq)
        self._wake.set()
        finished = False
        try:
            while True:
                chunk = await seq.out.get()
                if isinstance(chunk, BaseException):
                    raise chunk
                finished = chunk.finish_reason is not None
                yield chunk
                if finished:
                    return
        finally:
            if not finished:  # consumer went away (client disconnect, cancellation)
                self.cancel(request_id)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancelled.add(request_id)
        self._wake.set()

    def stats(self) -> dict[str, int]:
        return {"running": len(self._running), "waiting": self._inbox.qsize()}

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def __del__(self) -> None:  # multiplexed eviction drops the engine
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- scheduler -----------------------------------------------------------
    def _loop(self) -> None:
        while not self._closed.is_set():
            try:
                self._drop_cancelled()
                self._admit()
                if not self._running:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self._decode_step()
            except Exception as err:  # noqa: BLE001 - fail the requests, keep the replica
                logger.exception("generation step failed")
                for seq in self._running:
                    seq.loop.call_soon_threadsafe(seq.out.put_nowait, err)
                self._running, self._cache, self._mask = [], None, None

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
        if cancelled:
            self._remove([i for i, s in enumerate(self._running) if s.request_id in cancelled])

    @torch.inference_mode()
    def _admit(self) -> None:
        while len(self._running) < self.max_batch_size:
            try:
                seq = self._inbox.get_nowait()
            except queue.Empty:
                return
            with self._lock:
                if seq.request_id in self._cancelled:
                    self._cancelled.discard(seq.request_id)
                    continue
            ids = torch.tensor([seq.prompt], device=self.device)
            out = self.model(input_ids=ids, use_cache=True)  # prefill, batch of one
            self._merge(seq, out.cache, len(seq.prompt))
            self._accept(seq, self._sample(out.logits[:, -1, :], [seq])[0])
            if seq.finished:
                self._remove([len(self._running) - 1])

    def _merge(self, seq: _Seq, cache, length: int) -> None:
        """Add one prefilled sequence's cache to the batch, left-padding the shorter side."""
        self._running.append(seq)
        new_mask = torch.ones((1, length), dtype=torch.long, device=self.device)
        if self._cache is None:
            self._cache, self._mask = cache, new_mask
            return
        old_len = self._mask.shape[1]
        width = max(old_len, length)
        for mine, theirs in zip(self._cache.layers, cache.layers):
            mine.keys = torch.cat([_lpad(mine.keys, width), _lpad(theirs.keys, width)], dim=0)
            mine.values = torch.cat([_lpad(mine.values, width), _lpad(theirs.values, width)], dim=0)
        self._mask = torch.cat([_lpad(self._mask, width, dim=1), _lpad(new_mask, width, dim=1)], dim=0)

    @torch.inference_mode()
    def _decode_step(self) -> None:
        last = torch.tensor([[s.next_token] for s in self._running], device=self.device)  # (B, 1)
        self._mask = torch.cat([self._mask, torch.ones_like(last)], dim=1)  # (B, T + 1)
        positions = self._mask.sum(dim=1, keepdim=True) - 1  # (B, 1) real tokens before
        out = self.model(input_ids=last, attention_mask=self._mask, position_ids=positions,
                         cache=self._cache, use_cache=True)
        self._cache = out.cache
        tokens = self._sample(out.logits[:, -1, :], self._running)
        done = []
        for i, (seq, token) in enumerate(zip(self._running, tokens)):
            self._accept(seq, token)
            if seq.finished:
                done.append(i)
        self._remove(done)

    def _sample(self, logits: torch.Tensor, seqs: list[_Seq]) -> list[int]:
        """One token per row, each with its own temperature / top_p / seed."""
        out = []
        for row, seq in zip(logits.float(), seqs):
            p = seq.params
            if p.temperature <= 0:
                out.append(int(torch.argmax(row)))
                continue
            probs = F.softmax(row / p.temperature, dim=-1)
            if p.top_p < 1.0:
                sorted_p, order = torch.sort(probs, descending=True)
                keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < p.top_p
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
            out.append(int(torch.multinomial(probs, 1, generator=seq.generator)))
        return out

    def _accept(self, seq: _Seq, token: int) -> None:
        """Record a sampled token and stream whatever new text is safe to send."""
        seq.generated.append(token)
        seq.next_token = token
        finish = None
        if token in self.stop_ids:
            finish = "stop"
        elif len(seq.generated) >= seq.params.max_tokens:
            finish = "length"
        body = [t for t in seq.generated if t not in self.stop_ids]
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        cut = _find_stop(text, seq.params.stop, seq.emitted)
        if cut is not None:
            text, finish = text[:cut], "stop"
        elif finish is None:
            # Hold back a partial multi-byte character or the start of a stop string.
            safe = len(text.rstrip("\ufffd"))
            safe -= _partial_stop(text[:safe], seq.params.stop)
            text = text[:max(safe, seq.emitted)]
        delta = text[seq.emitted:]
        seq.emitted = len(text)
        if delta or finish:
            seq.send(GenerationChunk(delta, [token], finish, len(seq.prompt), len(seq.generated)))
        seq.finished = finish is not None

    def _remove(self, rows: list[int]) -> None:
        if not rows:
            return
        keep = [i for i in range(len(self._running)) if i not in set(rows)]
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(keep, device=self.device)
        self._mask = self._mask[index]
        # Drop columns that are padding in every remaining row.
        trim = int((self._mask.cumsum(dim=1) == 0).all(dim=0).sum())
        self._mask = self._mask[:, trim:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, trim:]
            layer.values = layer.values[index, :, trim:]


def _lpad(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """Left-pad ``t`` with zeros along ``dim`` to ``width``."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)


def _find_stop(text: str, stops: list[str], emitted: int) -> int | None:
    """Index where the earliest stop string starts in the unsent part of ``text``."""
    start = max(0, emitted - max((len(s) for s in stops), default=0))
    hits = [i for s in stops if (i := text.find(s, start)) != -1]
    return min(hits) if hits else None


def _partial_stop(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that begins some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                best = max(best, n)
                break
    return best
