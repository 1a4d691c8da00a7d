"""The JSON depth check as ASGI middleware, in-process (no Ray): linear, bounded, and off the
event loop for large bodies (issue 14, item 1). The session app's 64 KiB body limit refuses a
1 MiB JSON body unread (tests/serve/test_uploads.py); an app at the default 8 MiB limit reads
and depth-checks it, which is what this proves cheap."""

from __future__ import annotations

import asyncio
import time

import pytest

from maas_ray.serve.limits import JsonDepthLimit

MiB = 1 << 20
ADVERSARIAL = {
    "unterminated escaped quotes": b'{"a": "' + b'\\"' * (MiB // 2 - 8),  # quadratic regex before
    "deep brackets": b"[" * MiB,
    "balanced brackets": b"[" * (MiB // 2) + b"]" * (MiB // 2),  # ~0.5 s of regex passes before
    "bare quotes": b'"' * MiB,
    "escaped backslashes": b'["' + b"\\\\" * (MiB // 2 - 4) + b'"]',
}


async def answer(body: bytes) -> tuple[int, float]:
    """Send ``body`` through the middleware in 64 KiB messages; the status and the longest the
    event loop was held while it was checked."""
    async def app(scope, receive, send):  # what would run next: FastAPI
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    chunks = [body[i:i + 64 * 1024] for i in range(0, len(body), 64 * 1024)]

    async def receive():
        return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks[1:])}

    sent = []

    async def send(message):
        sent.append(message)

    gaps, done = [0.0], False

    async def ticker():  # wakes every 5 ms; how late it wakes is how long the loop was held
        while not done:
            start = time.perf_counter()
            await asyncio.sleep(0.005)
            gaps.append(time.perf_counter() - start - 0.005)

    tick = asyncio.create_task(ticker())
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
             "headers": [(b"content-type", b"application/json")]}
    await JsonDepthLimit(app, max_depth=lambda: 32)(scope, receive, send)
    done = True
    await tick
    return sent[0]["status"], max(gaps)


@pytest.mark.parametrize("kind", sorted(ADVERSARIAL))
def test_a_megabyte_json_body_is_depth_checked_in_100_ms_off_the_loop(kind: str) -> None:
    timings = []
    for _ in range(5):  # the fastest of five: the bound is on the work, not on a busy machine
        start = time.perf_counter()
        status, stalled = asyncio.run(answer(ADVERSARIAL[kind]))
        timings.append((time.perf_counter() - start, stalled))
    took, stalled = min(timings)
    assert status == (400 if "brackets" in kind else 200)
    assert took < 0.1, f"{kind}: {took * 1000:.0f} ms"
    assert stalled < 0.05, f"{kind}: the event loop stalled {stalled * 1000:.0f} ms"
