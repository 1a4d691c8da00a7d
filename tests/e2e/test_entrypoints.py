"""The two ways users start the service, as real processes talking real HTTP.

Each test owns its process group and tears it down in ``finally`` (SIGINT first,
so the command's own clean shutdown is exercised, then SIGKILL of that group).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from conftest import REPO, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BIN = Path(sys.executable).parent


def wait_for(check: Callable[[], bool], timeout_s: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before {what}")
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def stop(proc: subprocess.Popen, grace_s: float = 60) -> int | None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    code = proc.returncode
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of this group only
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)
    return code


def _env(tmp_path: Path) -> dict[str, str]:
    # RAY_ADDRESS=local: start a private Ray, never join the test session's one.
    return {**os.environ, "MAAS_HOME": str(tmp_path / "home"), "RAY_ADDRESS": "local",
            "PYTHONUNBUFFERED": "1"}


def test_serve_run_app_config_answers_healthz(tmp_path: Path) -> None:
    port = 8000  # the port apps/maas.yaml pins (a fixed point)
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([str(BIN / "serve"), "run", "apps/maas.yaml"], cwd=REPO, env=_env(tmp_path),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200,
                 240, proc, "serve run to answer /healthz")
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json() == {
            "object": "list", "data": []}
    finally:
        stop(proc)


def test_maas_up_serves_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    port, metrics = free_port(), free_port()
    log_path = tmp_path / "up.log"
    proc = subprocess.Popen(
        [str(BIN / "maas"), "up", "--port", str(port), "--metrics-port", str(metrics)],
        cwd=REPO, env=_env(tmp_path),
        stdout=log_path.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200,
                 240, proc, "maas up to answer /healthz")
        r = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10)
        assert r.status_code == 200
        # first start on an empty registry imported the offline base models
        assert {m["id"] for m in r.json()["data"]} >= {"smollm2-135m-instruct", "all-minilm-l6-v2"}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/models/missing/predict", json={"inputs": [[1.0]]})
        assert r.status_code == 404
        wait_for(lambda: "maas is up" in log_path.read_text(), 60, proc, "the start-up banner")
    finally:
        code = stop(proc)
    assert code == 0, log_path.read_text()[-3000:]
