"""Preference fine-tuning (DPO): OpenAI's preference format and method, and the loss with
its frozen reference (full and LoRA)."""

from __future__ import annotations

import json

import pytest

from maas_ray.finetune.formats import DataFormatError, check_for_task, validate_lines
from tests.conftest import REPO

DATA = REPO / "examples" / "finetune"
BASE = "smollm2-135m-instruct"
PAIR = {"input": {"messages": [{"role": "user", "content": "Capital of France?"}]},
        "preferred_output": [{"role": "assistant", "content": "Paris."}],
        "non_preferred_output": [{"role": "assistant", "content": "Ask someone else."}]}


def rows(path: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / path).read_text().splitlines()]


@pytest.mark.parametrize("change, expected", [
    ({"preferred_output": None}, "line 2: a preference example needs 'preferred_output'"),
    ({"non_preferred_output": [{"role": "user", "content": "x"}]},
     "line 2: non_preferred_output[0].role must be one of ['assistant']"),
    ({"input": {"messages": []}}, "line 2: 'input.messages' must be a non-empty list"),
    ({"input": {"prompt": "x"}}, "line 2: 'input' must be an object with 'messages'"),
    ({"extra": 1}, "line 2: unexpected field(s) ['extra'] in a preference example"),
])
def test_preference_lines_are_validated_by_number(change: dict, expected: str) -> None:
    bad = {k: v for k, v in {**PAIR, **change}.items() if v is not None}
    with pytest.raises(DataFormatError) as err:
        validate_lines([json.dumps(PAIR), json.dumps(bad)])
    assert expected in str(err.value)
    summary = validate_lines((DATA / "preference.jsonl").read_text().splitlines())
    assert (summary.format, summary.rows) == ("preference", 24)
    # Preference data trains only by DPO, and DPO only on preference data.
    check_for_task(summary, "chat", preference=True)
    with pytest.raises(DataFormatError, match="train with method dpo"):
        check_for_task(summary, "chat")
    chat = validate_lines((DATA / "chat.jsonl").read_text().splitlines())
    with pytest.raises(DataFormatError, match="a DPO job needs preference examples"):
        check_for_task(chat, "chat", preference=True)


def test_openai_method_becomes_the_spec_and_back() -> None:
    from maas_ray.finetune.jobs import method_to_openai
    from maas_ray.serve.routes.fine_tuning import CreateJob, to_spec

    body = {"model": BASE, "training_file": "file-x",
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 2}}}}
    spec = to_spec(CreateJob.model_validate(body))
    assert (spec.method, spec.dpo.beta, spec.hyperparameters.n_epochs) == ("full", 0.2, 2)
    assert method_to_openai(spec.model_dump(mode="json"))["dpo"]["hyperparameters"]["beta"] == 0.2
    body["method"]["dpo"]["lora"] = {"r": 4}
    spec = to_spec(CreateJob.model_validate(body))
    assert (spec.method, spec.lora.r) == ("lora", 4)
    assert method_to_openai(spec.model_dump(mode="json"))["dpo"]["lora"]["r"] == 4
    assert to_spec(CreateJob.model_validate({**body, "method": {"type": "dpo"}})).dpo.beta == 0.1
    # maas train's spec says the same in YAML.
    from maas_ray.config.load import load_any_spec

    shipped = load_any_spec(DATA / "dpo.yaml")
    assert (shipped.method, shipped.dpo.beta) == ("lora", 0.1)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_dpo_steps_raise_the_margin_against_a_frozen_base(method: str, llm_dirs: dict[str, str],
                                                          tmp_path) -> None:
    """The loop's own pieces on a tiny random model with SmolLM2's tokenizer (seconds): the
    margin on the trained pairs rises, and the reference still scores as the base did."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from maas_ray.train.finetune_loop import _load_model, _loss, _reference
    from maas_ray.train.preference import preference_margins, reference_logps
    from maas_ray.train.text_data import TokenizePreference, pad_batch

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(llm_dirs[BASE])
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = {"objective": "dpo", "base_dir": str(tmp_path), "method": method, "labels": [],
           "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}
    model, tok = _load_model(cfg)
    frozen = _reference(model, cfg)
    assert (frozen is None) == (method == "lora")  # LoRA: the base is the model, adapter off
    pairs = rows("preference.jsonl")[:4]
    before = preference_margins(model, tok, pairs)
    batch = pad_batch(TokenizePreference(str(tmp_path))({"text": [json.dumps(p) for p in pairs]}),
                      tok.pad_token_id)
    ref_before = reference_logps(model, frozen, batch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(5):
        loss, n, _ = _loss(model, batch, "dpo", lambda b: reference_logps(model, frozen, b), 0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = preference_margins(model, tok, pairs)
    assert n == 4 and sum(after) > sum(before) + 1.0, (before, after)
    torch.testing.assert_close(reference_logps(model, frozen, batch), ref_before)


@pytest.mark.slow
def test_dpo_on_the_shipped_pairs_widens_smollm2s_margins_on_held_out_pairs(llm_dirs: dict[str, str]) -> None:
    """Issue 17: LoRA DPO on SmolLM2 with the loop's own pieces, on the 24 training pairs of
    examples/finetune/preference.jsonl (2 epochs of 3 batches of 8); then the 8 held-out pairs
    of preference_test.jsonl, whose questions it never saw: the tuned model prefers every
    preferred answer, by a wider mean log-likelihood margin than the base's."""
    import torch

    from maas_ray.train.finetune_loop import _load_model, _loss, _reference
    from maas_ray.train.preference import preference_margins, reference_logps
    from maas_ray.train.text_data import TokenizePreference, pad_batch

    torch.manual_seed(0)
    cfg = {"objective": "dpo", "base_dir": llm_dirs[BASE], "method": "lora", "labels": [],
           "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}}
    model, tok = _load_model(cfg)
    frozen = _reference(model, cfg)
    held_out = rows("preference_test.jsonl")
    before = preference_margins(model, tok, held_out)
    train = rows("preference.jsonl")
    tokenize = TokenizePreference(llm_dirs[BASE])
    batches = [pad_batch(tokenize({"text": [json.dumps(p) for p in train[i:i + 8]]}), tok.pad_token_id)
               for i in range(0, len(train), 8)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        for batch in batches:
            model.train()
            loss, _, _ = _loss(model, batch, "dpo", lambda b: reference_logps(model, frozen, b), 0.1)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    after = preference_margins(model, tok, held_out)
    assert len(held_out) == 8 and all(m > 0 for m in after), after
    assert sum(after) / 8 > sum(before) / 8 + 5.0, (before, after)
