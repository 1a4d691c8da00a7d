"""LoRA adapters on one base model: loaded on demand, kept in an LRU bounded in bytes,
applied per row of a batch.

The transformers engine holds one base model. The first adapter replaces each Linear
layer it targets with a :class:`LoRALinear`: the base layer plus a stack of every loaded
adapter's A and B matrices, one slot per adapter (slot 0 is all zeros: the base alone).
Before each forward the engine names each row's slot (:meth:`Adapters.select`); every
LoRA layer then adds ``x·A[slot]ᵀ·B[slot]ᵀ·scale`` for all rows in two batched matmuls.
Rows of different tenants' fine-tunes, and of the base, share one decode step.

Why not peft's mixed batches (``adapter_names``)? They loop over the adapters in every
layer, in Python, with a boolean index per adapter: 16 rows over 8 adapters decoded at
0.53x the base alone (``python benchmarks/adapters.py``); two gathers and two ``bmm`` per
layer cost far less. Adapters are read from the folder a peft fine-tune saves
(``adapter_config.json`` + ``adapter_model.safetensors``); features this path does not
apply (DoRA, biases, ``modules_to_save``, per-module ranks) are refused by name.

An adapter that a waiting or running request uses is never evicted (the bound is
exceeded instead, and logged). Called on the engine's scheduler thread only: changing
the stacks while a forward runs would corrupt it.
"""

from __future__ import annotations

import json
import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

_PREFIX, _A, _B = "base_model.model.", ".lora_A.weight", ".lora_B.weight"


class _Rows:
    """Each row's adapter slot for the next forward (None: every row runs the base)."""

    index: torch.Tensor | None = None


