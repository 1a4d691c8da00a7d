"""LoRA adapters on one base model: loaded on demand, kept in an LRU bounded in bytes,
applied per row of a batch.

The transformers engine holds one base model. The first adapter wraps it in a peft
``PeftModel``; later ones are added beside it (``load_adapter``) and the least
recently used go (``delete_adapter``) once their LoRA tensors pass ``max_bytes``.
Every forward then names each row's adapter (``adapter_names``; ``BASE`` for none),
which peft's mixed-batch LoRA layers apply row by row: rows of different tenants'
fine-tunes, and of the base, share one decode step. An adapter that a waiting or
running request uses is never evicted (the bound is exceeded instead, and logged).

Called on the engine's scheduler thread only: adding or removing LoRA layers while a
forward runs would corrupt it.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BASE = "__base__"
"""peft's ``adapter_names`` entry for a row that runs the base model alone."""


class Adapters:
    """The LoRA adapters loaded on one base model, least recently used first."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self.loads = 0
        self.evictions = 0

    def __contains__(self, name: str) -> bool:
        return name in self._sizes

    def bytes(self) -> int:
        return sum(self._sizes.values())

    def load(self, model: Any, name: str, path: Path | str, in_use: set[str]) -> Any:
        """``model`` with adapter ``name`` from ``path`` loaded (wrapped in a ``PeftModel``
        on the first one), after evicting least recently used adapters not ``in_use``."""
        if name in self._sizes:
            self._sizes.move_to_end(name)
            return model
        from peft import PeftModel

        key = peft_name(name)
        if isinstance(model, PeftModel):
            model.load_adapter(str(path), adapter_name=key, is_trainable=False)
        else:
            model = PeftModel.from_pretrained(model, str(path), adapter_name=key, is_trainable=False)
        model.eval()
        self._sizes[name] = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                                if "lora_" in n and n.split(".")[-2] == key)
        self.loads += 1
        self._evict(model, in_use | {name})
        return model

    def touch(self, name: str) -> None:
        self._sizes.move_to_end(name)

    def _evict(self, model: Any, keep: set[str]) -> None:
        for old in list(self._sizes):
            if self.bytes() <= self.max_bytes:
                return
            if old not in keep:
                with warnings.catch_warnings():  # "was active": rows name their adapter anyway
                    warnings.simplefilter("ignore", UserWarning)
                    model.delete_adapter(peft_name(old))
                del self._sizes[old]
                self.evictions += 1
        if self.bytes() > self.max_bytes:
            logger.warning("LoRA adapters in use take %d bytes, over the %d-byte bound",
                           self.bytes(), self.max_bytes)

    def stats(self) -> dict[str, int]:
        return {"adapters": len(self._sizes), "adapter_bytes": self.bytes(),
                "adapter_loads": self.loads, "adapter_evictions": self.evictions}


def peft_name(name: str) -> str:
    """peft's name for adapter ``name`` (a registry id): module names cannot hold dots."""
    return "maas_" + hashlib.sha1(name.encode()).hexdigest()[:16]


def row_names(seqs: list[Any]) -> list[str]:
    """Each request's ``adapter_names`` entry, in row order."""
    return [peft_name(s.params.adapter) if s.params.adapter else BASE for s in seqs]
