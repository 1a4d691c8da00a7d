"""The web console in a real browser: Debian's Chromium driven by Playwright.

Playwright's Python package talks to ``/usr/bin/chromium`` (``.ci/run`` / ``make
browser`` install it); it never downloads a browser of its own. Without the
browser these tests skip, saying so. Screenshots go to ``test-artifacts/console/``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

CHROMIUM = os.environ.get("MAAS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = REPO / "test-artifacts" / "console"
CHAT, EMB = "smollm2-135m-instruct", "all-minilm-l6-v2"
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (make browser)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]'")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, serve_url: str) -> Iterator[object]:
    context = browser.new_context(base_url=serve_url, viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda err: errors.append(str(err)))
    try:
        yield pg
        assert not errors, f"JavaScript errors: {errors}"
    finally:
        context.close()


def open_view(page, route: str) -> None:
    page.goto(f"/#/{route}")
    page.wait_for_selector('main[data-ready="true"]')


def assert_labelled(page) -> None:
    """Every form control on the page has a label a screen reader announces."""
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
        .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label'))
        .map(el => el.id || el.outerHTML.slice(0, 60))""")
    assert unlabelled == []


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_console_is_served_offline_and_cards_over_http(serve_url: str, regression_model, llm_home,
                                                        maas_home: str) -> None:
    from maas_ray.registry import Registry

    with httpx.Client(base_url=serve_url, timeout=60) as c:
        index = c.get("/")
        assert index.status_code == 200 and "text/html" in index.headers["content-type"]
        assert "default-src 'self'" in index.headers["content-security-policy"]
        # Nothing loads from another origin: every src/href is local.
        assert "http://" not in index.text and "https://" not in index.text
        assert c.get("/console/app.js").headers["content-type"].startswith("text/javascript")
        assert c.get("/console/style.css").status_code == 200
        for bad in ("/console/..%2Fconsole.py", "/console/.hidden", "/console/missing.js"):
            assert c.get(bad).status_code == 404, bad

        mv = regression_model[0].version
        card = c.get(f"/v1/models/{mv.id}/card").json()
        assert card["id"] == mv.id and card["plot_url"] == f"/v1/models/{mv.id}/card/plot.png"
        assert "## Metrics" in card["markdown"] and "test_mse" in card["markdown"]
        png = c.get(card["plot_url"])
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        stored = Registry(maas_home).local_dir(mv) / mv.card["loss_plot"]
        assert png.content == stored.read_bytes()

        base = c.get(f"/v1/models/{CHAT}/card").json()
        assert base["plot_url"] is None and base["card"]["task"] == "chat"
        missing = c.get(f"/v1/models/{CHAT}/card/plot.png")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "no_training_curve"
        assert c.get("/v1/models/no-such-model/card").status_code == 404


def test_models_page_lists_imported_models_with_cards(page, regression_model, llm_home) -> None:
    mv = regression_model[0].version
    seen_auth: list[str | None] = []
    page.on("request", lambda r: seen_auth.append(r.headers.get("authorization"))
            if r.url.endswith("/v1/models") else None)
    open_view(page, "models")
    for name in (CHAT, EMB, mv.name):
        page.wait_for_selector(f'li[data-model="{name}"] h2 a')
    # The trained model's card shows its loss plot, actually decoded by the browser.
    thumb = page.wait_for_selector(f'li[data-model="{mv.name}"] .thumb img')
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=thumb)
    assert_labelled(page)
    shot(page, "models")

    # The API key typed at the top is kept for the tab and sent as a Bearer token.
    page.fill("#api-key", "sk-test-123")
    page.press("#api-key", "Tab")
    page.wait_for_selector('main[data-ready="true"]')
    assert page.evaluate("sessionStorage.getItem('maas.apiKey')") == "sk-test-123"
    page.wait_for_function("() => document.querySelector('#api-key').value === 'sk-test-123'")
    assert seen_auth[0] is None and "Bearer sk-test-123" in seen_auth[1:]

    # Keyboard: the model's link opens its card page, with the plot and the metrics.
    page.focus(f'li[data-model="{mv.name}"] h2 a')
    page.keyboard.press("Enter")
    page.wait_for_selector('main[data-view="model"][data-ready="true"]')
    plot = page.wait_for_selector('main img[data-ref="plot"]')
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=plot)
    assert "test_mse" in page.inner_text('table[data-ref="metrics"]')
    assert page.evaluate("document.activeElement.tagName") == "H1"  # focus moved to the new page
    shot(page, "model-card")

    page.set_viewport_size({"width": 390, "height": 844})  # a phone
    open_view(page, "models")
    page.wait_for_selector(f'li[data-model="{CHAT}"]')
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    shot(page, "models-mobile")


