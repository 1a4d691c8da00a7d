"""Greedy agreement between two engines on the same weights: how close a fast engine
(llama.cpp on a GGUF) answers to the reference (transformers on the safetensors).

Used to pick the GGUF type the base model is imported with and fine-tunes are
exported to (``benchmarks/gguf_agreement.py``), and by a test that keeps that
agreement from falling back (``tests/serve/test_gguf_agreement.py``).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

from maas_ray.engines.engine import GenerationEngine, SamplingParams



def load_prompts(path: Path) -> list[str]:
    """A prompt set such as ``tests/engines/data/greedy_prompts.json`` (``{"prompts": [{"text"}]}``)."""
    return [p["text"] for p in json.loads(path.read_text())["prompts"]]


def greedy(engine: GenerationEngine, prompts: list[str], max_tokens: int) -> list[list[int]]:
    """Every prompt's greedy completion (chat template applied), all submitted at once."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)

    async def one(i: int, text: str) -> list[int]:
        ids = engine.apply_chat_template([{"role": "user", "content": text}])
        return [t for chunk in [c async for c in engine.generate(ids, params, f"agree-{i}")]
                for t in chunk.token_ids]

    async def main() -> list[list[int]]:
        return list(await asyncio.gather(*(one(i, t) for i, t in enumerate(prompts))))

    return asyncio.run(main())


@dataclass(frozen=True)
class Agreement:
    exact: float
    """Share of prompts whose whole completion equals the reference's."""
    prefix: float
    """Mean share of the reference's tokens matched before the first difference."""
    first_token: float
    """Share of prompts whose first token equals the reference's."""


def agreement(outputs: list[list[int]], reference: list[list[int]]) -> Agreement:
    def common(a: list[int], b: list[int]) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    pairs = list(zip(outputs, reference, strict=True))
    return Agreement(
        exact=sum(a == b for a, b in pairs) / len(pairs),
        prefix=sum(common(a, b) / max(len(b), 1) for a, b in pairs) / len(pairs),
        first_token=sum(bool(a) and bool(b) and a[0] == b[0] for a, b in pairs) / len(pairs))
