"""Reading CSV / Parquet / JSONL into Ray Data from a path or a storage URI."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

from maas_ray import storage

if TYPE_CHECKING:
    import ray.data

_EXTENSIONS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".json": "json"}


class DataError(ValueError):
    """Input data that cannot be used as asked (missing file, column, type)."""


def infer_format(source: str) -> str:
    """The reader for ``source`` from its extension (folders: from their first file)."""
    for ext, fmt in _EXTENSIONS.items():
        if source.lower().removesuffix(".gz").endswith(ext):
            return fmt
    fs, path = storage.filesystem(source)
    import pyarrow.fs as pafs

    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        for child in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
            for ext, fmt in _EXTENSIONS.items():
                if child.path.lower().endswith(ext):
                    return fmt
    raise DataError(f"cannot tell the format of {source!r}: name it with data.format")


def read_table(source: str, fmt: str | None = None) -> ray.data.Dataset:
    """A lazy Ray Data dataset over ``source``; nothing is read in the driver."""
    import ray.data

    fs, path = storage.filesystem(source)
    import pyarrow.fs as pafs

    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise DataError(f"data source {source!r} does not exist")
    fmt = fmt or infer_format(source)
    readers = {"csv": ray.data.read_csv, "parquet": ray.data.read_parquet, "json": ray.data.read_json}
    return readers[fmt](path, filesystem=fs)


def feature_columns(schema: pa.Schema | object, target: str, features: list[str] | None) -> list[str]:
    """Resolve and check the feature columns against a dataset schema."""
    names = list(schema.names)
    types = dict(zip(names, schema.types))
    if target not in names:
        raise DataError(f"target column {target!r} not in data (columns: {names})")
    if features is None:
        features = [n for n in names if n != target and _is_numeric(types[n])]
        if not features:
            raise DataError(f"no numeric feature columns besides {target!r} (columns: {names})")
        return features
    require_numeric_columns(schema, features)
    return features


def require_numeric_columns(schema: pa.Schema | object, columns: list[str]) -> None:
    """Raise :class:`DataError` unless every column exists and is numeric."""
    names = list(schema.names)
    types = dict(zip(names, schema.types))
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(f"feature columns {missing} not in data (columns: {names})")
    bad = [c for c in columns if not _is_numeric(types[c])]
    if bad:
        raise DataError(f"feature columns {bad} are not numeric")


def _is_numeric(dtype: object) -> bool:
    if isinstance(dtype, pa.DataType):
        return pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_boolean(dtype)
    import numpy as np

    try:
        return np.issubdtype(np.dtype(dtype), np.number)
    except TypeError:
        return False
