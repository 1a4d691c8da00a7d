"""Is this llama.cpp build batch-invariant here? A check the engine runs when it loads.

Whether a request's logits depend on what else is in its ``llama_decode``
depends on the CPU and on how llama.cpp was built: on Intel CPUs with AMX a
native build runs one-row matmuls with AVX-512 VNNI kernels and larger ones
with AMX tiles, and batched greedy output turned to garbage there (issue "Right
answers on every machine"). No test on one machine covers every CPU, so the
engine checks the machine it runs on.

The check decodes a few fixed chat prompts, each alone, then all of them
together, the check prompt joining while the others already decode (as a
request joins a running batch). In the batched run every row is fed the tokens
its lone run chose (teacher forcing), so one near-tie cannot snowball into a
different text: what is compared is the logits of the same inputs, alone and
batched. The engine serves with its batch only if they are identical
(:data:`LOGIT_TOLERANCE`); otherwise it decodes one request at a time and says so.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from maas_ray.engines.llamacpp_engine import LlamaCppEngine

CHECK_PROMPTS = (
    "What is the capital of France? Answer in one word.",
    "Count from 1 to 10, separated by commas.",
    "Write one sentence about the sea.",
    "Name three colours.",
)
CHECK_STEPS = 8
"""Tokens decoded per prompt (after its prefill): enough to cross several KV layouts."""
LOGIT_TOLERANCE = 0.0
"""Batched only if bit-identical. Where kernels are row-independent (plain CPU buffers,
flash attention; see the engine's module doc) the difference is exactly 0, and then
"greedy alone == greedy in any batch" holds for every prompt, not just these four.
Rounding-level differences (another accumulation order) would flip greedy tokens at
near-ties; the AMX divergence seen moved logits by whole units."""


@dataclass(frozen=True)
class BatchCheck:
    """What the load-time check found; shown in logs and in ``/v1/models``."""

    batch_invariant: bool
    max_logit_diff: float
    tokens_agree: bool
    """Every lone greedy token is also the batched row's argmax."""
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_batch_invariance(engine: LlamaCppEngine) -> BatchCheck:
    """Decode :data:`CHECK_PROMPTS` alone and together on ``engine``'s context (scheduler
    thread, before any request is admitted); leaves the KV cache empty."""
    started = time.perf_counter()
    n = min(len(CHECK_PROMPTS), engine.max_batch_size)
    prompts = [engine.apply_chat_template([{"role": "user", "content": text}])
               for text in CHECK_PROMPTS[:n]]
    alone = [_decode(engine, [p], [0], forced=None)[0] for p in prompts]
    chosen = [[int(np.argmax(row)) for row in rows] for rows in alone]
    # Prompt 0 joins at step 2, beside sequences that already decode.
    together = _decode(engine, prompts, [2, 0, 0, 1][:n], forced=chosen)
    diff = max(float(np.max(np.abs(a - b))) for rows_a, rows_b in zip(alone, together)
               for a, b in zip(rows_a, rows_b))
    agree = all(int(np.argmax(b)) == t for rows_b, toks in zip(together, chosen)
                for b, t in zip(rows_b, toks))
    return BatchCheck(diff <= LOGIT_TOLERANCE and agree, diff, agree,
                      round(time.perf_counter() - started, 3))


def _decode(engine: LlamaCppEngine, prompts: list[list[int]], start_at: list[int],
            forced: list[list[int]] | None) -> list[list[np.ndarray]]:
    """Logits rows (prefill's last, then one per step) of each prompt on sequence ids
    0..n-1. Prompt ``i`` starts at step ``start_at[i]``, is prefilled in chunks that fit
    the engine's batch, then fed ``forced[i]`` (else its own argmax)."""
    lib, n = engine._lib, len(prompts)
    for seq in range(n):
        engine._kv.forget(seq)
    out: list[list[np.ndarray]] = [[] for _ in prompts]
    n_past = [0] * n
    step = 0
    while any(len(rows) <= CHECK_STEPS for rows in out):
        rows, k = [], 0
        room = engine.max_batch_tokens - n  # a token for every decoding row stays free
        for i, prompt in enumerate(prompts):
            if step < start_at[i] or len(out[i]) > CHECK_STEPS:
                continue
            if n_past[i] < len(prompt):  # prefilling
                tokens = prompt[n_past[i]:n_past[i] + max(room, 1)]
                room -= len(tokens)
                if not tokens:
                    continue
            else:
                j = len(out[i]) - 1
                tokens = [forced[i][j] if forced else int(np.argmax(out[i][-1]))]
            done_prefill = n_past[i] + len(tokens) >= len(prompt)
            for t, tok in enumerate(tokens):
                engine._b_token[k] = tok
                engine._b_pos[k] = n_past[i] + t
                engine._b_seq[k][0] = i
                engine._b_logits[k] = done_prefill and t == len(tokens) - 1
                k += 1
            if done_prefill:
                rows.append((k - 1, i))
            n_past[i] += len(tokens)
        engine._batch.n_tokens = k
        if k:
            status = lib.llama_decode(engine._ctx, engine._batch)
            if status != 0:
                raise RuntimeError(f"batch self-check: llama_decode failed with status {status}")
        for index, i in rows:
            ptr = lib.llama_get_logits_ith(engine._ctx, index)
            out[i].append(np.ctypeslib.as_array(ptr, shape=(engine.n_vocab,)).copy())
        step += 1
    for seq in range(n):
        engine._kv.forget(seq)
    return out
