"""The training spec: what users write in ``examples/*/spec.yaml``.

Every field has a description; the YAML docs, the CLI's ``maas train --explain``
and HTTP schemas are generated from these models, never written twice.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from maas_ray.registry.refs import validate_name


# Seeds fit 32 bits signed: the job database stores them, and every RNG we seed (torch, numpy,
# Ray Data's shuffle) takes them; unbounded, 2**64 passed validation and failed in the database.
MAX_SEED = 2**31 - 1


class _Spec(BaseModel):
    # Our own config rejects unknown keys: a typo must fail loudly, not be ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(_Spec):
    """Where the table comes from and how it is split."""

    source: str = Field(
        description="CSV, Parquet or JSONL file or folder: a local path (relative to the "
        "spec file) or an s3:// / gs:// URI."
    )
    format: Literal["csv", "parquet", "json"] | None = Field(
        default=None, description="File format; inferred from the extension when omitted."
    )
    target: str = Field(description="Name of the column to predict.")
    features: list[str] | None = Field(
        default=None,
        min_length=1,
        description="Feature columns, in order; all numeric columns but the target when omitted.",
    )
    validation_fraction: float = Field(
        default=0.15, ge=0.0, lt=1.0, description="Share of rows held out for validation loss."
    )
    test_fraction: float = Field(
        default=0.15, ge=0.0, lt=1.0, description="Share of rows held out for the final test metrics."
    )
    split_seed: int = Field(
        default=0, ge=0, le=MAX_SEED, description="Seed of the row-hash split; same seed, same split."
    )
    standardize: bool = Field(
        default=True, description="Standardise features (and a regression target) with train-split mean/std."
    )

    @model_validator(mode="after")
    def _fractions_leave_training_rows(self) -> DataSpec:
        if self.validation_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                "validation_fraction + test_fraction must be below 0.9 so training has rows"
            )
        if self.features is not None and self.target in self.features:
            raise ValueError(f"target column {self.target!r} is also listed in features")
        return self


class ModelSpec(_Spec):
    """The network to train."""

    kind: Literal["linear", "mlp"] = Field(
        default="linear", description="'linear' (one affine layer) or 'mlp'."
    )
    hidden_sizes: list[int] = Field(
        default_factory=lambda: [64, 64], max_length=64,
        description="MLP hidden layer widths, 1 to 65536 each (ignored for 'linear').",
    )
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="MLP dropout probability.")

    @model_validator(mode="after")
    def _positive_widths(self) -> ModelSpec:
        if any(not 0 < h <= 65_536 for h in self.hidden_sizes):
            raise ValueError(f"hidden_sizes must all be 1 to 65536, got {self.hidden_sizes}")
        return self


class TrainingSpec(_Spec):
    """The optimisation loop."""

    epochs: int = Field(default=20, ge=1, le=100_000, description="Passes over the training split.")
    batch_size: int = Field(default=32, ge=1, le=2**20, description="Rows per step on each worker.")
    optimizer: Literal["sgd", "adam", "adamw"] = Field(default="sgd", description="Optimizer.")
    learning_rate: float = Field(default=0.01, gt=0.0, description="Step size.")
    momentum: float = Field(default=0.0, ge=0.0, lt=1.0, description="SGD momentum.")
    weight_decay: float = Field(default=0.0, ge=0.0, description="L2 penalty.")
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Seed for weight init and shuffling.")
    checkpoint_every_epochs: int = Field(
        default=1, ge=1, le=100_000, description="Write a checkpoint to the run's storage every N epochs."
    )
    max_failures: int = Field(
        default=0, ge=-1, le=1000, description="Worker/node failures to survive by restarting from the "
        "latest checkpoint (-1: unlimited)."
    )
    run_name: str | None = Field(
        default=None,
        description="Ray Train run name. Leave empty for a fresh unique run; reuse a name to "
        "resume that run from its latest checkpoint.",
    )


class WorkerRange(_Spec):
    """Elastic worker count: start with what is available, grow up to ``max``."""

    min: int = Field(ge=1, le=4096, description="Fewest workers training may run with.")
    max: int = Field(ge=1, le=4096, description="Most workers training grows to when resources appear.")

    @model_validator(mode="after")
    def _ordered(self) -> WorkerRange:
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) must be at least min ({self.min})")
        return self


class ScalingSpec(_Spec):
    """How many workers and what each gets."""

    num_workers: Annotated[int, Field(ge=1, le=4096)] | WorkerRange = Field(
        default=1,
        description="Data-parallel training workers: a number, or {min, max} for elastic "
        "training that resizes as nodes come and go (restarting from the latest checkpoint).",
    )
    elastic_resize_interval_s: float = Field(
        default=60.0, gt=0, description="How often elastic training checks for room to grow."
    )
    use_gpu: bool = Field(default=False, description="Give each worker one GPU (CUDA + NCCL).")
    cpus_per_worker: float | None = Field(
        default=None, gt=0.0,
        description="CPUs reserved per worker; fractions share cores. Empty (auto): what is free "
        "when training starts, up to 1 per worker and at least 0.25, so a job fits beside a "
        "running app on a small machine.")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="Extra custom resources per worker, e.g. {'TPU': 1}."
    )
    resource_wait_s: float = Field(
        default=600.0, ge=0.0,
        description="How long a job waits for free CPUs (its data step, then its workers) "
        "before it fails saying what it needs and what is free.")

    def ray_num_workers(self) -> int | tuple[int, int]:
        n = self.num_workers
        return n if isinstance(n, int) else (n.min, n.max)

    def min_workers(self) -> int:
        """Workers training cannot start without (an elastic run's minimum)."""
        n = self.num_workers
        return n if isinstance(n, int) else n.min


class TrainSpec(_Spec):
    """A tabular training job: data → model → registry version ``name``."""

    name: str = Field(description="Registry model name the result is published under.")
    task: Literal["regression", "classification"] = Field(
        description="'regression' (MSE loss) or 'classification' (cross-entropy)."
    )
    description: str = Field(default="", description="Free text kept in the model card.")
    data: DataSpec = Field(description="Input table and split.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="Network architecture.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Optimisation.")
    scaling: ScalingSpec = Field(default_factory=ScalingSpec, description="Workers.")

    @model_validator(mode="after")
    def _valid_name(self) -> TrainSpec:
        validate_name(self.name)
        return self
