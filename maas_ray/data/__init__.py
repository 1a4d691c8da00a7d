"""Ray Data inputs: read tables, split them, fit and apply preprocessing."""

from maas_ray.data.preprocess import Preprocessor, fit_preprocessor
from maas_ray.data.split import split_dataset
from maas_ray.data.tables import DataError, feature_columns, read_table, require_numeric_columns

__all__ = [
    "DataError",
    "Preprocessor",
    "feature_columns",
    "fit_preprocessor",
    "read_table",
    "require_numeric_columns",
    "split_dataset",
]
