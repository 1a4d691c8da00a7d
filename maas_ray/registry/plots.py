"""Training-curve plots for model cards (matplotlib, headless).

A card's ``loss_curve`` is a list of per-epoch (tabular training) or per-step
(fine-tuning) dicts. Recognised keys: the x axis is ``step`` if present, else
``epoch`` (0-based, drawn from 1); train loss ``train_loss``; validation loss
``val_loss`` (ours) or ``valid_loss`` (OpenAI's fine-tuning metrics). The
publisher writes the PNG into the version folder before publishing, so it is
checksummed with the weights and appears atomically with them.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

PLOT_FILE = "loss_curve.png"
VALID_KEYS = ("val_loss", "valid_loss")


def curve_series(curve: list[dict[str, Any]]) -> tuple[str, dict[str, list[tuple[float, float]]]]:
    """(x label, {"train": [(x, loss)...], "validation": [...]}) from a loss curve."""
    by_step = any("step" in point for point in curve)
    xkey = "step" if by_step else "epoch"
    series: dict[str, list[tuple[float, float]]] = {"train": [], "validation": []}
    for i, point in enumerate(curve):
        x = point.get(xkey)
        x = float(x if by_step else x + 1) if isinstance(x, (int, float)) else float(i + 1)
        for split, keys in (("train", ("train_loss",)), ("validation", VALID_KEYS)):
            value = next((point[k] for k in keys if isinstance(point.get(k), (int, float))), None)
            if value is not None and math.isfinite(value):
                series[split].append((x, float(value)))
    return xkey, series


def render_loss_plot(card: dict[str, Any]) -> bytes | None:
    """PNG bytes of the card's train/validation loss curve; None without a curve."""
    curve = card.get("loss_curve") or []
    xkey, series = curve_series(curve)
    if not series["train"] and not series["validation"]:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on servers, and no GUI toolkit to import
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=100)  # not pyplot: no global state across threads
    ax = fig.subplots()
    styles = {"train": ("#1f77b4", "o"), "validation": ("#d62728", "s")}
    for split, points in series.items():
        if points:
            xs, ys = zip(*points, strict=True)
            color, marker = styles[split]
            ax.plot(xs, ys, label=f"{split} loss", color=color,
                    marker=marker if len(points) <= 50 else None, markersize=3, linewidth=1.5)
    units = card.get("loss_units")
    ax.set_xlabel(xkey)
    ax.set_ylabel(f"loss ({units})" if units else "loss")
    title = card.get("name") or card.get("spec", {}).get("name") or "training curve"
    ax.set_title(f"{title}: training curve")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_loss_plot(card: dict[str, Any], out: Path) -> Path | None:
    """Write the card's loss curve as a PNG at ``out`` (a file, or a folder to put
    :data:`PLOT_FILE` in); return the path, or None when the card has no curve."""
    png = render_loss_plot(card)
    if png is None:
        return None
    out = Path(out)
    path = out / PLOT_FILE if out.is_dir() else out
    path.write_bytes(png)
    return path
