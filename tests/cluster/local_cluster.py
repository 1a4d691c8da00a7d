"""A multi-node Ray cluster on this host, made of ``ray start --block`` processes.

Each node is one ``ray start --block`` process in its own session (process
group) with its own free ports; all share one short ``--temp-dir`` that only
this cluster uses. A node is removed the way Kubernetes or a spot preemption
removes one (SIGTERM to its ``ray start``, which stops its raylet and workers),
and everything is torn down by PID: never ``ray stop``, which kills every Ray
process on the machine, other people's included.

The nodes die with the test process too (``PR_SET_PDEATHSIG``), so a killed
pytest does not leave a cluster behind. Clients (``maas``, ``ray job submit``,
``serve deploy``) run as subprocesses with :meth:`LocalCluster.client_env`:
one process can hold only one Ray driver, and the test process may already
hold the shared session's.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
_PR_SET_PDEATHSIG = 1


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the test process dies."""
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.25) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    log: Path
    respawn: Callable[[], subprocess.Popen]
    resources: dict[str, float] = field(default_factory=dict)
    retries: int = 2

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            text = self.log.read_text()
            # `ray start` gives a raylet 30 s (not configurable) to register; on a
            # loaded 2-core machine that can pass, and a second try succeeds.
            if "timed out during startup" in text and self.retries > 0:
                self.retries -= 1
                self.proc = self.respawn()
                return False
            raise AssertionError(f"ray node {self.name} exited with {self.proc.returncode}:\n"
                                 + text[-3000:])
        return "Ray runtime started" in self.log.read_text()

    def alive(self) -> bool:
        return self.proc.poll() is None


class LocalCluster:
    """Head plus worker nodes on 127.0.0.1; a context manager that always cleans up.

    ``env`` is added to every node's environment: what a real cluster's machines
    would carry (credentials, endpoints). Token auth is on with a token of this
    cluster's own, so nothing depends on ``~/.ray/auth_token``.
    """

    def __init__(self, head_cpus: float = 2, env: dict[str, str] | None = None) -> None:
        self.head_cpus = head_cpus
        # Short: Ray puts unix sockets under it (108-character limit).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="maas-rc-", dir="/tmp"))
        self.token = secrets.token_hex(16)
        self.extra_env = dict(env or {})
        self.nodes: list[Node] = []
        self.gcs_port, self.dashboard_port = 0, 0

    # -- environment -----------------------------------------------------------
    def _base_env(self) -> dict[str, str]:
        # Not the test session's own Ray settings either: its 1 s metrics push (for
        # tests/serve/test_metrics.py) would cost every process of these nodes CPU.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RAY_ADDRESS", "MAAS_HOME", "PYTEST_"))
               and k != "RAY_metrics_report_interval_ms"}
        env.update(
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # workers find `maas`
            RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
            PYTHONUNBUFFERED="1",
        )
        env.update(self.extra_env)
        return env

    def client_env(self, **extra: str) -> dict[str, str]:
        """Environment for a driver or CLI that talks to this cluster."""
        env = self._base_env()
        env.update(RAY_ADDRESS=self.address, **extra)
        return env

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    # -- nodes -----------------------------------------------------------------
    def _spawn(self, name: str, args: list[str], node_env: dict[str, str]) -> Node:
        log = self.temp_dir / f"{name}.log"
        env = self._base_env()
        env.update(node_env)

        def spawn() -> subprocess.Popen:
            return subprocess.Popen(
                [str(BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1",
                 "--temp-dir", str(self.temp_dir), "--disable-usage-stats", *args],
                env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=_die_with_parent)

        node = Node(name, spawn(), log, spawn)
        self.nodes.append(node)
        return node

    def start(self, timeout_s: float = 240) -> LocalCluster:
        """Start the head (dashboard and job server included)."""
        gcs, dash, client, agent, metrics = free_ports(5)
        self.gcs_port, self.dashboard_port = gcs, dash
        head = self._spawn("head", [
            "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
            "--dashboard-agent-listen-port", str(agent), "--metrics-export-port", str(metrics),
            "--num-cpus", str(self.head_cpus),
        ], {})
        wait_until(head.ready, timeout_s, "the head node to start")
        return self

    def add_node(self, num_cpus: float = 1, resources: dict[str, float] | None = None,
                 wait: bool = True, timeout_s: float = 240) -> Node:
        """Join one worker node; ``wait=False`` returns at once (see :meth:`wait_ready`)."""
        agent, metrics = free_ports(2)
        name = f"worker{len(self.nodes)}"
        node = self._spawn(name, [
            "--address", self.address, "--num-cpus", str(num_cpus),
            "--resources", json.dumps(resources or {}),
            "--dashboard-agent-listen-port", str(agent), "--metrics-export-port", str(metrics),
            # The head's log monitor already tails this shared temp dir; one more
            # per node would print every worker log line once per node.
            "--include-log-monitor", "false",
        ], {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})
        node.resources = dict(resources or {})
        if wait:
            self.wait_ready([node], timeout_s)
        return node

    def wait_ready(self, nodes: list[Node], timeout_s: float = 240) -> None:
        wait_until(lambda: all(n.ready() for n in nodes), timeout_s, "worker nodes to join")

    def workers(self, resource: str | None = None) -> list[Node]:
        """Live worker nodes (optionally only those offering ``resource``)."""
        return [n for n in self.nodes[1:] if n.alive() and (resource is None or resource in n.resources)]

    def remove_node(self, node: Node, timeout_s: float = 60) -> None:
        """Take a worker node away: SIGTERM its ``ray start``, as a preemption would."""
        self._stop(node, timeout_s)

    def _stop(self, node: Node, timeout_s: float) -> None:
        self._stop_all([node], timeout_s)

    @staticmethod
    def _stop_all(nodes: list[Node], timeout_s: float) -> None:
        for node in nodes:
            if node.alive():
                try:
                    os.killpg(node.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout_s
        for node in nodes:
            try:
                node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for node in nodes:
            try:  # whatever is left of that node's process group
                os.killpg(node.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                node.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def shutdown(self) -> None:
        """Stop every node at once, then any process still using our temp dir."""
        self._stop_all(self.nodes, 5)  # all of it is deleted next: no need to wait long
        self._kill_leftovers()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _kill_leftovers(self) -> None:
        # Ray worker processes can outlive their process group; ours name our
        # unique temp dir on their command line, so nothing else matches.
        import psutil

        marker = str(self.temp_dir)
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if proc.pid != os.getpid() and any(marker in a for a in proc.info["cmdline"] or ()):
                    proc.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.shutdown()
            raise

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- clients ---------------------------------------------------------------
    def run(self, args: list[str], timeout_s: float = 300, env: dict[str, str] | None = None,
            cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """Run a client command (``maas``, ``ray``, ``serve``) against this cluster."""
        out = subprocess.run([str(BIN / args[0]), *args[1:]], env=env or self.client_env(),
                             cwd=cwd, capture_output=True, text=True, timeout=timeout_s,
                             stdin=subprocess.DEVNULL)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {out.returncode}:\n"
                                 f"{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
        return out

    def popen(self, args: list[str], log: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        """Start a client command in the background, in its own process group."""
        return subprocess.Popen([str(BIN / args[0]), *args[1:]], env=env or self.client_env(),
                                cwd=cwd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_die_with_parent)


def stop_process(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM a client's process group, then SIGKILL what is left of it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=10)
