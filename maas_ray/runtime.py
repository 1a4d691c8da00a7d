"""Connecting to Ray: an existing cluster when one is named, else an embedded local one."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psutil

logger = logging.getLogger(__name__)


def quiet_ray_data() -> None:
    """Turn off Ray Data's own progress bars and per-dataset INFO logs.

    They fight with our progress display; the DataContext set here travels with
    the datasets into training workers and batch-prediction actors.
    """
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for name in ("ray.data", "ray.train", "ray.serve"):
        logging.getLogger(name).setLevel(logging.WARNING)


def free_agent_port() -> int:
    """Give the next embedded Ray's dashboard agent a free port instead of Ray's fixed 52365.

    The agent runs the node's side of Ray's job server (fine-tuning jobs are Ray jobs).
    On a machine with a second Ray (another ``maas up``, a ``ray start`` cluster, a test
    cluster) only one agent gets 52365, and a Ray without one answers every job
    submission with "No available agent". ``ray start`` has ``--dashboard-agent-listen-port``;
    ``ray.init`` does not, so this sets the default it passes. Returns the port.
    """
    import inspect
    import socket

    from ray._private import parameter

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    init = parameter.RayParams.__init__
    names = [n for n, p in inspect.signature(init).parameters.items()
             if p.default is not inspect.Parameter.empty]
    defaults = list(init.__defaults__ or ())
    if len(defaults) == len(names) and "dashboard_agent_listen_port" in names:
        defaults[names.index("dashboard_agent_listen_port")] = port
        init.__defaults__ = tuple(defaults)
    return port


def private_temp_dir() -> str:
    """A session folder of our own for an embedded Ray.

    Every Ray on a machine shares ``/tmp/ray`` by default, and its
    ``ray_current_cluster`` file names whichever cluster started last. Ray's job
    supervisor resolves the cluster a job driver joins through that file, so with
    a second Ray on the machine a fine-tuning job could join the wrong cluster.
    Short on purpose: Ray's Unix socket paths live under it.
    """
    import tempfile

    return tempfile.mkdtemp(prefix="maas-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)


# Ray's switch for single-machine Rays (its default on macOS and Windows): nodes on 127.0.0.1.
LOOPBACK_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def loopback_node() -> None:
    """Make the next embedded Ray a node on 127.0.0.1, so that its Prometheus endpoint
    listens on loopback only instead of on every interface.

    Ray's metrics agent binds 127.0.0.1 only when the node's IP is a loopback one, and on
    Linux ``ray.init`` turns a loopback ``_node_ip_address`` into the machine's address
    (``services.resolve_ip_for_localhost``, Ray 2.60). Ray's own single-machine switch
    keeps the node on 127.0.0.1. It is set for this process and, through the environment,
    for every process Ray starts: a fine-tuning job's driver must look for its raylet on
    127.0.0.1 too. A driver started elsewhere that joins this Ray needs it as well.
    """
    from ray._private import ray_constants

    os.environ[LOOPBACK_NODE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False  # read at import, and ray may be imported by now


def joins(address: str | None) -> str | None:
    """The cluster address to join, or None for an embedded local Ray."""
    address = address or os.environ.get("RAY_ADDRESS")
    return None if address in (None, "", "local") else address


@contextlib.contextmanager
def ray_session(address: str | None = None, **init_kwargs: Any) -> Iterator[bool]:
    """Yield with Ray connected; shut down only what this call started.

    ``address`` (or ``$RAY_ADDRESS``, as set by ``ray job submit``) joins a running
    cluster; without one an embedded local Ray starts, and on the way out every
    process it started is gone (see ``shutdown_ray``). Yields True when Ray was
    started or joined here, False when it was already initialised (e.g. tests).
    """
    import ray

    if ray.is_initialized():
        yield False
        return
    address = joins(address)
    if not address:
        free_agent_port()
        init_kwargs.setdefault("_temp_dir", private_temp_dir())
    try:
        # address="local" starts a private Ray even when a `ray start` cluster runs on
        # this machine: joining one must be asked for with --address or $RAY_ADDRESS.
        ray.init(address=address or "local", logging_level=logging.WARNING, **init_kwargs)
        yield True
    finally:
        shutdown_ray()


def node_processes() -> list[psutil.Process]:
    """Every live process of this driver's embedded Ray: those ``ray.init`` started
    (GCS, raylet, dashboard, monitors) and all their descendants (workers, the
    raylet's dashboard and runtime-env agents, dashboard modules).

    Empty when joined to a cluster: its processes are not ours. Read from Ray's own
    record of what it started (``_global_node.all_processes``, internal, as of Ray
    2.60), never by process name, so a second Ray on the machine (another
    ``maas up``, a test cluster) is never touched.
    """
    import psutil
    from ray._private import worker

    node = worker._global_node
    infos = [info for infos in list(node.all_processes.values()) for info in infos] if node else []
    # Exited (and reaped) ones are skipped: their PIDs may belong to strangers by now.
    roots = [info.process.pid for info in infos if info.process.poll() is None]
    if not roots:
        return []
    children: dict[int, list[psutil.Process]] = {}
    for proc in psutil.process_iter(["ppid"]):  # one pass over /proc, not one per root
        children.setdefault(proc.info["ppid"], []).append(proc)
    found: dict[int, psutil.Process] = {}
    for pid in roots:
        with contextlib.suppress(psutil.Error):
            found[pid] = psutil.Process(pid)
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), []):
            if child.pid not in found:
                found[child.pid] = child
                stack.append(child.pid)
    return [p for p in found.values() if _alive(p)]


def stop_processes(procs: Iterable[psutil.Process], grace_s: float, reap_s: float = 2.0) -> list[psutil.Process]:
    """SIGTERM the live ones, SIGKILL what is left after ``grace_s`` (at once when
    ``grace_s`` is 0), then wait up to ``reap_s`` for them to go. Returns the survivors.

    ``psutil.Process`` objects refuse to signal a PID that was reused since they were
    read, so a stale list can only miss processes, never hit a stranger's.
    """
    import psutil

    alive = [p for p in procs if _alive(p)]
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, reap_s)):
        if sig == signal.SIGTERM and grace_s <= 0:
            continue
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        deadline = time.monotonic() + wait_s
        # Polled rather than psutil.wait_procs: that waits out zombies that are not
        # our children, and those already hold no ports or memory.
        while (alive := [p for p in alive if _alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not alive:
            break
    return alive


def shutdown_ray(grace_s: float = 2.0) -> None:
    """``ray.shutdown()``, then make sure every process the embedded Ray started is gone.

    ``ray.shutdown()`` stops the processes ``ray.init`` started (SIGTERM, SIGKILL
    after 1 s), but not their children. When the raylet is SIGKILLed (slow to stop on
    a loaded machine), its dashboard and runtime-env agents notice only by polling,
    then try to flush logs to the dead GCS: they held Ray's metrics port for ~50 s, so
    a new ``maas up`` could not start. The tree is read before the shutdown because a
    dead raylet's children are re-parented to init and no longer look like ours.
    """
    import ray

    procs = node_processes()
    started = time.monotonic()
    try:
        ray.shutdown()
    finally:
        left = stop_processes(procs, grace_s)
    if left:
        logger.warning("%d processes of the local Ray survived SIGKILL: %s",
                       len(left), ", ".join(str(p.pid) for p in left))
    logger.info("local Ray stopped in %.1f s", time.monotonic() - started)


def _alive(proc: psutil.Process) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
