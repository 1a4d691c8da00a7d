"""Application metrics of the Serve app, exported on Ray's Prometheus endpoint.

Recorded with ``ray.util.metrics`` in whichever replica does the work; Ray's
metrics agent on each node serves them (``maas up --metrics-port``, default
8080) with a ``ray_`` prefix, counters with ``_total``: ``ray_maas_requests_total``,
``ray_maas_request_latency_seconds_bucket``... Every process reports every
``RAY_metrics_report_interval_ms`` (10 s by default, at least 1 s), so a scrape
lags recording by up to that long.

Labels stay low-cardinality and carry no tenant data: ``route`` is the route
*template* (``/v1/models/{model_id}/predict``), ``model`` a registry *name* that
resolved (never an arbitrary id a client typed) and, for a fine-tuned model,
only ``ft:{base}`` (see :func:`model_label`), ``deployment`` a fixed name.
``cluster/grafana-dashboard.json`` plots them.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from maas_ray.registry import ModelVersion
from maas_ray.telemetry import KeptGauge
from maas_ray.serve.context import ServiceContext

logger = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])
G = TypeVar("G", bound=Callable[..., Any])

# Seconds: from a 1 ms tabular predict to a minutes-long generation stream.
LATENCY_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
TTFT_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]

# name → (kind, description, tag keys[, boundaries]); the dashboard test checks
# every series cluster/grafana-dashboard.json plots is defined here.
DEFINITIONS: dict[str, tuple[Any, ...]] = {
    "maas_requests": ("counter", "HTTP requests answered, by route template, model and status.",
                      ("route", "model", "status")),
    "maas_request_latency_seconds": ("histogram", "Time from request to the last response byte.",
                                     ("route", "model"), LATENCY_BUCKETS_S),
    "maas_batch_size": ("histogram", "Requests merged into one forward pass, per deployment and model.",
                        ("deployment", "model"), BATCH_BUCKETS),
    # Ray rebuilds histograms from bucket counts (their _sum is approximate): this
    # exact count over maas_batch_size_count is the mean batch size.
    "maas_batched_requests": ("counter", "Requests that went through a batched forward pass.",
                              ("deployment", "model")),
    "maas_ongoing_requests": ("gauge", "Requests inside a model replica right now (queued or running).",
                              ("deployment",)),
    "maas_llm_sequences": ("gauge", "Sequences in a chat model's engine: state=running|waiting.",
                           ("model", "state")),
    "maas_generated_tokens": ("counter", "Completion tokens generated; rate() is tokens/s.", ("model",)),
    "maas_prompt_tokens": ("counter", "Prompt tokens prefilled for generation.", ("model",)),
    "maas_time_to_first_token_seconds": ("histogram", "From a generation request reaching the model "
                                         "replica to its first token.", ("model",), TTFT_BUCKETS_S),
}


@functools.cache
def metric(name: str) -> Any:
    """The process's one instance of metric ``name`` (created on first use, inside Ray)."""
    from ray.util import metrics

    kind, description, tags, *rest = DEFINITIONS[name]
    if kind == "counter":
        return metrics.Counter(name, description=description, tag_keys=tags)
    if kind == "gauge":  # kept exported while idle (see maas_ray.telemetry)
        return KeptGauge(name, description, tags)
    return metrics.Histogram(name, description=description, boundaries=rest[0], tag_keys=tags)


# -- ingress: requests by route/model/status ----------------------------------

@dataclass
class _RequestLabels:
    """Filled in while a request runs; the middleware reads it at the end."""

    models: set[str] = field(default_factory=set)


_LABELS: contextvars.ContextVar[_RequestLabels | None] = contextvars.ContextVar(
    "maas_request_labels", default=None)


class MeteredContext(ServiceContext):
    """The ingress context, noting each model a request resolves for its labels."""

    def resolve(self, model_id: str) -> ModelVersion:
        mv = super().resolve(model_id)
        labels = _LABELS.get()
        if labels is not None:
            labels.models.add(model_label(mv.name))
        return mv


class RequestMetrics:
    """Pure ASGI middleware: count and time every HTTP request.

    Outermost, so requests refused by inner middleware (413) count too, under
    the route template their path matches (from the OpenAPI paths). A
    request that resolved exactly one model is labelled with its name; listing
    routes and unknown models get ``model=""``.
    """

    def __init__(self, app: Any, paths: Callable[[], list[str]]) -> None:
        self.app, self._paths = app, paths
        self._templates: list[tuple[re.Pattern[str], str]] | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        labels = _RequestLabels()
        token = _LABELS.set(labels)
        status = 500  # an exception that escapes every handler

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            _LABELS.reset(token)
            route = self._route(scope)
            model = next(iter(labels.models)) if len(labels.models) == 1 else ""
            metric("maas_requests").inc(tags={"route": route, "model": model, "status": str(status)})
            metric("maas_request_latency_seconds").observe(
                time.perf_counter() - start, tags={"route": route, "model": model})

    def _route(self, scope: dict[str, Any]) -> str:
        path = getattr(scope.get("route"), "path", None)
        if path is None:  # refused before routing (413): match the templates ourselves
            if self._templates is None:
                from starlette.routing import compile_path

                self._templates = [(compile_path(p)[0], p) for p in self._paths()]
            path = next((p for regex, p in self._templates if regex.match(scope["path"])), None)
        return path or "unmatched"


