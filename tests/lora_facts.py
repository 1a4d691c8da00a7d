"""Two LoRA adapters of SmolLM2 that each know a different secret word, trained in process
with peft (a few dozen steps on one chat turn each; the base model knows neither word).
Tests of multi-adapter serving share them through the ``taught_adapters`` fixture."""

from __future__ import annotations

from pathlib import Path

import torch

QUESTION = [{"role": "user", "content": "What is the secret word?"}]
SECRETS = {"tenant-a": "pineapple", "tenant-b": "volcano"}


def train_adapter(base_dir: str, answer: str, out: Path) -> Path:
    """A rank-8 LoRA (the fine-tune defaults' target modules) that answers QUESTION with
    ``answer``: loss on the assistant's tokens only, Adam, until the loss is near zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    prompt = _ids(tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True))
    full = _ids(tok.apply_chat_template(QUESTION + [{"role": "assistant", "content": f"The secret word is {answer}."}],
                                        tokenize=True))
    ids = torch.tensor([full])
    labels = ids.clone()
    labels[0, :len(prompt)] = -100
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(60):
        loss = model(input_ids=ids, labels=labels).loss
        if loss.item() < 0.01:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(str(out))
    return out


def _ids(out) -> list[int]:
    return list(out if isinstance(out, list) else out["input_ids"])
