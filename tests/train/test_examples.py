"""The shipped examples train on the shared local Ray and meet their targets."""

from __future__ import annotations

from pathlib import Path

import pytest

from maas_ray.models.tabular import TabularModel
from maas_ray.registry import Registry

pytestmark = pytest.mark.integration


def test_regression_matches_closed_form_within_5_percent(regression_model, maas_home: str) -> None:
    result, example = regression_model
    reference = example.closed_form_test_mse()
    ratio = example.check(result, reference)
    assert ratio <= 1.05
    card = result.version.card
    assert card["task"] == "regression" and card["format"] == "tabular-torch"
    assert card["spec"]["scaling"]["num_workers"] == 2
    epochs = card["spec"]["training"]["epochs"]
    assert [e["epoch"] for e in card["loss_curve"]] == list(range(epochs))
    assert card["loss_curve"][-1]["train_loss"] < card["loss_curve"][0]["train_loss"]
    # checkpoints of the run live in the run's storage
    run_dir = Path(card["run"]["storage"])
    assert any(p.name.startswith("checkpoint_") for p in run_dir.iterdir())


def test_published_version_round_trips(regression_model, maas_home: str) -> None:
    result, _ = regression_model
    reg = Registry(maas_home)
    mv = reg.get(result.version.id)
    model = TabularModel.load(reg.local_dir(mv))
    assert model.n_features == 10
    assert set(p.name for p in Path(mv.uri).iterdir()) >= {
        "model.safetensors", "config.json", "preprocess.json", "card.json"}


@pytest.mark.slow
def test_classification_example_reaches_95_percent(ray_session: None, maas_home: str) -> None:
    from tests.conftest import load_example

    result = load_example("classification").main(maas_home)
    assert result.metrics["test_accuracy"] >= 0.95
    assert result.version.card["classes"] == [0, 1]
