"""Which transport a model call takes: gRPC for small calls, by reference past its 4 MiB cap."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest

from maas_ray.engines.engine import SamplingParams
from maas_ray.serve.calls import GRPC_MAX_ARG_BYTES, GRPC_MAX_ITEMS, model_handle, wire_size
from maas_ray.serve.settings import AppArgs


class RecordingHandle:
    def options(self, **options: Any) -> dict[str, Any]:
        return options


class Ctx:
    def __init__(self) -> None:
        self.handles: dict[str, Any] = {"llm": RecordingHandle(), "predictor": RecordingHandle()}
        self.settings = AppArgs()


def by_reference(*args: Any, items: int = 1) -> bool:
    return model_handle(Ctx(), "predictor", "m:1", *args, items=items)["_by_reference"]


def test_wire_size_counts_arrays_text_and_nested_arguments() -> None:
    rows = np.zeros((4, 8))
    assert wire_size(rows) == 256
    assert wire_size(["ab", {"role": "user", "content": "x" * 100}]) == 2 + 4 + 4 + 7 + 100
    params = SamplingParams(max_tokens=4, stop=["y" * 50])
    assert wire_size(params) >= 50
    # Stops counting soon after the limit: a huge list is not walked to its end.
    assert GRPC_MAX_ARG_BYTES < wire_size(["z" * 1000] * 10**6) < GRPC_MAX_ARG_BYTES + 2000


def test_small_calls_go_over_grpc_and_large_ones_by_reference() -> None:
    assert not by_reference(np.zeros((1, 256)))
    assert by_reference(np.zeros((600, 256)))  # 1.2 MB of arguments
    assert by_reference(np.zeros((GRPC_MAX_ITEMS + 1, 2)), items=GRPC_MAX_ITEMS + 1)  # the answer grows
    long_prompt = [{"role": "user", "content": "hello " * 200_000}]
    assert by_reference(long_prompt, SamplingParams())
    assert not by_reference([{"role": "user", "content": "hello"}], SamplingParams())
    options = model_handle(Ctx(), "llm", "base:1", "hi", stream=True)
    assert options == {"multiplexed_model_id": "base:1", "_by_reference": False, "stream": True}


def test_model_transport_ray_sends_every_call_by_reference() -> None:
    ctx = Ctx()
    ctx.settings = AppArgs(model_transport="ray")
    assert model_handle(ctx, "predictor", "m:1", np.zeros((1, 4)))["_by_reference"]


@pytest.mark.integration
def test_a_call_past_grpcs_4_mib_cap_goes_by_reference_and_arrives(serve_url: str) -> None:
    """In Serve: 5 MiB of arguments and 5 MiB of answer, through :func:`model_handle`, arrive
    whole; forced over gRPC the same call fails (the cap that makes the choice necessary)."""
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0.05})
    class Echo:
        def length(self, text: str) -> int:
            return len(text)

        def text(self, n: int) -> str:
            return "x" * n

    app, big = "grpc-cap-test", 5 << 20
    handle = serve.run(Echo.bind(), name=app, route_prefix=None)
    try:
        ctx = Ctx()
        ctx.handles = {"echo": handle}
        assert model_handle(ctx, "echo", "m:1", "x" * big).length.remote("x" * big).result(timeout_s=60) == big
        assert model_handle(ctx, "echo", "m:1", "small").length.remote("small").result(timeout_s=60) == 5
        with pytest.raises(grpc.aio.AioRpcError, match="larger than max"):
            handle.options(_by_reference=False).length.remote("x" * big).result(timeout_s=60)
        # An answer over the cap is the caller's to foresee (items=, calls.py); by reference it arrives.
        assert len(handle.options(_by_reference=True).text.remote(big).result(timeout_s=60)) == big
        with pytest.raises(grpc.aio.AioRpcError, match="larger than max"):
            handle.options(_by_reference=False).text.remote(big).result(timeout_s=60)
    finally:
        serve.delete(app)