# -- model deployments ---------------------------------------------------------

_ONGOING: dict[str, int] = {}  # deployment → requests inside this replica (one process)


def _ongoing(deployment: str, delta: int) -> None:
    _ONGOING[deployment] = _ONGOING.get(deployment, 0) + delta
    metric("maas_ongoing_requests").set(_ONGOING[deployment], tags={"deployment": deployment})


def track_ongoing(deployment: str) -> Callable[[F], F]:
    """Decorate a replica's async entry method: count requests inside it."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            _ongoing(deployment, +1)
            try:
                return await fn(*args, **kwargs)
            finally:
                _ongoing(deployment, -1)

        return wrapper  # type: ignore[return-value]

    return wrap


def observe_batch(deployment: str, model_id: str, size: int) -> None:
    """One forward pass of ``size`` merged requests for ``model_id`` (name:version)."""
    tags = {"deployment": deployment, "model": model_label(model_id)}
    metric("maas_batch_size").observe(size, tags=tags)
    metric("maas_batched_requests").inc(size, tags=tags)


def model_label(model_id: str) -> str:
    """The ``model`` label of ``name`` or ``name:version``: the name (versions would grow
    series forever); a fine-tuned ``ft:{base}:{suffix}:{job_id}[:version]`` is ``ft:{base}``.

    Anyone who reaches the metrics port reads the labels without a key, and a full
    fine-tuned name is a tenant's job id and suffix: the id another tenant would need
    to reach the model. All of one base's fine-tunes share a series, which also keeps
    one series per job from piling up.
    """
    head, sep, tail = model_id.rpartition(":")
    name = head if sep and tail.isascii() and tail.isdigit() else model_id
    return "ft:" + name.split(":")[1] if name.startswith("ft:") else name


class _FineTunedAsBase:
    """A Ray gauge whose ``model_id`` tag names a fine-tuned model only by its base."""

    def __init__(self, gauge: Any) -> None:
        self._gauge = gauge

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        tags = dict(tags or {})
        if tags.get("model_id", "").startswith("ft:"):
            tags["model_id"] = model_label(tags["model_id"])
        self._gauge.set(value, tags=tags)


def _relabel_serve_multiplexing() -> None:
    """Ray Serve's own ``serve_registered_multiplexed_model_id`` gauge carries each loaded
    model's multiplexed id, here ``name:version``: for a fine-tuned model, its job id, on
    the same open endpoint. Fine-tuned ids get :func:`model_label` there too (models of one
    base then share a series: an unload may read 0 until Serve's next push, 0.1 s later).

    Done on import, since every model replica imports this module before it loads a model;
    ``_ModelMultiplexWrapper`` is Serve's internal (as of Ray 2.60), so a Ray without it
    only gets a warning.
    """
    try:
        from ray.serve.multiplex import _ModelMultiplexWrapper as wrapper
    except ImportError:
        logger.warning("ray.serve.multiplex has changed: its gauge of model ids is not relabelled")
        return
    if getattr(wrapper, "_maas_relabelled", False):
        return
    init = wrapper.__init__

    @functools.wraps(init)
    def relabelled(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.registered_model_gauge = _FineTunedAsBase(self.registered_model_gauge)

    wrapper.__init__ = relabelled
    wrapper._maas_relabelled = True


_relabel_serve_multiplexing()


def meter_generation(deployment: str) -> Callable[[G], G]:
    """Decorate ``generate(self, model_id, ...)``, an async generator of dicts
    (``{"prompt_tokens"}`` or an error first, then ``{"completion_tokens", ...}`` chunks):
    prompt and generated tokens, time to first token, the engine's queue (read
    through ``self.stats(model_id)``) and ongoing requests."""

    def wrap(fn: G) -> G:
        @functools.wraps(fn)
        async def wrapper(self: Any, model_id: str, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            tags = {"model": model_label(model_id)}
            start, done = time.perf_counter(), 0
            _ongoing(deployment, +1)
            try:
                async for item in fn(self, model_id, *args, **kwargs):
                    if not isinstance(item, dict):  # the request's APIError: nothing ran
                        yield item
                        continue
                    if "prompt_tokens" in item:
                        metric("maas_prompt_tokens").inc(item["prompt_tokens"], tags=tags)
                    count = item.get("completion_tokens", 0)
                    if count > done:
                        if done == 0:
                            metric("maas_time_to_first_token_seconds").observe(
                                time.perf_counter() - start, tags=tags)
                            await _queue(self, model_id, tags)
                        metric("maas_generated_tokens").inc(count - done, tags=tags)
                        done = count
                    yield item
            finally:
                _ongoing(deployment, -1)
                await _queue(self, model_id, tags)

        return wrapper  # type: ignore[return-value]

    return wrap


async def _queue(server: Any, model_id: str, tags: dict[str, str]) -> None:
    try:
        stats = await server.stats(model_id)
    except Exception:  # the model failed to load: nothing is queued for it
        return
    for state in ("running", "waiting"):
        metric("maas_llm_sequences").set(stats.get(state, 0), tags={**tags, "state": state})
