"""The two ways users start the service, as real processes talking real HTTP, and a
fine-tune job beside a plain `maas up`.

Each process runs in a group of its own, torn down in ``finally`` (SIGINT first,
so the command's own clean shutdown is exercised, then SIGKILL of that group and
of any process its Ray left outside the group).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from tests.conftest import REPO, free_port
from maas_ray.cli.up import _port_free

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BIN = Path(sys.executable).parent
STOP_BOUND_S = 10.0  # Ctrl-C to exit, with every process gone and the ports free


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


def start(args: list[str], tmp_path: Path, log_path: Path) -> subprocess.Popen:
    """``args`` in a session of its own with SIGINT at its default, as a terminal
    starts a command (a shell's background jobs, pytest's under ``&``, ignore it)."""
    return subprocess.Popen(args, cwd=REPO, env=_env(tmp_path), stdout=log_path.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


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
    proc = start([str(BIN / "serve"), "run", "apps/maas.yaml"], tmp_path, tmp_path / "serve.log")
    try:
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200,
                 240, proc, "serve run to answer /healthz")
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json() == {
            "object": "list", "data": []}
    finally:
        stop(proc)


@dataclass
class Up:
    """A running ``maas up`` (default app config, embedded Ray on this machine's CPUs)."""

    proc: subprocess.Popen
    tmp: Path
    port: int
    metrics: int
    log_path: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def args(self) -> list[str]:
        return [str(BIN / "maas"), "up", "--port", str(self.port), "--metrics-port", str(self.metrics)]


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """One first start on an empty registry, shared by the tests below (a start costs a
    minute on 2 CPUs); the Ctrl-C test ends it."""
    tmp = tmp_path_factory.mktemp("up")
    running = Up(None, tmp, free_port(), free_port(), tmp / "up.log")  # type: ignore[arg-type]
    running.proc = start(running.args, tmp, running.log_path)
    try:
        wait_for(lambda: httpx.get(f"{running.base}/healthz", timeout=2).status_code == 200,
                 240, running.proc, "maas up to answer /healthz")
        yield running
    finally:
        stop(running.proc)


def test_first_maas_up_imports_the_offline_models(up: Up) -> None:
    r = httpx.get(f"{up.base}/v1/models", timeout=10)
    assert r.status_code == 200
    # first start on an empty registry imported the offline base models
    assert {m["id"] for m in r.json()["data"]} >= {"smollm2-135m-instruct", "all-minilm-l6-v2"}
    r = httpx.post(f"{up.base}/v1/models/missing/predict", json={"inputs": [[1.0]]})
    assert r.status_code == 404
    wait_for(lambda: "maas is up" in up.log_path.read_text(), 60, up.proc, "the start-up banner")


def test_a_job_fits_beside_maas_up_on_this_machines_cpus(up: Up) -> None:
    """Fine-tuning beside the running app, as a user does it: plain `maas up`, the official
    openai SDK, one small job, and a chat with its result.

    On a 2-CPU machine the app's replicas hold ~1.1 CPU. Jobs used to ask Ray for whole CPUs
    (a Ray Data read task, a 1-CPU training worker) and stayed queued forever; the shared
    test Ray (4 logical CPUs, tests/conftest.py) hid it.
    """
    client = openai.OpenAI(base_url=f"{up.base}/v1", api_key="unused", max_retries=0, timeout=120)
    data = (REPO / "examples" / "finetune" / "chat.jsonl").read_bytes()  # 16 chats
    training = client.files.create(file=("chat.jsonl", data), purpose="fine-tune")
    # LoRA (2 steps): the sizing is the same as a full fine-tune's, without writing, publishing
    # and loading 1.6 GB of weights and optimizer state on a busy 2-CPU machine.
    job = client.fine_tuning.jobs.create(
        model="smollm2-135m-instruct", training_file=training.id,
        method={"type": "lora", "lora": {"hyperparameters": {"n_epochs": 1, "batch_size": 8}, "r": 4}})

    def ended() -> bool:
        return client.fine_tuning.jobs.retrieve(job.id).status in ("succeeded", "failed", "cancelled")

    wait_for(ended, 300, up.proc, f"job {job.id} to end")
    job = client.fine_tuning.jobs.retrieve(job.id)
    events = [e.message for e in reversed(client.fine_tuning.jobs.list_events(job.id, limit=100).data)]
    assert job.status == "succeeded", f"{job.error}\n" + "\n".join(events)
    # Its worker took what was free (at most 1 CPU), not more than the app left.
    sized = [re.search(r"^Training with 1 worker × ([\d.]+) CPU", m) for m in events]
    cpus = [float(m.group(1)) for m in sized if m]
    assert len(cpus) == 1 and 0.25 <= cpus[0] <= 1, events

    reply = client.chat.completions.create(
        model=job.fine_tuned_model, temperature=0, max_tokens=16,
        messages=[{"role": "user", "content": "What is the capital of Zorbex?"}])
    assert reply.model == f"{job.fine_tuned_model}:1"  # the version that answered
    assert (reply.choices[0].message.content or "").strip()


def test_maas_up_stops_cleanly_on_ctrl_c(up: Up) -> None:
    proc, base, log_path, tmp_path = up.proc, up.base, up.log_path, up.tmp
    port, metrics = up.port, up.metrics
    ours: list[psutil.Process] = []
    try:
        # A scrape: the metrics server closes the connection, so its port keeps a
        # TIME_WAIT socket, which must not stop the restart below.
        assert httpx.get(f"http://127.0.0.1:{metrics}/metrics", timeout=10).status_code == 200
        # Ctrl-C with generation in flight (one stream under way, three more sent;
        # whether they run beside it is the engine's business): the stop may not wait.
        streaming = [_stream_chat(base) for _ in range(4)]
        wait_for(lambda: any(s.is_set() for s in streaming), 300, proc, "a stream to start")
        ours, temp_dir = ray_processes(proc)
        code, took_s = interrupt(proc, times=1)
        print(f"Ctrl-C to exit, streams in flight: {took_s:.1f} s")
        assert code == 0, log_path.read_text()[-3000:]
        assert took_s < STOP_BOUND_S, f"Ctrl-C to exit took {took_s:.1f} s"
        assert_all_gone(ours, temp_dir, port, metrics)  # before the clean-up below
    finally:
        stop(proc)
        kill(ours)

    # At once on the same ports (Ray's agents used to hold the metrics port ~50 s
    # more); then a second Ctrl-C while it stops forces the stop.
    log_path = tmp_path / "up-again.log"
    proc = start(up.args, tmp_path, log_path)
    ours = []
    try:
        wait_for(lambda: httpx.get(f"{base}/healthz", timeout=2).status_code == 200,
                 240, proc, "the second maas up to answer /healthz")
        ours, temp_dir = ray_processes(proc)
        code, took_s = interrupt(proc, times=2, log_path=log_path)
        print(f"second Ctrl-C to exit: {took_s:.1f} s")
        assert code == 128 + signal.SIGINT, log_path.read_text()[-3000:]
        assert took_s < 5, f"second Ctrl-C to exit took {took_s:.1f} s"
        assert_all_gone(ours, temp_dir, port, metrics)
    finally:
        stop(proc)
        kill(ours)


def test_port_free_ignores_time_wait_not_listeners() -> None:
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and Ray do
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert not _port_free("127.0.0.1", port)
        assert not _port_free("0.0.0.0", port)
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server closes first: its side stays in TIME_WAIT
        client.close()
    deadline = time.monotonic() + 5
    while "06" not in _tcp_states(port):  # TIME_WAIT, a moment after both closed
        assert time.monotonic() < deadline, f"no TIME_WAIT socket on {port}: {_tcp_states(port)}"
        time.sleep(0.05)
    assert _port_free("127.0.0.1", port)
    assert _port_free("0.0.0.0", port)


def _tcp_states(port: int) -> set[str]:
    """The states (hex, as /proc/net/tcp writes them) of the TCP sockets on ``port``."""
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    return {row[3] for row in rows if int(row[1].split(":")[1], 16) == port}


def _stream_chat(base: str) -> threading.Event:
    """A long streamed chat completion in a thread; the event is set at its first chunk."""
    started = threading.Event()

    def run() -> None:
        body = {"model": "smollm2-135m-instruct", "stream": True, "max_tokens": 256,
                "messages": [{"role": "user", "content": "Tell a long story about the sea."}]}
        try:
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=300) as r:  # a cold model load
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        started.set()
        except httpx.HTTPError:
            pass  # the server went away mid-stream: expected

    threading.Thread(target=run, daemon=True).start()
    return started