class LoRALinear(nn.Module):
    """A base Linear plus, per batch row, one LoRA adapter out of a stack (slot 0: none)."""

    def __init__(self, base: nn.Linear, rows: _Rows, slots: int, rank: int) -> None:
        super().__init__()
        self.base, self.rows = base, rows
        w = base.weight
        self.A = torch.zeros(slots, rank, base.in_features, dtype=w.dtype, device=w.device)
        self.B = torch.zeros(slots, base.out_features, rank, dtype=w.dtype, device=w.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        index = self.rows.index
        if index is None:
            return y
        a = self.A.index_select(0, index).transpose(1, 2)  # (b, in, r)
        b = self.B.index_select(0, index).transpose(1, 2)  # (b, r, out)
        rows = x.reshape(index.numel(), -1, x.shape[-1])  # (b, T, in)
        return y + torch.bmm(torch.bmm(rows, a), b).reshape(y.shape)

    def resize(self, slots: int, rank: int) -> None:
        """Grow the stack to ``slots`` adapters of rank up to ``rank`` (new room is zeros)."""
        s, r = self.A.shape[0], self.A.shape[1]
        if slots > s or rank > r:
            a = self.A.new_zeros(max(s, slots), max(r, rank), self.A.shape[2])
            b = self.B.new_zeros(max(s, slots), self.B.shape[1], max(r, rank))
            a[:s, :r], b[:s, :, :r] = self.A, self.B
            self.A, self.B = a, b


def read_adapter(path: Path | str) -> tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(scale, ``{module name: (A, B)}``) of a peft LoRA folder; ValueError naming what
    this engine cannot apply."""
    from safetensors.torch import load_file

    folder = Path(path)
    config = json.loads((folder / "adapter_config.json").read_text())
    refused = [key for key, ok in (
        ("peft_type", config.get("peft_type", "LORA") == "LORA"), ("bias", config.get("bias", "none") == "none"),
        ("use_dora", not config.get("use_dora")), ("modules_to_save", not config.get("modules_to_save")),
        ("rank_pattern", not config.get("rank_pattern")), ("alpha_pattern", not config.get("alpha_pattern")),
        ("fan_in_fan_out", not config.get("fan_in_fan_out"))) if not ok]
    if refused:
        raise ValueError(f"LoRA adapter {folder.name}: {', '.join(refused)} not supported when serving "
                         "adapters on their base; serve it merged")
    r, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    layers = {}
    for key, a in tensors.items():
        if key.endswith(_A):
            name = key[len(_PREFIX):-len(_A)] if key.startswith(_PREFIX) else key[:-len(_A)]
            layers[name] = (a, tensors[key[:-len(_A)] + _B])
    if not layers:
        raise ValueError(f"LoRA adapter {folder.name}: no lora_A/lora_B weights in adapter_model.safetensors")
    return scale, layers


class Adapters:
    """The LoRA adapters loaded on one base model, least recently used first."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self._slots: dict[str, int] = {}  # adapter -> its slot in every LoRALinear (from 1)
        self._layers: dict[str, LoRALinear] = {}  # module name -> its wrapper
        self._rows = _Rows()
        self._capacity, self._rank = 1, 1  # slots (incl. the base's) and rank of the stacks
        self.loads = 0
        self.evictions = 0
        # Rebound (never mutated) after each load and eviction: other threads read it whole.
        self.loaded: frozenset[str] = frozenset()

    def __contains__(self, name: str) -> bool:
        return name in self._sizes

    def bytes(self) -> int:
        return sum(self._sizes.values())

    def load(self, model: nn.Module, name: str, path: Path | str, in_use: set[str]) -> None:
        """Load adapter ``name`` from ``path`` into a free slot of ``model``'s LoRA layers
        (wrapping the layers it targets on first use), after evicting least recently used
        adapters not ``in_use``."""
        if name in self._sizes:
            self._sizes.move_to_end(name)
            return
        scale, layers = read_adapter(path)
        modules = dict(model.named_modules())
        missing = [m for m in layers if m not in modules and m not in self._layers]
        if missing:
            raise ValueError(f"LoRA adapter {Path(path).name} targets modules this base lacks: {missing[:3]}")
        size = sum(a.numel() + b.numel() for a, b in layers.values()) * next(model.parameters()).element_size()
        self._evict(in_use | {name}, room=size)
        slot = next(i for i in range(1, self._capacity + 1) if i not in self._slots.values())
        rank = max(a.shape[0] for a, _ in layers.values())
        self._capacity, self._rank = max(self._capacity, slot + 1), max(self._rank, rank)
        for module in layers:
            if module not in self._layers:
                self._wrap(model, module)
        for module, layer in self._layers.items():
            layer.resize(self._capacity, self._rank)
            layer.A[slot].zero_()
            layer.B[slot].zero_()
            if module in layers:
                a, b = layers[module]
                layer.A[slot, :a.shape[0]] = a.to(layer.A.dtype)
                layer.B[slot, :, :b.shape[1]] = b.to(layer.B.dtype) * scale
        self._slots[name] = slot
        self._sizes[name] = size
        self.loads += 1
        self.loaded = frozenset(self._sizes)

    def _wrap(self, model: nn.Module, module: str) -> None:
        parent, _, child = module.rpartition(".")
        base = model.get_submodule(module)
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRA on {module} ({type(base).__name__}): only Linear layers are supported")
        layer = LoRALinear(base, self._rows, self._capacity, self._rank)
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        self._layers[module] = layer

    def touch(self, name: str) -> None:
        self._sizes.move_to_end(name)

    def select(self, adapters: Sequence[str | None], device: torch.device) -> None:
        """Name each row's adapter (None: the base) for the next forward."""
        slots = [self._slots[a] if a else 0 for a in adapters]
        self._rows.index = torch.tensor(slots, device=device) if any(slots) else None

    def _evict(self, keep: set[str], room: int) -> None:
        for old in list(self._sizes):
            if self.bytes() + room <= self.max_bytes:
                break
            if old not in keep:
                del self._sizes[old], self._slots[old]  # its slot is zeroed when reused
                self.evictions += 1
        self.loaded = frozenset(self._sizes)
        if self.bytes() + room > self.max_bytes:
            logger.warning("LoRA adapters in use take %d bytes, over the %d-byte bound",
                           self.bytes() + room, self.max_bytes)

    def stats(self) -> dict[str, int]:
        return {"adapters": len(self._sizes), "adapter_bytes": self.bytes(),
                "adapter_loads": self.loads, "adapter_evictions": self.evictions}
