"""``maas train finetune.yaml`` and ``maas jobs``: the same jobs, without HTTP."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from maas_ray.cli import app
from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

runner = CliRunner()


def test_train_the_classifier_example_then_inspect_and_serve_it(serve_url: str, llm_home: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/finetune/classifier.yaml as shipped; the result must reach 90% accuracy on the
    held-out topics_test.jsonl through the running service."""
    import json

    import httpx

    monkeypatch.setenv("COLUMNS", "200")  # rich tables at full width: ids are never cut
    spec = REPO / "examples" / "finetune" / "classifier.yaml"
    result = runner.invoke(app, ["train", str(spec), "--storage", llm_home])
    assert result.exit_code == 0, result.output
    model = re.search(r"published (ft:all-minilm-l6-v2:topics:(ftjob-[0-9a-f]+))", result.output)
    assert model, result.output
    job_id = model.group(2)

    test = [json.loads(line) for line in
            (REPO / "examples" / "finetune" / "topics_test.jsonl").read_text().splitlines()]
    with httpx.Client(base_url=serve_url, timeout=120) as http:
        r = http.post(f"/v1/models/{model.group(1)}/predict", json={"inputs": [t["text"] for t in test]})
        assert r.status_code == 200, r.text
        body = r.json()
        r = http.post(f"/v1/models/{model.group(1)}/predict", json={"inputs": [[1.0, 2.0]]})
        assert r.status_code == 400 and "list of strings" in r.text
    accuracy = sum(p == t["label"] for p, t in zip(body["predictions"], test)) / len(test)
    assert accuracy >= 0.9, accuracy
    assert len(body["probabilities"][0]) == 4

    listed = runner.invoke(app, ["jobs", "ls", "--storage", llm_home])
    assert job_id in listed.output and "succeeded" in listed.output
    shown = runner.invoke(app, ["jobs", "show", job_id, "--storage", llm_home])
    assert shown.exit_code == 0 and model.group(1) in shown.output
    logs = runner.invoke(app, ["jobs", "logs", job_id, "--storage", llm_home])
    lines = logs.output.splitlines()
    assert "Created fine-tuning job" in lines[0] and "validation accuracy" in logs.output
    assert lines[-1] == "status: succeeded"
    again = runner.invoke(app, ["jobs", "cancel", job_id, "--storage", llm_home])
    assert again.exit_code == 2 and "already succeeded" in again.output
    shown = runner.invoke(app, ["models", "show", model.group(1), "--storage", llm_home])
    assert shown.exit_code == 0 and "text-classification" in shown.output


def test_bad_finetune_specs_exit_2(tmp_path: Path, llm_home: str) -> None:
    path = tmp_path / "ft.yaml"
    path.write_text("base_model: smollm2-135m-instruct\ntraining_file: nope.jsonl\nmethod: magic\n")
    result = runner.invoke(app, ["train", str(path), "--storage", llm_home])
    assert result.exit_code == 2 and "method" in result.output
    path.write_text("base_model: smollm2-135m-instruct\ntraining_file: nope.jsonl\n")
    result = runner.invoke(app, ["train", str(path), "--storage", llm_home])
    assert result.exit_code == 2 and "nope.jsonl is not a local file" in result.output
    result = runner.invoke(app, ["jobs", "show", "ftjob-nope", "--storage", llm_home])
    assert result.exit_code == 2 and "no such fine-tuning job" in result.output
