"""The official openai SDK against a local maas service, unmodified.

    maas up                                   # in one shell (imports the base models on first start)
    python examples/clients/openai_client.py  # in another

Checks its own results: the chat model answers (streamed and not), and
embeddings of similar sentences are closer than those of unrelated ones.
"""

from __future__ import annotations

import os

import numpy as np
from openai import OpenAI

CHAT_MODEL = os.environ.get("MAAS_CHAT_MODEL", "smollm2-135m-instruct")
EMBED_MODEL = os.environ.get("MAAS_EMBED_MODEL", "all-minilm-l6-v2")


def main(base_url: str = "http://127.0.0.1:8000/v1") -> None:
    client = OpenAI(base_url=base_url, api_key=os.environ.get("MAAS_API_KEY", "unused"))

    ids = [m.id for m in client.models.list().data]
    print("models:", ", ".join(ids))
    assert CHAT_MODEL in ids and EMBED_MODEL in ids, ids

    reply = client.chat.completions.create(
        model=CHAT_MODEL, temperature=0, max_tokens=32,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    text = reply.choices[0].message.content
    print("chat:", text, f"({reply.usage.completion_tokens} tokens)")
    assert text and reply.usage.prompt_tokens > 0

    print("stream: ", end="", flush=True)
    pieces = []
    for chunk in client.chat.completions.create(
            model=CHAT_MODEL, temperature=0, max_tokens=32, stream=True,
            messages=[{"role": "user", "content": "What is the capital of France?"}]):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()
    assert "".join(pieces) == text, "greedy streaming and non-streaming must agree"

    sentences = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply."]
    vectors = np.array([d.embedding for d in client.embeddings.create(model=EMBED_MODEL, input=sentences).data])
    similar, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    print(f"embeddings: similar {similar:.3f} > unrelated {unrelated:.3f}")
    assert similar > unrelated


if __name__ == "__main__":
    main(os.environ.get("MAAS_URL", "http://127.0.0.1:8000") + "/v1")
