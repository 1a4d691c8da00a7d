"""The fine-tuning loop each Ray Train worker runs (transformers + accelerate).

Causal LMs (loss on target tokens only, or DPO on preference pairs) and sequence
classifiers share it.
accelerate picks mixed precision (bf16 on GPUs that have it, fp32 on CPU),
accumulates gradients and wraps the model for the process group Ray Train set
up. Each epoch ends with a validation pass and a checkpoint: a complete
Hugging Face folder (weights or LoRA adapter + tokenizer) plus optimizer state
and history, which a restarted worker resumes from.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import ray.train
import torch

from maas_ray.train.preference import dpo_loss, reference_logps, sequence_logps
from maas_ray.train.text_data import IGNORE, pad_batch

STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
SCAFFOLD = (STATE, OPTIMIZER)  # checkpoint files that are not part of the model


def _load_model(cfg: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    kwargs = {"local_files_only": True, "trust_remote_code": False, "use_safetensors": True,
              "dtype": torch.float32}
    tokenizer = AutoTokenizer.from_pretrained(cfg["base_dir"], local_files_only=True)
    if cfg["objective"] in ("lm", "dpo"):
        model = AutoModelForCausalLM.from_pretrained(cfg["base_dir"], **kwargs)
    else:
        labels = cfg["labels"]
        model = AutoModelForSequenceClassification.from_pretrained(
            cfg["base_dir"], num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)}, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        lora = cfg["lora"]
        model = get_peft_model(model, LoraConfig(
            task_type="SEQ_CLS" if cfg["objective"] == "classification" else "CAUSAL_LM",
            r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
            target_modules=lora["target_modules"]))
    return model, tokenizer


def _reference(model: Any, cfg: dict[str, Any]) -> Any | None:
    """DPO's reference, the frozen base: a copy for a full fine-tune; None for LoRA, whose
    model is its own base with the adapter switched off (peft's ``disable_adapter``)."""
    if cfg["objective"] == "dpo" and cfg["method"] == "full":
        return copy.deepcopy(model).requires_grad_(False).eval()
    return None


def _loss(model: Any, batch: dict[str, Any], objective: str,
          reference: Callable[[dict[str, Any]], torch.Tensor] | None = None,
          beta: float = 0.0) -> tuple[torch.Tensor, int, int]:
    """(mean loss, items it averaged over, correct predictions); for DPO the items are pairs,
    "correct" those the model ranks the right way round, and ``reference`` scores the base."""
    if objective == "dpo":
        assert reference is not None, "DPO needs the reference model's scores"
        logps = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss, margins = dpo_loss(logps, reference(batch), beta)
        return loss, len(margins), int((margins > 0).sum())
    if objective == "lm":
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"])
        # transformers shifts labels inside; count the targets it averaged over.
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        return out.loss, n, 0
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["label"]
    known = labels >= 0
    loss = torch.nn.functional.cross_entropy(logits[known], labels[known]) if known.any() \
        else logits.sum() * 0.0
    correct = int((logits.argmax(-1) == labels).sum())
    return loss, len(labels), correct


def _global_sum(*values: float) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


def finetune_loop_per_worker(cfg: dict[str, Any]) -> None:
    from accelerate import Accelerator

    torch.manual_seed(cfg["seed"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = torch.cuda.is_available() and cfg["use_gpu"]
    bf16 = use_gpu and torch.cuda.is_bf16_supported()
    accum = cfg["gradient_accumulation_steps"]
    accelerator = Accelerator(cpu=not use_gpu, mixed_precision="bf16" if bf16 else "no",
                              gradient_accumulation_steps=accum)
    model, tokenizer = _load_model(cfg)
    frozen = _reference(model, cfg)  # before a checkpoint is restored: the base
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg["learning_rate"], weight_decay=0.0)

    start_epoch, step, history = 0, 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # a restart after a failure, or a resumed job
        with checkpoint.as_directory() as folder:
            state = json.loads((Path(folder) / STATE).read_text())
            _load_trainable(model, Path(folder), cfg["method"])
            optimizer.load_state_dict(torch.load(Path(folder) / OPTIMIZER, weights_only=True))
        start_epoch, step, history = state["epoch"] + 1, state["step"], state["history"]

    model, optimizer = accelerator.prepare(model, optimizer)
    if frozen is not None:
        frozen = frozen.to(accelerator.device)
    reference = partial(reference_logps, accelerator.unwrap_model(model), frozen) \
        if cfg["objective"] == "dpo" else None
    score = partial(_loss, objective=cfg["objective"], reference=reference, beta=cfg.get("beta", 0.0))
    micro = max(1, cfg["batch_size"] // (world * accum))
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation") if cfg["has_validation"] else None
    progress = cfg["progress"]
    steps_per_epoch = max(1, math.ceil(cfg["train_rows"] / (micro * world * accum)))
    total_steps = steps_per_epoch * cfg["n_epochs"]

    for epoch in range(start_epoch, cfg["n_epochs"]):
        model.train()
        started = time.perf_counter()
        loss_sum, n_sum, seen_tokens = 0.0, 0, 0
        batches = train_shard.iter_batches(batch_size=micro, batch_format="numpy",
                                           local_shuffle_buffer_size=max(micro * 4, 64),
                                           local_shuffle_seed=cfg["seed"] + 7919 * epoch + rank)
        for batch in batches:
            tensors = {k: v.to(accelerator.device) for k, v in pad_batch(batch, tokenizer.pad_token_id).items()}
            with accelerator.accumulate(model):
                loss, n, _ = score(model, tensors)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            loss_sum += float(loss.detach()) * n
            n_sum += n
            seen_tokens += int(tensors["attention_mask"].sum())
            if accelerator.sync_gradients:
                step += 1
                if rank == 0:
                    progress.push.remote({"step": step, "total_steps": total_steps, "epoch": epoch,
                                          "train_loss": float(loss.detach())})
        loss_sum, n_sum, seen_tokens = _global_sum(loss_sum, n_sum, seen_tokens)
        metrics: dict[str, Any] = {"epoch": epoch, "step": step, "total_steps": total_steps,
                                   "train_loss": loss_sum / max(n_sum, 1.0),
                                   "trained_tokens": int(seen_tokens),
                                   "seconds": round(time.perf_counter() - started, 3)}
        if val_shard is not None:
            metrics.update(_validate(model, val_shard, tokenizer, accelerator, score,
                                     cfg["objective"] == "classification"))
        history.append(metrics)
        if rank == 0:
            progress.push.remote({**metrics, "epoch_end": True})
        last = epoch == cfg["n_epochs"] - 1
        if (epoch + 1) % cfg["checkpoint_every_epochs"] and not last:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                unwrapped = accelerator.unwrap_model(model)
                unwrapped.save_pretrained(tmp, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
                torch.save(optimizer.state_dict(), Path(tmp) / OPTIMIZER)
                (Path(tmp) / STATE).write_text(json.dumps({"epoch": epoch, "step": step,
                                                           "history": history}))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)


@torch.no_grad()
def _validate(model: Any, shard: Any, tokenizer: Any, accelerator: Any,
              score: Callable[..., tuple[torch.Tensor, int, int]], accuracy: bool) -> dict[str, float]:
    model.eval()
    loss_sum, n_sum, correct = 0.0, 0, 0
    for batch in shard.iter_batches(batch_size=16, batch_format="numpy"):
        tensors = {k: v.to(accelerator.device) for k, v in pad_batch(batch, tokenizer.pad_token_id).items()}
        loss, n, ok = score(model, tensors)
        loss_sum += float(loss) * n
        n_sum += n
        correct += ok
    loss_sum, n_sum, correct = _global_sum(loss_sum, n_sum, correct)
    model.train()
    out = {"valid_loss": loss_sum / max(n_sum, 1.0)}
    if accuracy:
        out["valid_accuracy"] = correct / max(n_sum, 1.0)
    return out


def _load_trainable(model: Any, folder: Path, method: str) -> None:
    """Restore the weights a checkpoint holds (the full model, or only the adapter)."""
    from safetensors.torch import load_file

    if method == "lora":
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        return
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("model*.safetensors")):
        state.update(load_file(str(shard)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"}
    if [k for k in missing if k not in tied] or unexpected:
        raise RuntimeError(f"checkpoint {folder} does not match the model "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
