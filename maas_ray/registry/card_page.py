"""A model card as a page: Markdown rendered from ``card.json``.

Publishers call :func:`write_card_assets` on the version folder before
``Registry.publish``, so every trained or fine-tuned version carries
``README.md`` (the Hugging Face convention for model cards) and
``loss_curve.png`` beside its weights. The CLI and the HTTP card route render
the same page on demand for any version, imported ones included.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from maas_ray.registry.plots import PLOT_FILE, curve_series, write_loss_plot

PAGE_FILE = "README.md"
_MAX_ROWS = 50  # curve rows in the page's table
# Card keys shown in the summary table, in this order, when present.
_SUMMARY = ("task", "format", "base_model", "architecture", "num_parameters", "context_length",
            "dtype", "source", "training_time_s", "fine_tuning_job", "owned_by")


def write_card_assets(card: dict[str, Any], folder: Path, name: str | None = None) -> dict[str, Any]:
    """Write the loss plot (when the card has a curve) and the card page into
    ``folder``; return ``card`` with ``loss_plot``/``card_page`` naming them."""
    folder = Path(folder)
    if write_loss_plot(dict(card, name=name) if name else card, folder / PLOT_FILE) is not None:
        card["loss_plot"] = PLOT_FILE
    card["card_page"] = PAGE_FILE
    (folder / PAGE_FILE).write_text(render_card_markdown(card, name))
    return card


def render_card_markdown(card: dict[str, Any], model_id: str | None = None) -> str:
    """The card as Markdown: summary, data, hyper-parameters, metrics, training curve."""
    title = model_id or card.get("name") or card.get("spec", {}).get("name") or "model"
    out = [f"# {title}", ""]
    if card.get("description"):
        out += [str(card["description"]), ""]
    rows = [(key.replace("_", " "), _fmt(card[key])) for key in _SUMMARY if card.get(key) not in (None, "")]
    if card.get("created_at"):
        rows.append(("created", dt.datetime.fromtimestamp(float(card["created_at"]), dt.timezone.utc)
                     .strftime("%Y-%m-%d %H:%M UTC")))
    out += _table(("field", "value"), rows)
    if card.get("data"):
        out += ["## Data", ""] + _table(("field", "value"), [(k, _fmt(v)) for k, v in card["data"].items()])
    hyper = card.get("hyperparameters") or (card.get("spec") or {}).get("training")
    if hyper:
        out += ["## Hyper-parameters", ""] + _table(("name", "value"), [(k, _fmt(v)) for k, v in hyper.items()])
    if card.get("metrics"):
        out += ["## Metrics", ""] + _table(("metric", "value"), [(k, _fmt(v)) for k, v in card["metrics"].items()])
    curve = card.get("loss_curve") or []
    if curve:
        xkey, series = curve_series(curve)
        out += ["## Training curve", ""]
        if card.get("loss_plot"):
            out += [f"![train and validation loss per {xkey}]({card['loss_plot']})", ""]
        valid = dict(series["validation"])
        points = series["train"] or [(x, float("nan")) for x, _ in series["validation"]]
        if len(points) > _MAX_ROWS:  # long fine-tuning runs: every k-th step, and the last
            stride = -(-len(points) // _MAX_ROWS)
            points = points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])
        out += _table((xkey, "train loss", "validation loss"),
                      [(_fmt(x), _fmt(y), _fmt(valid.get(x, ""))) for x, y in points])
    if card.get("run"):
        out += ["## Run", ""] + _table(("field", "value"), [(k, _fmt(v)) for k, v in card["run"].items()])
    return "\n".join(out).rstrip() + "\n"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    if not rows:
        return []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines + [""]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value:,}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return str(value)
