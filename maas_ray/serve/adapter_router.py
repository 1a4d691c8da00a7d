"""Serve request router for the LLM deployment: a LoRA fine-tune's request goes to a
replica that holds its base and, among those, first to one that already loaded its
adapter.

The ingress sends a fine-tune's request with its base's id as the multiplexed model id
(:func:`~maas_ray.serve.openai.serving.replica_key`), so Serve's multiplex routing
already picks replicas that hold the base. The adapter itself is the request's first
argument (the version id). Each replica reports the adapters its engines hold
(``LLMServer.record_routing_stats``, every ``request_routing_stats_period_s``); this
router ranks the replicas that list the adapter first and the other base holders
second, and runs the power of two choices within each rank, so a busy warm replica
still gives way to a cold one (loading an adapter costs milliseconds, not a base load).

Built as Ray's own ``PrefixCacheAffinityRouter`` is (locality + multiplex mixins,
without FIFO matching, so the replica chosen for a request serves that request).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ray.serve.request_router import (
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    RequestRouter,
    RunningReplica,
)

R = TypeVar("R")


def wanted_adapter(request: PendingRequest | None) -> str | None:
    """The version a generation request names when it differs from the model the replica
    loads (a fine-tune served on its base's engine); None otherwise."""
    if request is None or not request.args or not isinstance(request.args[0], str):
        return None
    model = request.metadata.multiplexed_model_id
    return request.args[0] if model and request.args[0] != model else None


def adapter_ranks(replicas: Sequence[R], adapter: str | None,
                  loaded: Callable[[R], Sequence[str]]) -> list[list[R]]:
    """Up to two random replicas that hold ``adapter``, then up to two of the rest:
    the power of two choices, warm replicas first."""
    warm: list[R] = []
    cold: list[R] = []
    for r in replicas:
        (warm if adapter is not None and adapter in loaded(r) else cold).append(r)
    return [random.sample(rank, min(2, len(rank))) for rank in (warm, cold) if rank]


def _loaded(replica: RunningReplica) -> Sequence[str]:
    return (replica.routing_stats or {}).get("adapters", ())


class AdapterAffinityRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """Multiplexed power of two choices that prefers replicas holding the request's adapter."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            ids: Any = self.apply_multiplex_routing(pending_request=pending_request)
        else:
            ids = self.apply_locality_routing(pending_request=pending_request)
        replicas = [self._replicas[i] for i in ids if i in self._replicas]
        return adapter_ranks(replicas, wanted_adapter(pending_request), _loaded)
