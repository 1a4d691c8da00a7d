"""The running batch's KV cache: sequences of different lengths in one tensor per layer.

Each sequence is prefilled alone (exactly what ``generate`` does for one
prompt) and its cache rows are then left-padded into the batch's
``DynamicCache``. A ``(B, T)`` attention mask marks padding, and position ids
count only real tokens, so padding is invisible to the model: masked keys get
exactly zero attention weight. Rows leave the batch the step they finish;
columns that became padding in every remaining row are trimmed.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


def check_supported(cache: DynamicCache) -> None:
    """Refuse caches this padding scheme would corrupt (sliding windows keep
    only their last N columns, so rows could not be re-aligned)."""
    kinds = {type(layer).__name__ for layer in cache.layers}
    if kinds != {DynamicLayer.__name__}:
        raise NotImplementedError(
            "the transformers engine batches plain DynamicCache layers only; "
            f"this model uses {sorted(kinds)}")


class BatchCache:
    """Rows aligned with the scheduler's running sequences."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (B, T) long, 1 = real token

    def __len__(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[0])

    def add(self, cache: DynamicCache, length: int) -> None:
        """Append one prefilled sequence (batch of one, ``length`` tokens) as the last row."""
        new_mask = torch.ones((1, length), dtype=torch.long, device=_device(cache))
        if self.cache is None or self.mask is None:
            self.cache, self.mask = cache, new_mask
            return
        width = max(int(self.mask.shape[1]), length)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_lpad(mine.keys, width), _lpad(theirs.keys, width)], dim=0)
            mine.values = torch.cat([_lpad(mine.values, width), _lpad(theirs.values, width)], dim=0)
        self.mask = torch.cat([_lpad(self.mask, width, dim=1), _lpad(new_mask, width, dim=1)], dim=0)

    def next_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask and position ids for a decode step that feeds one token per row.

        Returns ``(mask (B, T + 1), positions (B, 1))``; the position of a row's
        new token is the number of real tokens before it, whatever the padding.
        """
        assert self.mask is not None, "decode step on an empty batch"
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        return self.mask, self.mask.sum(dim=1, keepdim=True) - 1

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order) and trim all-padding columns."""
        if not rows:
            self.cache, self.mask = None, None
            return
        assert self.cache is not None and self.mask is not None
        if rows == list(range(len(self))):
            return
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        trim = int((mask.cumsum(dim=1) == 0).all(dim=0).sum())  # leading all-pad columns
        self.mask = mask[:, trim:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, trim:]
            layer.values = layer.values.index_select(0, index)[:, :, trim:]


def _device(cache: DynamicCache) -> torch.device:
    return cache.layers[0].keys.device


def _lpad(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """Left-pad ``t`` with zeros along ``dim`` up to ``width``."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
