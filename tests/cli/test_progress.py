"""Progress bars: drawn on a terminal, silent in pipes and files; batch predict reports rows."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from maas_ray.cli import progress


def run_import(monkeypatch: pytest.MonkeyPatch, terminal: bool) -> str:
    out = io.StringIO()
    monkeypatch.setattr(progress, "console", Console(file=out, force_terminal=terminal, color_system=None, width=100))
    with progress.import_progress(2) as say:
        for name in ("a", "b"):
            say(f"loading {name}")
            say(f"imported {name}:1")
    return out.getvalue()


def test_bars_draw_on_a_terminal_and_stay_quiet_in_a_pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "2/2 models" in run_import(monkeypatch, terminal=True)
    assert run_import(monkeypatch, terminal=False) == ""


@pytest.mark.integration
def test_batch_predict_reports_rows_as_it_goes(regression_model, maas_home: str, tmp_path: Path) -> None:
    from maas_ray.predict import batch_predict

    rows = pd.read_csv("examples/regression/diabetes.csv").drop(columns="target")
    src = tmp_path / "in.csv"
    pd.concat([rows] * 5, ignore_index=True).to_csv(src, index=False)  # 2210 rows
    seen: list[int] = []
    result = batch_predict(regression_model[0].version.id, str(src), str(tmp_path / "out"), maas_home,
                           concurrency=1, batch_size=256, on_rows=seen.append)
    assert result.rows == 5 * len(rows)
    assert seen[-1] == result.rows and seen == sorted(seen) and max(seen) == result.rows
