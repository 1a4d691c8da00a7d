"""Spec validation: bad specs fail before Ray starts, naming field and value."""

from __future__ import annotations

from pathlib import Path

import pytest

from maas_ray.config import SpecError, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[2]

GOOD = {"name": "m", "task": "regression", "data": {"source": "t.csv", "target": "y"}}


def test_examples_load_and_resolve_data_next_to_the_spec() -> None:
    for folder in ("regression", "classification"):
        spec = load_spec(REPO / "examples" / folder / "spec.yaml")
        assert Path(spec.data.source).is_absolute()
        assert Path(spec.data.source).exists()


def test_defaults_fill_in() -> None:
    spec = parse_spec(GOOD)
    assert spec.model.kind == "linear"
    assert spec.training.optimizer == "sgd"
    assert spec.scaling.num_workers == 1


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"training": {"learning_rate": -1}}, "training.learning_rate"),
        ({"training": {"epocs": 3}}, "training.epocs: unknown field"),
        ({"task": "ranking"}, "task"),
        ({"scaling": {"num_workers": 0}}, "scaling.num_workers"),
        ({"name": "../etc"}, "invalid model name"),
        ({"data": {"source": "t.csv", "target": "y", "test_fraction": 0.5, "validation_fraction": 0.45}},
         "validation_fraction + test_fraction"),
        ({"model": {"kind": "mlp", "hidden_sizes": [8, 0]}}, "hidden_sizes"),
        ({"scaling": {"num_workers": {"min": 3, "max": 2}}}, "scaling.num_workers: max (2) must be at least min (3)"),
        ({"scaling": {"num_workers": {"min": 1}}}, "scaling.num_workers.max: Field required"),
    ],
)
def test_bad_fields_are_named(patch: dict, needle: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec({**GOOD, **patch})
    assert needle in str(err.value)


def test_bad_value_is_shown() -> None:
    with pytest.raises(SpecError, match=r"got -1"):
        parse_spec({**GOOD, "training": {"learning_rate": -1}})


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("name: m\ntask: [regression\n")
    with pytest.raises(SpecError, match=r"not valid YAML at line"):
        load_spec(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read spec"):
        load_spec(tmp_path / "nope.yaml")


def test_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(SpecError, match="expected a mapping"):
        load_spec(path)


def test_elastic_worker_range() -> None:
    spec = parse_spec({**GOOD, "scaling": {"num_workers": {"min": 1, "max": 2}}})
    assert spec.scaling.ray_num_workers() == (1, 2)
    assert parse_spec(GOOD).scaling.ray_num_workers() == 1


@pytest.mark.parametrize("suffix", ["mine\n", "mine\r\n", "-x", "é", "x" * 65, ""])
def test_fine_tune_suffix_is_matched_whole(suffix: str) -> None:
    """``$`` matched before a trailing newline: "mine\\n" passed and the job trained fully
    before publishing failed on the name (issue 14, item 10)."""
    from pydantic import ValidationError

    from maas_ray.config import FineTuneSpec

    with pytest.raises(ValidationError, match="suffix"):
        FineTuneSpec(base_model="m", training_file="file-x", suffix=suffix)
    assert FineTuneSpec(base_model="m", training_file="file-x", suffix="my-run.2").suffix == "my-run.2"


@pytest.mark.parametrize(("patch", "needle"), [
    ({"training": {"seed": 2**64}}, "training.seed"),
    ({"data": {"source": "t.csv", "target": "y", "split_seed": 2**70}}, "data.split_seed"),
    ({"training": {"batch_size": 2**80}}, "training.batch_size"),
    ({"scaling": {"num_workers": 2**63}}, "scaling.num_workers"),
    ({"model": {"kind": "mlp", "hidden_sizes": [2**40]}}, "hidden_sizes"),
])
def test_numbers_have_upper_bounds(patch: dict, needle: str) -> None:
    """Every integer a spec takes is bounded: 2**64 used to pass and fail later (a database
    column, an RNG) instead of naming the field (issue 14, item 9)."""
    with pytest.raises(SpecError) as err:
        parse_spec({**GOOD, **patch})
    assert needle in str(err.value)
    from pydantic import ValidationError

    from maas_ray.config import FineTuneSpec

    with pytest.raises(ValidationError, match="seed"):
        FineTuneSpec(base_model="m", training_file="file-x", seed=2**64)