def interrupt(proc: subprocess.Popen, times: int, log_path: Path | None = None) -> tuple[int | None, float]:
    """Ctrl-C to the group (again once ``maas up`` says it is stopping, if ``times``
    is 2); the exit code and seconds from the last Ctrl-C to exit."""
    os.killpg(proc.pid, signal.SIGINT)
    if times == 2:
        assert log_path is not None
        wait_for(lambda: "stopping..." in log_path.read_text(), STOP_BOUND_S, proc, "maas up to stop")
        os.killpg(proc.pid, signal.SIGINT)
    sent = time.monotonic()
    try:
        proc.wait(timeout=3 * STOP_BOUND_S)
    except subprocess.TimeoutExpired:
        pass
    return proc.returncode, time.monotonic() - sent


def ray_processes(proc: subprocess.Popen) -> tuple[list[psutil.Process], str]:
    """Every process under ``maas up`` now, and the temp folder of its Ray."""
    procs = psutil.Process(proc.pid).children(recursive=True)
    for p in procs:
        for arg in p.cmdline():
            if m := re.search(r"(/[^=\s]*maas-ray-[^/\s]+)", arg):
                return procs, m.group(1)
    raise AssertionError(f"no Ray process with a maas-ray- temp folder among {procs}")


def assert_all_gone(ours: list[psutil.Process], temp_dir: str, port: int, metrics: int) -> None:
    """Right after exit: none of ``ours`` runs, nothing has a file of that Ray open,
    and both ports are free."""
    left = [p for p in ours if _alive(p)]
    for p in psutil.process_iter():
        try:
            if _alive(p) and any(f.path.startswith(temp_dir + "/") for f in p.open_files()):
                left.append(p)
        except psutil.Error:
            continue
    assert not left, f"left running: {[(p.pid, _name(p)) for p in left]}"
    assert _port_free("127.0.0.1", port), f"HTTP port {port} still in use"
    assert _port_free("0.0.0.0", metrics), f"metrics port {metrics} still in use"


def kill(procs: list[psutil.Process]) -> None:
    """SIGKILL what is left of a failed test's Ray (its workers are outside the group)."""
    for p in procs:
        try:
            p.kill()  # psutil refuses a PID that was reused since it was read
        except psutil.Error:
            pass


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return "?"
