"""The LLM deployment's request router (issue 17, item 3): among replicas that hold a
fine-tune's base, those that already loaded its adapter come first.

The ranking is tested without Ray; then the router itself, in Ray Serve, in front of two
replicas of a stand-in deployment whose replicas "load" an adapter on its first request
and report it as ``LLMServer`` does (``record_routing_stats``). Every later request for
that adapter must reach the replica that holds it: power of two choices alone would send
each one to either replica with even odds.
"""

from __future__ import annotations

import time

import pytest
from ray.serve._private.common import RequestMetadata
from ray.serve.request_router import PendingRequest

from maas_ray.serve.adapter_router import adapter_ranks, wanted_adapter

BASE = "smollm2-135m-instruct:1"


def _request(model_id: str, *args) -> PendingRequest:
    return PendingRequest(args=list(args), kwargs={}, future=None, metadata=RequestMetadata(
        request_id="r", internal_request_id="i", multiplexed_model_id=model_id))


def test_the_adapter_is_the_version_a_request_names_beside_its_base() -> None:
    assert wanted_adapter(_request(BASE, "ft:tenant-a:1", "prompt")) == "ft:tenant-a:1"
    assert wanted_adapter(_request(BASE, BASE, "prompt")) is None  # the base itself
    assert wanted_adapter(_request("", "ft:tenant-a:1")) is None  # not multiplexed
    assert wanted_adapter(_request(BASE)) is None
    assert wanted_adapter(None) is None


def test_replicas_holding_the_adapter_rank_first() -> None:
    loaded = {"r1": ["ft:a:1"], "r2": [], "r3": ["ft:a:1", "ft:b:1"], "r4": ["ft:b:1"]}
    for _ in range(20):
        ranks = adapter_ranks(list(loaded), "ft:a:1", loaded.__getitem__)
        assert sorted(ranks[0]) == ["r1", "r3"]
        assert len(ranks) == 2 and len(ranks[1]) == 2 and set(ranks[1]) <= {"r2", "r4"}
    assert adapter_ranks(["r2"], "ft:a:1", loaded.__getitem__) == [["r2"]]  # nobody warm: the rest
    ranks = adapter_ranks(list(loaded), None, loaded.__getitem__)  # the base: one rank of two
    assert len(ranks) == 1 and len(ranks[0]) == 2
    assert adapter_ranks([], "ft:a:1", loaded.__getitem__) == []


@pytest.mark.integration
def test_requests_for_a_loaded_adapter_reach_the_replica_that_holds_it(serve_url: str) -> None:
    # serve_url: Serve started with the session's HTTP options before this app joins it.
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    @serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.05},
                      request_router_config=RequestRouterConfig(
                          request_router_class="maas_ray.serve.adapter_router.AdapterAffinityRouter",
                          request_routing_stats_period_s=0.5))
    class StandIn:
        def __init__(self) -> None:
            self.loaded: set[str] = set()

        def generate(self, model_id: str) -> str:
            if model_id != serve.get_multiplexed_model_id():
                self.loaded.add(model_id)
            return serve.get_replica_context().replica_id.unique_id

        def record_routing_stats(self) -> dict:
            return {"adapters": sorted(self.loaded)}

    app = "adapter-router-test"
    handle = serve.run(StandIn.bind(), name=app, route_prefix=None)
    try:
        call = handle.options(multiplexed_model_id=BASE).generate
        replicas = {call.remote(BASE).result(timeout_s=60) for _ in range(40)}
        assert len(replicas) == 2, "the base's requests never reached both replicas"
        holder = call.remote("ft:tenant-a:1").result(timeout_s=60)
        time.sleep(3)  # the controller collects routing stats every 0.5 s and pushes them to the router
        later = [call.remote("ft:tenant-a:1").result(timeout_s=60) for _ in range(16)]
        assert later == [holder] * 16, f"{later.count(holder)} of 16 reached the replica with the adapter"
    finally:
        serve.delete(app)
