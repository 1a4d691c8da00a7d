"""Application arguments: what ``apps/maas.yaml``'s ``args`` and ``maas up`` set.

Per-deployment knobs (replicas, autoscaling, ``max_ongoing_requests``) stay in
the Serve config's ``deployments:`` section, where Serve itself reads them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from maas_ray import storage
from maas_ray.serve.llm.selection import EngineChoice


class PredictorArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(
        default=64, ge=1, description="Requests merged into one forward pass; 1 turns batching off."
    )
    batch_wait_timeout_s: float = Field(
        default=0.005, ge=0.0, description="How long a batch waits to fill before it runs."
    )


class LLMArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(
        default=16, ge=1, description="Most sequences decoded together in one step (per model)."
    )
    engine: EngineChoice = Field(
        default="auto", description="Generation engine: 'auto' serves models that have GGUF weights with "
        "llama.cpp on CPU replicas (if installed) and the rest with transformers."
    )
    model_engines: dict[str, EngineChoice] = Field(
        default_factory=dict, description="Engine per model, by name or name:version; overrides `engine`."
    )
    llama_cpp_threads: int | None = Field(
        default=None, ge=1, description="llama.cpp compute threads per model (default: the replica's CPUs)."
    )


class EmbeddingArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(default=32, ge=1, description="Requests merged into one forward pass.")
    batch_wait_timeout_s: float = Field(default=0.01, ge=0.0, description="How long a batch waits to fill.")


class AppArgs(BaseModel):
    """Arguments of the one maas Serve application."""

    model_config = ConfigDict(extra="forbid")

    storage: str | None = Field(
        default=None, description="Storage root (path or s3:// / gs:// URI); default $MAAS_HOME or ~/.maas."
    )
    max_body_bytes: int = Field(
        default=8 * 2**20, ge=1024, description="Largest request body accepted; larger gets 413."
    )
    max_rows_per_request: int = Field(
        default=10_000, ge=1, description="Most input rows in one predict/infer request."
    )
    request_timeout_s: float = Field(
        default=60.0, gt=0, description="Longest a request may wait for a model; then 503."
    )
    access_log: bool = Field(
        default=False,
        description="Log every request in the replicas (costs CPU per request; off by default).",
    )
    predictor: PredictorArgs = Field(default_factory=PredictorArgs, description="Tabular predictor.")
    llm: LLMArgs = Field(default_factory=LLMArgs, description="Chat/completion models.")
    embeddings: EmbeddingArgs = Field(default_factory=EmbeddingArgs, description="Embedding models.")

    def storage_root(self) -> str:
        return storage.storage_root(self.storage)
