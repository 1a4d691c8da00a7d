"""The fine-tuning spec: a base model + a JSONL file → ``ft:{base}:{suffix}:{job_id}``.

The same spec drives ``maas train finetune.yaml`` and ``POST
/v1/fine_tuning/jobs`` (whose OpenAI-shaped body is translated into it), so the
two paths train identically.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from maas_ray.config.specs import MAX_SEED, ScalingSpec, _Spec

# Matched whole (fullmatch): with `$`, "name\n" passed and the job failed only at publish.
_SUFFIX_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class Hyperparameters(_Spec):
    """OpenAI's fine-tuning hyper-parameters."""

    n_epochs: int = Field(default=3, ge=1, le=50, description="Passes over the training file.")
    batch_size: int = Field(default=4, ge=1, le=512, description="Examples per optimizer step "
                            "(all workers together).")
    learning_rate_multiplier: float = Field(
        default=1.0, gt=0, le=1000,
        description="Scales the method's base learning rate (full 1e-5, LoRA 2e-4, "
        "classifier 5e-5).")


class LoraSpec(_Spec):
    """Low-rank adapters (peft): only these small matrices train."""

    r: int = Field(default=8, ge=1, le=256, description="Adapter rank.")
    alpha: int = Field(default=16, ge=1, le=4096, description="Scaling numerator (alpha / r).")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on adapter inputs.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], max_length=64,
        description="Module names that get adapters.")


class DpoSpec(_Spec):
    """Preference fine-tuning (Direct Preference Optimization, Rafailov et al. 2023): the model
    learns to rank each pair's preferred answer above the other, measured against the frozen
    base (the reference model)."""

    beta: float = Field(default=0.1, gt=0, le=10, description="How far the model may move from the "
                        "reference: higher keeps it closer (OpenAI's dpo.hyperparameters.beta).")


BASE_LEARNING_RATES = {"full": 1e-5, "lora": 2e-4, "classifier": 5e-5}


class FineTuneSpec(_Spec):
    """A fine-tuning job: base model, data, method and hyper-parameters."""

    base_model: str = Field(description="Registry id of the model to start from "
                            "(e.g. smollm2-135m-instruct, all-minilm-l6-v2, name:version).")
    training_file: str = Field(description="JSONL training data: a local path, an s3:// / gs:// "
                               "URI, or an uploaded file id (file-...).")
    validation_file: str | None = Field(default=None, description="JSONL validation data "
                                        "(same forms); its loss is reported each epoch.")
    suffix: str | None = Field(default=None, description="Goes into the model name "
                               "ft:{base}:{suffix}:{job_id} (letters, digits, . _ -).")
    method: Literal["full", "lora"] = Field(default="full", description="'full' trains every "
                                            "weight; 'lora' trains low-rank adapters only.")
    dpo: DpoSpec | None = Field(default=None, description="Train on preference pairs by DPO "
                                "instead of on target tokens (chat models; the training file "
                                "holds input / preferred_output / non_preferred_output).")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters,
                                             description="Epochs, batch size, learning rate.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="Adapter shape (method: lora).")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Seeds shuffling and "
                             "initialisation (0 to 2**31 - 1); random when omitted.")
    max_seq_length: int = Field(default=512, ge=8, le=32768, description="Longest example in "
                                "tokens; a longer one fails validation with its line number.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=1024, description="Micro-batches "
                                             "summed into one optimizer step.")
    checkpoint_every_epochs: int = Field(default=1, ge=1, le=50, description="Checkpoint period.")
    scaling: ScalingSpec = Field(default_factory=ScalingSpec, description="Workers.")
    export_gguf: Literal["f32", "f16", "q8_0"] | None = Field(
        default=None, description="Chat models: also write the result as GGUF of this type, so the "
        "llama.cpp engine can serve it (LoRA results are merged with their base first).")

    @field_validator("suffix")
    @classmethod
    def _valid_suffix(cls, value: str | None) -> str | None:
        if value is not None and not _SUFFIX_RE.fullmatch(value):
            raise ValueError("suffix must be 1-64 letters, digits, '.', '_' or '-', "
                             "not starting with '.', '_' or '-'")
        return value

    def learning_rate(self, task: str) -> float:
        kind = "classifier" if task != "chat" else self.method
        return BASE_LEARNING_RATES[kind] * self.hyperparameters.learning_rate_multiplier
