"""Fine-tuning examples → token ids, for causal LMs (chat, completion, preference pairs)
and classifiers.

Chat examples use the base model's own chat template, rendered turn by turn:
the tokens an assistant turn adds after ``add_generation_prompt`` are the
ones the loss sees, so the model learns exactly what serving (which renders
the same template) will ask it to produce.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

IGNORE = -100  # label id the loss skips


def _template(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                        return_dict=False)
    return list(ids)


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)``: labels are the ids on assistant turns, -100 elsewhere."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    ids: list[int] = []
    labels: list[int] = []
    for i, message in enumerate(messages):
        upto = _template(tokenizer, messages[: i + 1], False)
        if message["role"] == "assistant":
            prompt = _template(tokenizer, messages[:i], True)
            if upto[: len(prompt)] != prompt or prompt[: len(ids)] != ids:
                raise ValueError("the chat template does not render turn by turn "
                                 "(cannot tell assistant tokens apart)")
            labels += [IGNORE] * (len(prompt) - len(ids)) + upto[len(prompt):]
        else:
            if upto[: len(ids)] != ids:
                raise ValueError("the chat template does not render turn by turn")
            labels += [IGNORE] * (len(upto) - len(ids))
        ids = upto
    return ids, labels


def encode_completion(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Raw text, as ``/v1/completions`` sends it: loss on the completion and EOS."""
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        c = c + [tokenizer.eos_token_id]
    return p + c, [IGNORE] * len(p) + c


def encode_example(tokenizer: Any, row: dict[str, Any]) -> tuple[list[int], list[int]]:
    if "messages" in row:
        return encode_chat(tokenizer, row["messages"])
    return encode_completion(tokenizer, row["prompt"], row["completion"])


def encode_answer(tokenizer: Any, prompt: list[dict[str, str]],
                  answer: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """A prompt's messages + one answer: labels on the answer's tokens only (an assistant
    turn inside the prompt is context, not a target)."""
    ids, labels = encode_chat(tokenizer, prompt + answer)
    start = len(_template(tokenizer, [{"role": m["role"], "content": m["content"]} for m in prompt],
                          True))
    return ids, [IGNORE] * start + labels[start:]


def encode_preference(tokenizer: Any, row: dict[str, Any]) -> list[tuple[list[int], list[int]]]:
    """``[(ids, labels) preferred, (ids, labels) non-preferred]`` of one preference example."""
    prompt = row["input"]["messages"]
    return [encode_answer(tokenizer, prompt, row[key])
            for key in ("preferred_output", "non_preferred_output")]


def check_lm_example(tokenizer: Any, row: dict[str, Any], max_len: int) -> str | None:
    """Why an example cannot train (no target tokens, too long), or None."""
    if "messages" in row and not any(m.get("role") == "assistant" for m in row["messages"]):
        return "no assistant message to learn from"
    try:
        encoded = encode_preference(tokenizer, row) if "input" in row else [encode_example(tokenizer, row)]
    except ValueError as err:
        return str(err)
    for ids, labels in encoded:
        if all(label == IGNORE for label in labels):
            return "no target tokens to learn from"
        if len(ids) > max_len:
            return f"{len(ids)} tokens, longer than max_seq_length ({max_len})"
    return None


class TokenizeLM:
    """Ray Data UDF: JSONL lines → ``input_ids`` / ``labels`` (variable length)."""

    def __init__(self, model_dir: str) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        ids, labels = [], []
        for line in batch["text"]:
            if not str(line).strip():
                continue
            i, lab = encode_example(self.tokenizer, json.loads(line))
            ids.append(np.asarray(i, dtype=np.int64))
            labels.append(np.asarray(lab, dtype=np.int64))
        return {"input_ids": _ragged(ids), "labels": _ragged(labels)}


class TokenizePreference:
    """Ray Data UDF: JSONL preference lines → the preferred answer as ``input_ids`` /
    ``labels`` and the other as ``rejected_input_ids`` / ``rejected_labels``."""

    def __init__(self, model_dir: str) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        cols: dict[str, list[np.ndarray]] = {k: [] for k in ("input_ids", "labels", "rejected_input_ids",
                                                              "rejected_labels")}
        for line in batch["text"]:
            if not str(line).strip():
                continue
            (ids, labels), (r_ids, r_labels) = encode_preference(self.tokenizer, json.loads(line))
            for key, seq in zip(cols, (ids, labels, r_ids, r_labels)):
                cols[key].append(np.asarray(seq, dtype=np.int64))
        return {k: _ragged(v) for k, v in cols.items()}


class TokenizeClassification:
    """Ray Data UDF: JSONL ``{"text","label"}`` lines → ``input_ids`` + class index."""

    def __init__(self, model_dir: str, labels: list[str], max_len: int) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.index = {label: i for i, label in enumerate(labels)}
        self.max_len = max_len

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        rows = [json.loads(line) for line in batch["text"] if str(line).strip()]
        enc = self.tokenizer([r["text"] for r in rows], truncation=True, max_length=self.max_len)
        ids = [np.asarray(i, dtype=np.int64) for i in enc["input_ids"]]
        # Labels unseen in training (validation only) get -1: counted as errors, no loss.
        return {"input_ids": _ragged(ids),
                "label": np.asarray([self.index.get(str(r["label"]), -1) for r in rows],
                                    dtype=np.int64)}


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


def pad_batch(batch: dict[str, Any], pad_id: int) -> dict[str, Any]:
    """Pad a batch of ragged rows to its longest; returns torch tensors. Preference rows
    become ``2B`` rows, the B preferred answers first, so one forward pass scores both."""
    import torch

    if "rejected_input_ids" in batch:
        # Lists, not np.concatenate: rows of equal length may come as a 2-D array.
        batch = {"input_ids": [*batch["input_ids"], *batch["rejected_input_ids"]],
                 "labels": [*batch["labels"], *batch["rejected_labels"]]}

    seqs = list(batch["input_ids"])
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.as_tensor(seq)
        mask[row, : len(seq)] = 1
    out: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if "labels" in batch:
        labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
        for row, lab in enumerate(batch["labels"]):
            labels[row, : len(lab)] = torch.as_tensor(lab)
        out["labels"] = labels
    if "label" in batch:
        out["label"] = torch.as_tensor(np.asarray(batch["label"], dtype=np.int64))
    return out
