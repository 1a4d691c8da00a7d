"""CLI faces without Ray: help text, spec errors (exit 2), registry commands."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from maas_ray.cli import app

runner = CliRunner()


def test_help_lists_every_verb() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for verb in ("up", "train", "predict", "models"):
        assert verb in result.output


def test_malformed_spec_exits_2_naming_the_field(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: m\ntask: regression\ndata: {source: x.csv, target: y}\n"
                    "training: {learning_rate: -0.5}\n")
    result = runner.invoke(app, ["train", str(spec)])
    assert result.exit_code == 2
    assert "training.learning_rate" in result.output
    assert "Traceback" not in result.output


def test_explain_documents_fields() -> None:
    result = runner.invoke(app, ["train", "--explain"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "training.learning_rate" in result.output
    assert "scaling.num_workers" in result.output


def test_models_on_empty_registry_and_unknown_model(tmp_path: Path) -> None:
    result = runner.invoke(app, ["models", "--storage", str(tmp_path)])
    assert result.exit_code == 0
    assert "no models yet" in result.output
    result = runner.invoke(app, ["models", "show", "ghost", "--storage", str(tmp_path)])
    assert result.exit_code == 2
    assert "ghost" in result.output


def test_a_job_that_cannot_fit_is_a_one_line_cli_error(capsys) -> None:
    """`maas train` on a cluster too small: exit 2 and the message, not a traceback."""
    import typer

    from maas_ray.cli.common import user_errors
    from maas_ray.train.resources import InsufficientResources

    @user_errors
    def train() -> None:
        raise InsufficientResources("needs 1 CPU per worker × 2 workers; the cluster has 0.5 CPU free of 2")

    with pytest.raises(typer.Exit) as info:
        train()
    assert info.value.exit_code == 2
    assert "needs 1 CPU per worker" in capsys.readouterr().err


def test_up_refuses_an_unknown_llm_engine_before_starting_anything(tmp_path: Path) -> None:
    result = runner.invoke(app, ["up", "--storage", str(tmp_path), "--llm-engine", "vllm"])
    assert result.exit_code == 2
    text = " ".join(result.output.replace("│", " ").split())  # unwrap Rich's error box
    assert "'vllm': expected auto, transformers or llama.cpp" in text, text
    assert not any(tmp_path.iterdir()), "nothing is written for a refused command"
