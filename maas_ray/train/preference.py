"""Direct Preference Optimization (DPO): the loss, and the margins that show it worked.

DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
Secretly a Reward Model", eq. 7) trains on pairs (prompt x, preferred y_w, other y_l):

    loss = -log σ(β · [(log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x))])

π is the model being trained and π_ref the frozen base. This is TRL's default
``loss_type="sigmoid"`` (``trl.DPOTrainer._compute_loss``, trl 1.16). We write these few
lines instead of depending on TRL because TRL offers the loss only inside ``DPOTrainer``
(a Hugging Face ``Trainer`` with its own loop, data sets and checkpoints, and a
``fused_lm_head`` forward argument of its own); our loop is Ray Train's, fed by Ray Data
shards, and the sum of answer-token log-probabilities is all it needs besides.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from maas_ray.train.text_data import IGNORE, encode_preference, pad_batch


def sequence_logps(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
    """log p(answer | prompt) per row: the sum over label tokens (B,)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # (B, T-1, V)
    targets = labels[:, 1:]  # token t is predicted at position t-1
    # cross_entropy, not log_softmax + gather: it never holds a second (B, T, V) tensor.
    nll = F.cross_entropy(logits.transpose(1, 2).float(), targets, ignore_index=IGNORE,
                          reduction="none")  # (B, T-1), 0 where ignored
    return -nll.sum(-1)


def dpo_loss(logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, reward margins (B,)) from ``2B`` rows: B preferred answers, then B others."""
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    margins = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))  # (B,)
    return -F.logsigmoid(margins).mean(), margins.detach()


def reference_logps(model: Any, reference: Any | None, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The frozen base's log-probs: ``reference`` (a full fine-tune's frozen copy), or with
    ``reference=None`` the same LoRA model with its adapter switched off (peft)."""
    ctx = model.disable_adapter() if reference is None else nullcontext()
    with torch.no_grad(), ctx:
        return sequence_logps(reference if reference is not None else model,
                              batch["input_ids"], batch["attention_mask"], batch["labels"])


@torch.no_grad()
def preference_margins(model: Any, tokenizer: Any, rows: list[dict[str, Any]]) -> list[float]:
    """``log p(preferred) - log p(non_preferred)`` for each preference example: above zero
    where the model prefers the preferred answer. Compare a tuned model with its base."""
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[float] = []
    for row in rows:
        (ids, labels), (r_ids, r_labels) = encode_preference(tokenizer, row)
        batch = pad_batch({"input_ids": [ids], "labels": [labels], "rejected_input_ids": [r_ids],
                           "rejected_labels": [r_labels]}, pad)
        chosen, rejected = sequence_logps(model, batch["input_ids"], batch["attention_mask"],
                                          batch["labels"]).tolist()
        out.append(chosen - rejected)
    return out
