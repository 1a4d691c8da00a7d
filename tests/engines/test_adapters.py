"""Many LoRA adapters on one base in the transformers engine (no Ray): rows of one batch
decode with different tenants' adapters, or none; an evicted adapter reloads to the same
output; an adapter served this way answers as the merged model that was served before.

The two adapters (tests/lora_facts.py) each learned a different secret word for the same
question, which the base model does not know.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from maas_ray.engines import SamplingParams, TransformersEngine
from maas_ray.registry.adapters import merge_adapter
from tests.lora_facts import QUESTION, SECRETS

CHAT = "smollm2-135m-instruct"


async def _answer(engine: TransformersEngine, adapter: str | None, rid: str, max_tokens: int = 12) -> str:
    ids = engine.apply_chat_template(QUESTION)
    text = ""
    async for chunk in engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True,
                                                           adapter=adapter), rid):
        text += chunk.text
    return text


def test_two_tenants_adapters_and_the_base_decode_in_one_batch(llm_dirs, taught_adapters) -> None:
    with TransformersEngine(llm_dirs[CHAT], max_batch_size=4) as engine:
        for name, path in taught_adapters.items():
            engine.add_adapter(name, path)
        peak = 0

        async def main() -> list[str]:
            nonlocal peak
            tasks = [asyncio.create_task(_answer(engine, name, f"r{i}"))
                     for i, name in enumerate([*SECRETS, None])]
            while not all(t.done() for t in tasks):
                peak = max(peak, engine.stats()["running"])
                await asyncio.sleep(0.005)
            return [t.result() for t in tasks]

        a, b, base = asyncio.run(main())
        stats = engine.stats()
    assert peak == 3, f"the three requests never ran in one batch (peak {peak})"
    assert "pineapple" in a.lower() and "volcano" not in a.lower(), a
    assert "volcano" in b.lower() and "pineapple" not in b.lower(), b
    assert "pineapple" not in base.lower() and "volcano" not in base.lower(), base
    assert stats["adapters"] == 2 and stats["adapter_loads"] == 2 and stats["adapter_evictions"] == 0


def test_an_evicted_adapter_reloads_to_the_same_output(llm_dirs, taught_adapters) -> None:
    one = sum(p.stat().st_size for p in taught_adapters["tenant-a"].glob("*.safetensors"))
    # Room for one adapter: each load evicts the other (neither is in use in between).
    with TransformersEngine(llm_dirs[CHAT], max_batch_size=2, adapter_cache_max_bytes=int(one * 1.5)) as engine:
        for name, path in taught_adapters.items():
            engine.add_adapter(name, path)
        first = asyncio.run(_answer(engine, "tenant-a", "a1"))
        other = asyncio.run(_answer(engine, "tenant-b", "b1"))
        again = asyncio.run(_answer(engine, "tenant-a", "a2"))
        stats = engine.stats()
        with pytest.raises(ValueError, match="not added"):
            asyncio.run(_answer(engine, "tenant-c", "c1"))
    assert stats["adapter_loads"] == 3 and stats["adapter_evictions"] == 2 and stats["adapters"] == 1
    assert "volcano" in other.lower()
    assert again == first and "pineapple" in first.lower()


def test_an_adapter_answers_as_its_merged_model(llm_dirs, taught_adapters, tmp_path) -> None:
    """Served unmerged (x·W + x·A·B·s) or merged (x·(W + B·A·s)), the weights round
    differently by ~1e-6: the taught answer, far from any tie, comes out the same."""
    merged = tmp_path / "merged"
    merge_adapter(Path(llm_dirs[CHAT]), taught_adapters["tenant-b"], merged)
    with TransformersEngine(merged, max_batch_size=2) as engine:
        want = asyncio.run(_answer(engine, None, "m", max_tokens=8))
    with TransformersEngine(llm_dirs[CHAT], max_batch_size=2) as engine:
        engine.add_adapter("tenant-b", taught_adapters["tenant-b"])
        got = asyncio.run(_answer(engine, "tenant-b", "u", max_tokens=8))
    assert got == want and "volcano" in got.lower()


def test_adapter_features_this_path_cannot_apply_are_refused_by_name(tmp_path) -> None:
    import json

    from maas_ray.engines.adapters import read_adapter

    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_dora": True, "modules_to_save": ["lm_head"]}))
    with pytest.raises(ValueError, match="use_dora, modules_to_save not supported"):
        read_adapter(tmp_path)
