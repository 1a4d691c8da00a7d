"""Deterministic train/validation/test split by hashing each row's content.

A row's split depends only on its values and the seed, never on block layout or
worker count, so the driver, the trainer and the example's closed-form check all
see the same split, streaming, without a global shuffle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import ray.data

_BUCKETS = 10_000


def split_bucket(df: pd.DataFrame, seed: int) -> np.ndarray:
    """A bucket in ``[0, _BUCKETS)`` per row; stable across processes and runs."""
    key = f"{seed:016d}"[-16:]  # pandas wants a 16-character hash key
    hashed = pd.util.hash_pandas_object(df, index=False, hash_key=key).to_numpy()
    return (hashed % _BUCKETS).astype(np.int64)


def split_dataset(
    ds: ray.data.Dataset, validation_fraction: float, test_fraction: float, seed: int
) -> tuple[ray.data.Dataset, ray.data.Dataset, ray.data.Dataset]:
    """Split ``ds`` into (train, validation, test) by row hash."""
    val_cut = int(round(validation_fraction * _BUCKETS))
    test_cut = val_cut + int(round(test_fraction * _BUCKETS))

    def part(lo: int, hi: int) -> ray.data.Dataset:
        def keep(df: pd.DataFrame) -> pd.DataFrame:
            bucket = split_bucket(df, seed)
            return df[(bucket >= lo) & (bucket < hi)]

        return ds.map_batches(keep, batch_format="pandas")

    return part(test_cut, _BUCKETS), part(0, val_cut), part(val_cut, test_cut)
