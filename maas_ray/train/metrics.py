"""Metrics of running training jobs, exported on Ray's Prometheus endpoint.

Set from the driver-side :class:`~maas_ray.train.progress.ProgressLog` actor each
time rank 0 reports an epoch (or a fine-tuning step), so they exist only while a
job runs: they stay exported while the actor lives (:mod:`maas_ray.telemetry`) and
age out of the scrape two report intervals after it ends. Exported as
``ray_maas_train_loss``, ``ray_maas_train_samples_per_second``,
``ray_maas_train_progress`` and ``ray_maas_train_samples_total``.
"""

from __future__ import annotations

import functools
from typing import Any

# Event keys: tabular epochs report val_loss, fine-tuning steps valid_loss (OpenAI's name).
_LOSSES = {"train_loss": "train", "val_loss": "validation", "valid_loss": "validation"}


@functools.cache
def _metrics() -> dict[str, Any]:
    from ray.util import metrics

    from maas_ray.telemetry import KeptGauge

    tags = ("run", "model")
    return {
        "loss": KeptGauge("maas_train_loss", "Latest loss of a running training job.", tags + ("split",)),
        "rate": KeptGauge("maas_train_samples_per_second",
                          "Training samples per second over the latest epoch or step.", tags),
        "progress": KeptGauge("maas_train_progress",
                              "Latest epoch (tabular) or step (fine-tuning) reported.", tags),
        "samples": metrics.Counter("maas_train_samples", "Training samples processed.", tag_keys=tags),
    }


def record_progress(run: str, model: str, event: dict[str, Any]) -> None:
    """Export one progress event: losses, ``samples_per_s``, ``samples``, ``epoch``/``step``."""
    m, tags = _metrics(), {"run": run, "model": model}
    for key, split in _LOSSES.items():
        if isinstance(event.get(key), (int, float)):
            m["loss"].set(float(event[key]), tags={**tags, "split": split})
    if isinstance(event.get("samples_per_s"), (int, float)):
        m["rate"].set(float(event["samples_per_s"]), tags=tags)
    if event.get("samples"):
        m["samples"].inc(float(event["samples"]), tags=tags)
    position = event.get("step", event.get("epoch"))
    if isinstance(position, (int, float)):
        m["progress"].set(float(position), tags=tags)
