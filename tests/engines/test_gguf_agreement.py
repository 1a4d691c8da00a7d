"""The default chat engine answers as the weights do: llama.cpp on the base version's GGUF
against the transformers engine on the same version's safetensors, greedy, over the 36
shipped prompts (tests/engines/data/greedy_prompts.json). No Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from maas_ray.engines.agreement import agreement, greedy, load_prompts

pytest.importorskip("llama_cpp", reason="llama.cpp engine not installed (make install LLAMACPP=0)")
pytestmark = pytest.mark.slow

CHAT = "smollm2-135m-instruct"
PROMPTS = Path(__file__).parent / "data" / "greedy_prompts.json"
MAX_TOKENS = 32


def test_llama_cpp_on_the_base_gguf_agrees_with_transformers(llm_dirs: dict[str, str]) -> None:
    from maas_ray.registry.gguf_export import DEFAULT_OUTTYPE
    from maas_ray.registry.importer import _gguf_file_type
    from maas_ray.engines import LlamaCppEngine, TransformersEngine

    folder = Path(llm_dirs[CHAT])
    # The type benchmarks/gguf_agreement.py chose; the shipped Q4_1 agreed less (README).
    assert _gguf_file_type(folder / "model.gguf") == f"MOSTLY_{DEFAULT_OUTTYPE.upper()}"
    prompts = load_prompts(PROMPTS)
    assert len(prompts) >= 30
    with TransformersEngine(folder, max_batch_size=16) as ref_engine:
        reference = greedy(ref_engine, prompts, MAX_TOKENS)
    with LlamaCppEngine(folder / "model.gguf", tokenizer_dir=folder, max_batch_size=16) as engine:
        got = greedy(engine, prompts, MAX_TOKENS)
    agree = agreement(got, reference)
    # Measured on a 2-core AVX-512 machine: exact 0.47, prefix 0.73, first token 0.94 (the
    # shipped Q4_1: 0.47 / 0.68 / 0.89). Margins for other CPUs' rounding; activations are
    # quantised to 8 bits, so exact 32-token agreement is not expected.
    assert agree.first_token >= 0.85 and agree.prefix >= 0.65, agree
    assert agree.exact >= 0.3, agree
