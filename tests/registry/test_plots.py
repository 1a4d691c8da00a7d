"""Model cards: the training-curve PNG and the card page, written with a version."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from maas_ray.cli import app
from maas_ray.registry import Registry
from maas_ray.registry.card_page import render_card_markdown, write_card_assets
from maas_ray.registry.plots import PLOT_FILE, render_loss_plot, write_loss_plot

TRAIN_RGB, VALID_RGB = (0x1F, 0x77, 0xB4), (0xD6, 0x27, 0x28)  # the plot's line colours


def epoch_card() -> dict:
    curve = [{"epoch": i, "train_loss": 2.0 / (i + 1), "val_loss": 2.2 / (i + 1)} for i in range(8)]
    return {"task": "regression", "description": "toy", "loss_curve": curve, "loss_units": "mse",
            "metrics": {"test_mse": 1.25, "test_rows": 40}, "spec": {"name": "toy", "training": {"epochs": 8}}}


def colour_pixels(png: bytes, rgb: tuple[int, int, int]) -> int:
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)  # (H, W, 3)
    return int((np.abs(img - np.array(rgb)).sum(axis=-1) < 30).sum())


def test_epoch_curve_draws_train_and_validation_lines(tmp_path: Path) -> None:
    path = write_loss_plot(epoch_card(), tmp_path)
    assert path == tmp_path / PLOT_FILE
    png = path.read_bytes()
    assert Image.open(io.BytesIO(png)).size == (640, 360)
    assert colour_pixels(png, TRAIN_RGB) > 200 and colour_pixels(png, VALID_RGB) > 200


def test_fine_tuning_steps_with_sparse_validation_and_nan(tmp_path: Path) -> None:
    # OpenAI-style metrics: train every step, valid_loss only at epoch ends.
    curve = [{"step": s, "train_loss": 3.0 / s} for s in range(1, 31)]
    curve += [{"step": 10, "valid_loss": 1.0}, {"step": 20, "valid_loss": 0.7}, {"step": 30, "valid_loss": 0.6},
              {"step": 31, "train_loss": math.nan}]
    png = render_loss_plot({"loss_curve": curve})
    assert colour_pixels(png, TRAIN_RGB) > 200 and colour_pixels(png, VALID_RGB) > 50
    only_train = render_loss_plot({"loss_curve": [{"step": s, "train_loss": 1.0 / s} for s in range(1, 5)]})
    assert colour_pixels(only_train, VALID_RGB) == 0


def test_no_curve_no_plot(tmp_path: Path) -> None:
    assert write_loss_plot({"task": "chat"}, tmp_path / "x.png") is None
    assert write_loss_plot({"loss_curve": [{"epoch": 0, "train_loss": math.nan}]}, tmp_path / "x.png") is None
    assert not (tmp_path / "x.png").exists()


def test_card_page_lists_what_the_card_holds() -> None:
    page = render_card_markdown(dict(epoch_card(), loss_plot=PLOT_FILE), "toy:3")
    assert page.startswith("# toy:3\n\ntoy\n")
    assert "| test_mse | 1.25 |" in page and "| epochs | 8 |" in page
    assert f"![train and validation loss per epoch]({PLOT_FILE})" in page
    assert "| 1 | 2 | 2.2 |" in page and "| 8 | 0.25 | 0.275 |" in page  # epochs drawn from 1
    long = {"loss_curve": [{"step": s, "train_loss": 1.0} for s in range(1, 501)]}
    rows = [line for line in render_card_markdown(long).splitlines() if line.startswith("| ")]
    assert 40 < len(rows) <= 52 and rows[-1].startswith("| 500 |")  # subsampled, last kept


def test_published_version_carries_plot_and_page_and_show_prints_them(tmp_path: Path) -> None:
    root = tmp_path / "home"
    src = tmp_path / "src"
    src.mkdir()
    (src / "weights.safetensors").write_bytes(b"not really weights")
    card = write_card_assets(epoch_card(), src, "toy")
    assert card["loss_plot"] == PLOT_FILE and card["card_page"] == "README.md"
    mv = Registry(str(root)).publish("toy", src, card)
    folder = Path(mv.uri)
    assert set(mv.card["files"]) == {"weights.safetensors", PLOT_FILE, "README.md"}  # checksummed
    assert (folder / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    out = CliRunner().invoke(app, ["models", "show", "toy", "--storage", str(root)], terminal_width=200)
    assert out.exit_code == 0, out.output
    assert f"plot: {folder / PLOT_FILE}" in out.output and f"card page: {folder / 'README.md'}" in out.output
    assert "test_mse" in out.output
    md = CliRunner().invoke(app, ["models", "show", "toy:1", "--markdown", "--storage", str(root)])
    assert md.output.startswith("# toy:1") and "## Training curve" in md.output
    raw = CliRunner().invoke(app, ["models", "show", "toy", "--json", "--storage", str(root)])
    assert json.loads(raw.output)["loss_plot"] == PLOT_FILE


@pytest.mark.integration
def test_trained_version_has_its_loss_plot(regression_model, maas_home: str) -> None:
    mv = regression_model[0].version
    assert mv.card["loss_plot"] == PLOT_FILE and PLOT_FILE in mv.card["files"]
    png = (Registry(maas_home).local_dir(mv) / PLOT_FILE).read_bytes()  # checksum verified
    assert colour_pixels(png, TRAIN_RGB) > 200 and colour_pixels(png, VALID_RGB) > 200
