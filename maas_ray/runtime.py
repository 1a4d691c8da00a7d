"""Connecting to Ray: an existing cluster when one is named, else an embedded local one."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

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


def joins(address: str | None) -> str | None:
    """The cluster address to join, or None for an embedded local Ray."""
    address = address or os.environ.get("RAY_ADDRESS")
    return None if address in (None, "", "local") else address


@contextlib.contextmanager
def ray_session(address: str | None = None, **init_kwargs: Any) -> Iterator[bool]:
    """Yield with Ray connected; shut down only what this call started.

    ``address`` (or ``$RAY_ADDRESS``, as set by ``ray job submit``) joins a running
    cluster; without one an embedded local Ray starts. Yields True when Ray was
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
    # address="local" starts a private Ray even when a `ray start` cluster runs on
    # this machine: joining one must be asked for with --address or $RAY_ADDRESS.
    ray.init(address=address or "local", logging_level=logging.WARNING, **init_kwargs)
    try:
        yield True
    finally:
        ray.shutdown()
