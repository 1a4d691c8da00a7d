"""The running batch's KV cache: sequences of different lengths in one tensor per layer.

Prompts that arrive together are prefilled in one forward, left-padded to the
longest (:func:`left_pad`), and their cache rows join the batch's
``DynamicCache`` left-padded again to its width. A ``(B, T)`` attention mask
marks padding, and position ids count only real tokens, so a masked key gets
exactly zero attention weight and a row's tokens see what they would alone.
Rows leave the batch the step they finish; columns that became padding in
every remaining row are trimmed.
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

    def add(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append prefilled sequences as the last rows: their cache and its ``(b, T)``
        mask (1 = real token), left-padded as :func:`left_pad` made them."""
        if self.cache is None or self.mask is None:
            self.cache, self.mask = cache, mask
            return
        width = max(int(self.mask.shape[1]), int(mask.shape[1]))
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_lpad(mine.keys, width), _lpad(theirs.keys, width)], dim=0)
            mine.values = torch.cat([_lpad(mine.values, width), _lpad(theirs.values, width)], dim=0)
        self.mask = torch.cat([_lpad(self.mask, width, dim=1), _lpad(mask, width, dim=1)], dim=0)

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


def left_pad(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, mask, positions)``, each ``(B, T)``, for prompts prefilled together:
    left-padded to the longest, so every row's last token is the last column.

    Padding ids are 0 (any id: masked keys are never attended); a padding
    query's position is 1, as ``generate`` sets it, so no position is negative.
    """
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(dim=1) - 1).masked_fill(mask == 0, 1)
    return ids, mask, positions


def _lpad(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """Left-pad ``t`` with zeros along ``dim`` up to ``width``."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
