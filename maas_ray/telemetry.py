"""Ray metrics helpers that every stage shares.

Ray 2.60 exports a ``Gauge`` only in the report interval after it was set, and
its metrics agent drops a series two intervals after the last export: a gauge
set once (an idle replica's queue of 0, the loss of an epoch that runs for a
minute) would vanish from the scrape. :class:`KeptGauge` re-sends its last
values every half interval from a daemon thread, so a series lives exactly as
long as the process that owns it: a finished job's actor takes its gauges with it.
"""

from __future__ import annotations

import os
import threading
import time

_LOCK = threading.Lock()
_KEPT: list[KeptGauge] = []
_THREAD: threading.Thread | None = None


def report_interval_s() -> float:
    """Ray's metrics report interval (``RAY_metrics_report_interval_ms``, 10 s by default)."""
    return max(int(os.environ.get("RAY_metrics_report_interval_ms", "10000")), 1000) / 1000


class KeptGauge:
    """A ``ray.util.metrics.Gauge`` whose last value per tag set stays exported."""

    def __init__(self, name: str, description: str, tag_keys: tuple[str, ...]) -> None:
        from ray.util import metrics

        self._gauge = metrics.Gauge(name, description=description, tag_keys=tag_keys)
        self._values: dict[tuple[tuple[str, str], ...], float] = {}
        with _LOCK:
            _KEPT.append(self)

    def set(self, value: float, tags: dict[str, str]) -> None:
        with _LOCK:
            self._values[tuple(sorted(tags.items()))] = float(value)
        self._gauge.set(value, tags=tags)
        _start_keeper()

    def _resend(self) -> None:
        with _LOCK:
            values = list(self._values.items())
        for tags, value in values:
            self._gauge.set(value, tags=dict(tags))


def _start_keeper() -> None:
    global _THREAD
    with _LOCK:
        if _THREAD is not None and _THREAD.is_alive():
            return
        _THREAD = threading.Thread(target=_keep, name="maas-metrics-keeper", daemon=True)
        _THREAD.start()


def _keep() -> None:
    period = report_interval_s() / 2
    while True:
        time.sleep(period)
        with _LOCK:
            gauges = list(_KEPT)
        for gauge in gauges:
            gauge._resend()

