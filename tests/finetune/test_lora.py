"""LoRA fine-tuning in the foreground (``maas train``'s path): the version is an adapter,
and the service answers with base + adapter merged, exactly as peft computes it."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BASE = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of Zorbex?"}]


def test_lora_job_publishes_an_adapter_that_serves(serve_url: str, maas_home: str,
                                                   llm_dirs: dict[str, str]) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from maas_ray.config.finetune import FineTuneSpec
    from maas_ray.finetune.files import FileStore
    from maas_ray.finetune.jobs import JobService
    from maas_ray.finetune.runner import run_job
    from maas_ray.registry import Registry

    data = (REPO / "examples" / "finetune" / "chat.jsonl").read_bytes()
    file_id = FileStore(maas_home).create("chat.jsonl", data, "fine-tune").id
    spec = FineTuneSpec(base_model=BASE, training_file=file_id, suffix="lora", method="lora",
                        hyperparameters={"n_epochs": 1, "batch_size": 8,
                                         "learning_rate_multiplier": 10}, seed=1)
    jobs = JobService(maas_home)
    job = jobs.create(spec, submit=False)
    events: list[dict] = []
    assert run_job(job["id"], maas_home, progress=events.append) == 0
    job = jobs.get(job["id"])
    assert job["status"] == "succeeded", job["error"]
    assert [e["step"] for e in events if not e.get("epoch_end")] == [1, 2]

    registry = Registry(maas_home)
    mv = registry.get(job["fine_tuned_model"])
    folder = registry.local_dir(mv)
    assert mv.card["format"] == "peft-lora" and mv.card["base_model"] == f"{BASE}:1"
    assert (folder / "adapter_model.safetensors").stat().st_size < 5 * 2**20
    assert not (folder / "model.safetensors").exists()

    tok = AutoTokenizer.from_pretrained(llm_dirs[BASE])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llm_dirs[BASE]), str(folder))
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    with torch.no_grad():
        out = model.eval().generate(**ids, max_new_tokens=12, do_sample=False)
    expected = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    with httpx.Client(base_url=serve_url, timeout=300) as http:
        r = http.post("/v1/chat/completions", json={"model": mv.name, "messages": QUESTION,
                                                    "temperature": 0, "max_tokens": 12})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == expected