def test_chat_playground_streams_the_reply(page, serve_url: str, llm_home) -> None:
    question = "What is the capital of France?"
    params = {"temperature": 0, "max_tokens": 24}
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data))
            if r.url.endswith("/v1/chat/completions") else None)
    open_view(page, f"chat?model={CHAT}")
    assert page.input_value("#chat-model") == CHAT
    assert_labelled(page)
    page.fill("#chat-temperature", "0")
    page.fill("#chat-max-tokens", str(params["max_tokens"]))
    page.fill("#chat-input", question)
    page.press("#chat-input", "Enter")  # Enter sends
    reply = page.wait_for_selector("li.msg.assistant[data-finish]")
    text = reply.query_selector(".content").inner_text().strip()
    chunks = int(reply.query_selector(".content").get_attribute("data-chunks"))
    shot(page, "chat")

    assert bodies and bodies[0]["stream"] is True and bodies[0]["model"] == CHAT
    assert chunks > 1, "the reply arrived in one piece, not streamed"
    # Greedy: the streamed reply is exactly what the API answers without streaming.
    want = httpx.post(f"{serve_url}/v1/chat/completions", timeout=120, json={
        "model": CHAT, "messages": [{"role": "user", "content": question}], **params})
    assert text == want.json()["choices"][0]["message"]["content"].strip()
    assert "tokens" in page.inner_text('[data-ref="stats"]')


def test_embeddings_playground_ranks_similar_texts(page, llm_home) -> None:
    open_view(page, f"embeddings?model={EMB}")
    assert_labelled(page)
    page.click('form button[type="submit"]')
    page.wait_for_selector('section[data-ref="results"]:not([hidden])')
    cells = page.eval_on_selector_all(
        'table[data-ref="similarity"] tbody tr',
        "rows => rows.map(r => [...r.querySelectorAll('td')].map(td => Number(td.textContent)))")
    shot(page, "embeddings")
    assert len(cells) == 3 and abs(cells[0][0] - 1) < 1e-3
    # The default texts: a cat / a kitten are closer than a cat / the stock market.
    assert cells[0][1] > cells[0][2]


def test_fine_tune_job_page_shows_status_and_cancels(page, serve_url: str, llm_home) -> None:
    with httpx.Client(base_url=serve_url, timeout=120) as c:
        if c.get("/v1/fine_tuning/jobs").status_code == 404:
            pytest.skip("/v1/fine_tuning/jobs is not on this app (404)")
        data = (REPO / "examples/finetune/chat.jsonl").read_bytes()
        up = c.post("/v1/files", files={"file": ("chat.jsonl", data)}, data={"purpose": "fine-tune"})
        assert up.status_code == 200, up.text
        r = c.post("/v1/fine_tuning/jobs", json={"model": CHAT, "training_file": up.json()["id"],
                                                 "suffix": "console", "hyperparameters": {"n_epochs": 1}})
        assert r.status_code == 200, r.text
        job = r.json()
        try:
            open_view(page, "jobs")
            row = page.wait_for_selector(f'tr[data-job="{job["id"]}"]')
            assert row.query_selector(".badge").inner_text() in (
                "validating_files", "queued", "running", "succeeded", "failed", "cancelled")
            shot(page, "jobs")

            row.query_selector("a").click()
            page.wait_for_selector('main[data-view="job"][data-ready="true"]')
            badge = page.wait_for_selector('[data-ref="status"]')
            # What the page shows is what the API says (the job moves on: compare until they meet).
            deadline = time.monotonic() + 60
            while badge.inner_text() != c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"]:
                assert time.monotonic() < deadline, f"page shows {badge.inner_text()!r}"
                page.wait_for_timeout(500)
            assert page.inner_text('[data-ref="details"]').count(CHAT) >= 1
            page.wait_for_selector("ol.events li")
            assert_labelled(page)
            shot(page, "job")
            # The live chart draws metrics events as the API shapes them (train every step,
            # validation at epoch ends); checked on a copy of the canvas, pixel colours.
            drawn = page.evaluate("""() => {
                const canvas = document.createElement('canvas');
                canvas.style.width = '640px';
                document.querySelector('main').append(canvas);
                const pts = Array.from({length: 30}, (_, i) => ({step: i + 1, train_loss: 3 / (i + 1)}));
                pts.push({step: 15, valid_loss: 0.9}, {step: 30, valid_loss: 0.5});
                drawLossChart(canvas, pts);
                const d = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
                const has = (r, g, b) => { for (let i = 0; i < d.length; i += 4)
                    if (Math.abs(d[i] - r) < 8 && Math.abs(d[i+1] - g) < 8 && Math.abs(d[i+2] - b) < 8) return true;
                    return false; };
                canvas.remove();
                return {train: has(0x1f, 0x77, 0xb4), valid: has(0xd6, 0x27, 0x28)};
            }""")
            assert drawn == {"train": True, "valid": True}

            cancel = page.query_selector('[data-ref="cancel"]')
            if cancel.is_visible():
                cancel.click()
                page.wait_for_function("el => el.textContent === 'cancelled'", arg=badge)
                assert c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "cancelled"
                assert not cancel.is_visible()
                shot(page, "job-cancelled")
        finally:
            c.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")  # never leave it training
