"""What a stop-string check costs the engine thread per token, before and after linear matching.

    python benchmarks/stop_strings.py [--stop-chars 4000] [--tokens 2000]

Four stop strings of ``--stop-chars`` characters each (the most the OpenAI API takes)
that never occur, and a completion of ``--tokens`` tokens of 4 characters: each token
is pushed into a :class:`~maas_ray.engines.detokenize.TextStream` and its safe text
taken, as the engines do. "rescan" is the check as it was before (``find`` of every
stop in the recent text, then the longest stop prefix at the end, tried length by
length: O(len(stop)²) per token); "linear" is today's KMP matcher. No model: a
character-piece tokenizer, so only the stop handling is timed. Writes
``benchmarks/results/stop_strings.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

from maas_ray.engines.detokenize import TextStream

RESULTS = Path(__file__).resolve().parent / "results" / "stop_strings.json"


class Pieces:
    """Token i decodes to ``pieces[i]``."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces[i] for i in ids)


def rescan_check(text: str, sent: int, stops: list[str]) -> int:
    """The check before linear matching: where the safe text ends (the stop string's
    start, or the text's end less the longest tail that begins a stop)."""
    longest = max(map(len, stops))
    hits = [i for s in stops if (i := text.find(s, max(0, sent - longest + 1))) != -1]
    if hits:
        return min(hits)
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return len(text) - best


def per_token_us(pieces: list[str], stops: list[str], linear: bool) -> float:
    start = time.perf_counter()
    if linear:
        stream = TextStream(Pieces(pieces), stops)
        for token in range(len(pieces)):
            stream.push(token)
            stream.take()
    else:
        text, sent = "", 0
        for piece in pieces:
            text += piece
            sent = max(sent, rescan_check(text, sent, stops))
    return (time.perf_counter() - start) / len(pieces) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stop-chars", type=int, default=4000)
    parser.add_argument("--tokens", type=int, default=2000)
    args = parser.parse_args()
    rng = random.Random(0)
    stops = ["".join(rng.choices("abcdefgh", k=args.stop_chars - 1)) + "!" for _ in range(4)]
    words = ["the ", "cat ", "sat ", "on a", " mat", ", an", "d th", "en. "]
    pieces = [rng.choice(words) for _ in range(args.tokens)]
    rows = {name: per_token_us(pieces, stops, linear) for name, linear in (("rescan", False), ("linear", True))}
    result = {"stop_chars": args.stop_chars, "stops": len(stops), "tokens": args.tokens,
              "us_per_token": {k: round(v, 1) for k, v in rows.items()},
              "speedup": round(rows["rescan"] / rows["linear"], 1), "cpu": platform.processor() or platform.machine()}
    print(json.dumps(result, indent=2))
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
