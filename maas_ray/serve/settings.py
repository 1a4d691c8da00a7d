"""Application arguments: what ``apps/maas.yaml``'s ``args`` and ``maas up`` set.

Per-deployment knobs (replicas, autoscaling, ``max_ongoing_requests``,
``max_queued_requests``) go in the Serve config's ``deployments:`` section, where
Serve itself reads them, or in ``deployments`` here for callers of
:func:`~maas_ray.serve.app.build_app` without a Serve config (``maas up``, tests).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from maas_ray import storage
from maas_ray.engines.selection import EngineChoice

# The deployments of the maas app, by the names Serve configs use for them.
DEPLOYMENTS = ("Ingress", "Predictor", "LLMServer", "EmbeddingServer")


class PredictorArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(
        default=64, ge=1, description="Requests merged into one forward pass; 1 turns batching off."
    )
    batch_wait_timeout_s: float = Field(
        default=0.005, ge=0.0, description="How long a batch started from idle waits for more "
        "requests. Under load it does not apply: each batch takes what queued during the last "
        "forward pass (continuous batching)."
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
    stream_interval_s: float = Field(
        default=0.05, ge=0.0, le=1.0, description="Streams send new text at most this often (tokens "
        "decoded in between go together in one chunk; the first token goes at once). Each chunk "
        "crosses two Ray actors, so on a small CPU fewer chunks leave more of it for decoding; 0 "
        "sends every token on its own."
    )
    request_timeout_s: float = Field(
        default=600.0, gt=0, description="Longest a non-streaming chat/completion request may take, "
        "waiting for a batch slot included; then it gets 504 and its sequences are aborted (their "
        "KV cache freed). Streams end when their client hangs up."
    )
    max_request_share: float = Field(
        default=0.5, gt=0, le=1, description="The most of a model's batch slots (and, on llama.cpp, "
        "KV cells) one request's n choices may hold while it runs any; the rest wait, so one large "
        "request cannot lock others out. A lone sequence always starts. 1 turns the cap off."
    )
    adapter_cache_mb: float = Field(
        default=256, ge=0, description="Memory per base model for LoRA fine-tunes served on it (the "
        "transformers engine keeps one base and loads each fine-tune's adapter on demand; the least "
        "recently used leave past this, never one in use)."
    )


class EmbeddingArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(default=32, ge=1, description="Requests merged into one forward pass.")
    batch_wait_timeout_s: float = Field(
        default=0.01, ge=0.0, description="How long a batch started from idle waits for more "
        "requests; under load each batch takes what queued during the last forward pass."
    )


class BatchArgs(BaseModel):
    """How ``/v1/batches`` run: Ray Data actors of their own, beside the serving replicas."""

    model_config = ConfigDict(extra="forbid")

    workers: int = Field(default=1, ge=1, description="Ray Data actors per batch, each with its own "
                         "engine (copy of the model).")
    num_cpus: float = Field(default=0.5, gt=0, description="CPUs each actor reserves.")
    num_gpus: float = Field(default=0, ge=0, description="GPUs each actor reserves.")
    max_batch_size: int = Field(default=32, ge=1, description="Sequences an actor's engine decodes "
                                "together (larger than online: no one waits on a batch's latency).")
    rows_per_call: int = Field(default=64, ge=1, description="Requests handed to an actor at a time "
                               "(Ray Data's batch_size); a cancel is seen within about a second.")


class AppArgs(BaseModel):
    """Arguments of the one maas Serve application."""

    model_config = ConfigDict(extra="forbid")

    storage: str | None = Field(
        default=None, description="Storage root (path or s3:// / gs:// URI); default $MAAS_HOME or ~/.maas."
    )
    max_body_bytes: int = Field(
        default=8 * 2**20, ge=1024, description="Largest request body accepted; larger gets 413."
    )
    max_upload_bytes: int = Field(
        default=512 * 2**20, ge=1024, description="Largest file accepted by POST /v1/files; larger gets 413."
    )
    max_json_depth: int = Field(
        default=32, ge=4, le=256, description="Deepest nesting of arrays/objects in a JSON body; deeper gets 400."
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="Origins browsers may call the API from (CORS); empty: "
        "none, the default. '*' allows any origin (without credentials)."
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
    model_transport: Literal["grpc", "ray"] = Field(
        default="grpc", description="How the ingress calls model replicas: 'grpc' sends calls of "
        "under 1 MiB and 64 inputs over Serve's gRPC transport (about 4.5 CPU ms less per request "
        "on 2 cores) and larger ones by reference; 'ray' sends every call as Ray objects (for "
        "clusters whose nodes cannot reach each other's replica gRPC ports)."
    )
    auth: Literal["auto", "on", "off"] = Field(
        default="auto", description="API keys on /v1 and /v2: 'auto' turns them on unless the HTTP "
        "server listens on loopback only (see http_host)."
    )
    http_host: str | None = Field(
        default=None, description="The interface Serve's HTTP proxy listens on, for auth='auto' "
        "and allowed_hosts (`maas up` passes its --host); unset: asked from the running Serve instance."
    )
    allowed_hosts: list[str] | None = Field(
        default=None, description="Names requests may carry in their Host header (any port): "
        "'example.com', '*.example.com' (its subdomains), '*' (any); others get 400. Unset: "
        "localhost, 127.0.0.1 and [::1] when the HTTP server listens on loopback only (so a web "
        "page cannot reach the local service through DNS rebinding), else any."
    )
    predictor: PredictorArgs = Field(default_factory=PredictorArgs, description="Tabular predictor.")
    llm: LLMArgs = Field(default_factory=LLMArgs, description="Chat/completion models.")
    embeddings: EmbeddingArgs = Field(default_factory=EmbeddingArgs, description="Embedding models.")
    batches: BatchArgs = Field(default_factory=BatchArgs, description="The Batch API (/v1/batches).")

    deployments: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per-deployment Serve options by name (Ingress, Predictor, LLMServer, "
        "EmbeddingServer): num_replicas, autoscaling_config, max_ongoing_requests, "
        "max_queued_requests, ray_actor_options... as in a Serve config's `deployments:` "
        "section, which wins over these when both set an option.",
    )

    @field_validator("deployments")
    @classmethod
    def _known_deployment_options(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from ray.serve.config import AutoscalingConfig
        from ray.serve.schema import DeploymentSchema

        for name, options in value.items():
            if name not in DEPLOYMENTS:
                raise ValueError(f"unknown deployment {name!r}; expected one of {list(DEPLOYMENTS)}")
            allowed = set(DeploymentSchema.model_fields) - {"name"}  # the key names it
            unknown = sorted(set(options) - allowed)
            if unknown:
                raise ValueError(f"deployments.{name}: unknown Serve options {unknown}")
            # Serve ignores unknown autoscaling keys; a typo there must not pass silently.
            typos = sorted(set(options.get("autoscaling_config") or {}) - set(AutoscalingConfig.model_fields))
            if typos:
                raise ValueError(f"deployments.{name}.autoscaling_config: unknown options {typos}")
            # Serve's own schema for a config's `deployments:` entry: same names,
            # same checks (e.g. num_replicas together with autoscaling_config).
            DeploymentSchema.model_validate({"name": name, **options})
        return value

    def auth_enabled(self, serve_host: str | None = None) -> bool:
        """Whether API keys are required: 'auto' is on unless the host is loopback."""
        if self.auth != "auto":
            return self.auth == "on"
        host = self.http_host or serve_host
        return not is_loopback(host) if host is not None else True

    def host_allow_list(self, serve_host: str | None = None) -> list[str]:
        """:attr:`allowed_hosts`, or its default for the interface Serve listens on."""
        if self.allowed_hosts is not None:
            return list(self.allowed_hosts)
        host = self.http_host or serve_host
        return list(LOOPBACK_NAMES) if host is not None and is_loopback(host) else ["*"]

    def storage_root(self) -> str:
        return storage.storage_root(self.storage)

    def deployment_options(self, name: str) -> dict[str, Any]:
        """Options for ``Deployment.options()`` from :attr:`deployments`."""
        return dict(self.deployments.get(name, {}))


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
