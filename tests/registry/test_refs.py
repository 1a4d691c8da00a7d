"""Model ids: names and versions are matched whole, in ASCII (issue 14, items 9 and 10)."""

from __future__ import annotations

import pytest

from maas_ray.registry.refs import InvalidModelName, ModelRef, validate_name


def test_names_and_versions_parse() -> None:
    assert ModelRef.parse("m") == ModelRef("m", None)
    assert ModelRef.parse("m:3") == ModelRef("m", 3)
    assert ModelRef.parse("ft:base:s:ftjob-1") == ModelRef("ft:base:s:ftjob-1", None)
    assert ModelRef.parse("ft:base:s:ftjob-1:2") == ModelRef("ft:base:s:ftjob-1", 2)
    assert ModelRef.parse(f"m:{2**63 // 10}").version == 2**63 // 10


@pytest.mark.parametrize("model_id", [
    "m:²",  # str.isdigit() says yes, int() says no: was a 500
    "m:٣", "m:߁", "m:３",  # digits int() accepts, but no version folder is named so
    "m:" + "9" * 19,  # past a signed 64-bit integer
    "m:" + "9" * 5000,  # past int()'s digit limit: was a 500 too
    "m\nx", "m:1\nx",
    "../m", ".m", "m:", "",
])
def test_odd_ids_are_invalid_names_never_other_errors(model_id: str) -> None:
    with pytest.raises(InvalidModelName):
        ModelRef.parse(model_id)


def test_validate_name_matches_whole_name() -> None:
    assert validate_name("a.b_c-1") == "a.b_c-1"
    for bad in ("a\n", "ft:a:b:c\n", "a b", "ft:a:b", "a" * 129):  # `$` matched before "\n"
        with pytest.raises(InvalidModelName):
            validate_name(bad)
