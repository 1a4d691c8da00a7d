"""Loading specs from YAML with errors that name the field and say what to fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from maas_ray.config.specs import TrainSpec


class SpecError(ValueError):
    """A spec that cannot run; the message names the file, field and fix."""


def format_validation_error(err: ValidationError, origin: str = "spec") -> str:
    """One line per problem: ``origin: field.path: got X: expected Y``."""
    lines = []
    for item in err.errors():
        path = ".".join(str(p) for p in item["loc"]) or "(top level)"
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see `maas train --explain`)"
        got = item.get("input")
        got_txt = "" if item["type"] in ("missing",) else f" (got {got!r:.60})"
        lines.append(f"{origin}: {path}: {msg}{got_txt}")
    return "\n".join(lines)


def parse_spec(raw: Any, origin: str = "spec", base_dir: Path | None = None) -> TrainSpec:
    """Validate a parsed YAML/JSON object into a :class:`TrainSpec`.

    Local data paths are made absolute relative to ``base_dir`` (the spec's folder).
    """
    if not isinstance(raw, dict):
        raise SpecError(f"{origin}: expected a mapping of fields, got {type(raw).__name__}")
    try:
        spec = TrainSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, origin)) from None
    except ValueError as err:  # raised by validators outside pydantic's wrapping
        raise SpecError(f"{origin}: {err}") from None
    source = spec.data.source
    if base_dir is not None and "://" not in source and not Path(source).is_absolute():
        resolved = (base_dir / source).resolve()
        spec = spec.model_copy(
            update={"data": spec.data.model_copy(update={"source": str(resolved)})}
        )
    return spec


def load_spec(path: str | Path) -> TrainSpec:
    """Read and validate a YAML spec file; raise :class:`SpecError` on any problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SpecError(f"{path}: cannot read spec: {err.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    return parse_spec(raw, origin=str(path), base_dir=path.parent)
