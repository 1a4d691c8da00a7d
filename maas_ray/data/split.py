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


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: every input bit affects every output bit."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def split_bucket(df: pd.DataFrame, seed: int) -> np.ndarray:
    """A bucket in ``[0, _BUCKETS)`` per row; stable across processes and runs."""
    # pandas' hash_key only affects string columns, so the seed is mixed in here.
    hashed = pd.util.hash_pandas_object(df, index=False).to_numpy(dtype=np.uint64)
    with np.errstate(over="ignore"):
        salted = hashed + np.uint64(0x9E3779B97F4A7C15) * np.uint64(seed + 1)
    return (_splitmix64(salted) % np.uint64(_BUCKETS)).astype(np.int64)


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
