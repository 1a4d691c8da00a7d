"""Batch inference over files with Ray Data."""

from maas_ray.predict.batch import BatchResult, batch_predict

__all__ = ["BatchResult", "batch_predict"]
