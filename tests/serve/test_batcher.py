"""ContinuousBatcher on its own (no Ray): batches form from what queued during the last one."""

from __future__ import annotations

import asyncio

import pytest

from maas_ray.serve.batcher import ContinuousBatcher


def test_requests_arriving_during_a_batch_form_the_next_one_whole() -> None:
    """While one batch runs, 20 requests arrive one by one; they must run as one batch,
    not as many small ones (Ray's @serve.batch cut them by its wait timeout)."""
    sizes: list[int] = []
    release = asyncio.Event()

    async def run(items: list[int]) -> list[int]:
        sizes.append(len(items))
        if len(sizes) == 1:
            await release.wait()  # the first batch runs until all the others have queued
        return [2 * x for x in items]

    async def main() -> list[int]:
        batcher = ContinuousBatcher(run, max_batch_size=64, wait_s=0.0)
        first = asyncio.ensure_future(batcher.submit(-1))
        await asyncio.sleep(0.01)
        rest = []
        for i in range(20):
            rest.append(asyncio.ensure_future(batcher.submit(i)))
            await asyncio.sleep(0.002)  # longer than no wait at all: a timer would cut here
        release.set()
        return [await first, *await asyncio.gather(*rest)]

    assert asyncio.run(main()) == [-2, *(2 * i for i in range(20))]
    assert sizes == [1, 20]


def test_an_item_that_fails_gets_its_own_error_and_a_failed_run_fails_its_batch_only() -> None:
    async def run(items: list[int]) -> list[int | Exception]:
        if 99 in items:
            raise RuntimeError("model crashed")
        return [ValueError(f"bad {x}") if x < 0 else x for x in items]

    async def main() -> None:
        batcher = ContinuousBatcher(run, max_batch_size=8, wait_s=0.01)
        results = await asyncio.gather(*(batcher.submit(x) for x in (1, -2, 3)), return_exceptions=True)
        assert results[0] == 1 and results[2] == 3
        assert isinstance(results[1], ValueError) and "bad -2" in str(results[1])
        with pytest.raises(RuntimeError, match="crashed"):
            await batcher.submit(99)
        assert await batcher.submit(4) == 4  # the loop survived the failed batch

    asyncio.run(main())


def test_batches_stop_at_max_batch_size_and_cancelled_requests_are_skipped() -> None:
    seen: list[list[int]] = []

    async def run(items: list[int]) -> list[int]:
        seen.append(items)
        await asyncio.sleep(0)
        return items

    async def main() -> None:
        batcher = ContinuousBatcher(run, max_batch_size=3, wait_s=0.01)
        futures = [asyncio.ensure_future(batcher.submit(i)) for i in range(7)]
        await asyncio.sleep(0)  # all seven queued
        futures[5].cancel()
        await asyncio.gather(*futures, return_exceptions=True)

    asyncio.run(main())
    assert seen == [[0, 1, 2], [3, 4, 6]]  # 5 was cancelled while queued: its slot went to 6
