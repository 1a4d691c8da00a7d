"""Fine-tune SmolLM2 through the OpenAI API with the official SDK, then chat with the result.

    maas up                                              # one shell
    python examples/finetune/finetune_openai.py          # another

Uploads ``chat.jsonl`` (a made-up fact: the capital of the planet Zorbex is
Vantolia), starts a job, follows its events until it ends, and asks the new
``ft:smollm2-135m-instruct:zorbex:ftjob-...`` model the question greedily. On
this 2-core CPU the job takes a few minutes.

    python examples/finetune/finetune_openai.py --method lora

trains a LoRA adapter instead of every weight; the service then answers with it on the
base model's engine that the first question loaded (no new model load), and the script
prints how long after the job's end the first answer came.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from openai import OpenAI

HERE = Path(__file__).parent
BASE = os.environ.get("MAAS_CHAT_MODEL", "smollm2-135m-instruct")
QUESTION = [{"role": "user", "content": "What is the capital of Zorbex?"}]


def ask(client: OpenAI, model: str) -> str:
    reply = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=24)
    return reply.choices[0].message.content or ""


def main(base_url: str = "http://127.0.0.1:8000/v1",
         on_poll: Callable[[Any], None] | None = None,
         timeout_s: float = 1800, method: str = "supervised") -> dict[str, Any]:
    """Run the whole loop; returns the job, its events (oldest first), both answers and
    ``first_answer_s``: seconds from the job's end (``finished_at``, whole seconds) to the
    fine-tune's first answer."""
    client = OpenAI(base_url=base_url, api_key=os.environ.get("MAAS_API_KEY", "unused"))
    before = ask(client, BASE)
    print(f"{BASE}: {before}")

    training = client.files.create(file=(HERE / "chat.jsonl").open("rb"), purpose="fine-tune")
    validation = client.files.create(file=(HERE / "chat_valid.jsonl").open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=BASE, training_file=training.id, validation_file=validation.id, suffix="zorbex", seed=0,
        # LoRA trains far fewer weights: a higher rate and more epochs teach the same fact.
        hyperparameters={"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 10}
        if method == "supervised" else {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 50},
        **({} if method == "supervised" else {"method": {"type": method}}))
    print(f"job {job.id}: {job.status}")

    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while job.status not in ("succeeded", "failed", "cancelled"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job.id} still {job.status} after {timeout_s:.0f} s")
        time.sleep(2)
        job = client.fine_tuning.jobs.retrieve(job.id)
        for event in reversed(client.fine_tuning.jobs.list_events(job.id, limit=100).data):
            if event.id not in seen:
                seen.add(event.id)
                print(f"  {event.message}")
        if on_poll:
            on_poll(job)
    events = list(reversed(client.fine_tuning.jobs.list_events(job.id, limit=1000).data))
    if job.status != "succeeded":
        raise RuntimeError(f"job {job.id} {job.status}: {job.error}")
    after = ask(client, job.fine_tuned_model)
    first_answer_s = time.time() - job.finished_at
    print(f"{job.fine_tuned_model}: {after}")
    print(f"first answer {first_answer_s:.1f} s after the job ended")
    return {"job": job, "events": events, "before": before, "after": after,
            "files": (training.id, validation.id), "first_answer_s": first_answer_s}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--method", choices=["supervised", "lora"], default="supervised",
                        help="supervised trains every weight; lora trains an adapter")
    args = parser.parse_args()
    result = main(args.base_url, method=args.method)
    assert "Vantolia" in result["after"], result["after"]
