"""llama.cpp builds side by side: batch invariance (the engine's self-check) and speed.

    python benchmarks/llamacpp_builds.py --build default= --build nollamafile=/tmp/lnl \
        --gguf q4_1=path/to/model.Q4_1.gguf --gguf f16=path/to/f16.gguf --tokenizer DIR

Each ``--build LABEL=DIR`` runs in its own process with ``DIR`` first on ``PYTHONPATH``
(a ``pip install --target DIR`` of a llama-cpp-python wheel; empty: the venv's own).
For every GGUF: the batch self-check (largest logit difference alone vs batched) and
our engine's tokens/s at 1 stream (128 tokens) and 16 streams (64 tokens each), EOS
ignored, batching on whatever the check says; ratios against the first build.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any


def tokens_per_s(engine: Any, streams: int, new_tokens: int) -> float:
    """Our engine's total tokens/s for ``streams`` concurrent greedy requests, EOS ignored."""
    from maas_ray.engines import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    async def one(i: int) -> int:
        ids = engine.apply_chat_template([{"role": "user", "content": f"Tell a long story, part {i}."}])
        return len([t async for c in engine.generate(ids, params, f"s{streams}-{i}") for t in c.token_ids])

    async def main() -> int:
        return sum(await asyncio.gather(*(one(i) for i in range(streams))))

    start = time.perf_counter()
    total = asyncio.run(main())
    return total / (time.perf_counter() - start)


def measure(gguf: str, tokenizer: str, threads: int | None) -> dict:
    from maas_ray.engines import LlamaCppEngine
    from maas_ray.engines.batch_check import check_batch_invariance

    with LlamaCppEngine(gguf, tokenizer_dir=tokenizer, max_batch_size=16, n_threads=threads,
                        self_check=False) as eng:
        check = check_batch_invariance(eng)
        tokens_per_s(eng, 1, 8)  # warm-up
        return {"max_logit_diff": check.max_logit_diff, "invariant": check.batch_invariant,
                "tok_s_1": max(tokens_per_s(eng, 1, 128) for _ in range(2)),
                "tok_s_16": tokens_per_s(eng, 16, 64)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="append", required=True, help="LABEL=DIR (DIR may be empty)")
    parser.add_argument("--gguf", action="append", required=True, help="LABEL=PATH")
    parser.add_argument("--tokenizer", required=True, help="folder with the HF tokenizer")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        label, gguf = args.child
        import llama_cpp

        info = llama_cpp.llama_print_system_info().decode()
        print(json.dumps({"version": llama_cpp.__version__, "llamafile": "LLAMAFILE = 1" in info,
                          **measure(gguf, args.tokenizer, args.threads)}))
        return
    rows = {}
    for build in args.build:
        blabel, _, path = build.partition("=")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (path, os.environ.get("PYTHONPATH")) if p))
        for g in args.gguf:
            glabel, _, gpath = g.partition("=")
            cmd = [sys.executable, __file__, "--build", build, "--gguf", g, "--tokenizer", args.tokenizer,
                   "--child", glabel, gpath] + (["--threads", str(args.threads)] if args.threads else [])
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            rows[(blabel, glabel)] = json.loads(out.strip().splitlines()[-1])
            print(blabel, glabel, rows[(blabel, glabel)], flush=True)
    first = args.build[0].partition("=")[0]
    print(f"\n{'build':14} {'gguf':6} {'version':8} {'tinyBLAS':8} {'logit diff':>10} {'invariant':>9} "
          f"{'tok/s 1':>8} {'ratio':>6} {'tok/s 16':>9} {'ratio':>6}")
    for (b, g), r in rows.items():
        base = rows[(first, g)]
        print(f"{b:14} {g:6} {r['version']:8} {str(r['llamafile']):8} {r['max_logit_diff']:10.3g} "
              f"{str(r['invariant']):>9} {r['tok_s_1']:8.1f} {r['tok_s_1'] / base['tok_s_1']:6.2f} "
              f"{r['tok_s_16']:9.1f} {r['tok_s_16'] / base['tok_s_16']:6.2f}")


if __name__ == "__main__":
    main()
