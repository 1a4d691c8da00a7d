"""Loading a registry version inside a replica without blocking its event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from maas_ray.registry import Registry
from maas_ray.registry.adapters import model_dir

T = TypeVar("T")


async def load_version(registry: Registry, model_id: str, loader: Callable[[Path], T]) -> T:
    """Resolve ``model_id``, fetch and checksum its files, build it with ``loader``.

    The checksum pass and the load run in threads, so requests for models that
    are already loaded keep flowing while a new one loads.
    """
    mv = registry.get(model_id)
    # LoRA versions are adapters: merged with their base once, then loaded like any folder.
    path = await asyncio.to_thread(model_dir, registry, mv)
    return await asyncio.to_thread(loader, path)
