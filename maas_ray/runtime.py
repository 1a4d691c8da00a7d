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
    # address="local" starts a private Ray even when a `ray start` cluster runs on
    # this machine: joining one must be asked for with --address or $RAY_ADDRESS.
    ray.init(address=address or "local", logging_level=logging.WARNING, **init_kwargs)
    try:
        yield True
    finally:
        ray.shutdown()
