"""Loading specs from YAML with errors that name the field and say what to fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from maas_ray.config.finetune import FineTuneSpec
from maas_ray.config.specs import TrainSpec


class SpecError(ValueError):
    """A spec that cannot run; the message names the file, field and fix."""


def format_validation_error(err: ValidationError, origin: str = "spec") -> str:
    """One line per problem: ``origin: field.path: got X: expected Y``."""
    lines: list[str] = []
    items = err.errors()
    paths = [".".join(str(p) for p in i["loc"] if not _is_union_tag(p)) or "(top level)" for i in items]
    # For a union (e.g. num_workers: int | {min, max}), drop "wrong type" errors of
    # the branch the user clearly did not mean when another branch said more.
    keep = [
        not (i["type"] in _BRANCH_MISMATCH and any(
            q.startswith(path) and j["type"] not in _BRANCH_MISMATCH
            for q, j in zip(paths, items) if j is not i))
        for i, path in zip(items, paths)
    ]
    for item, path, kept in zip(items, paths, keep):
        if not kept:
            continue
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see `maas train --explain`)"
        got = item.get("input")
        got_txt = "" if item["type"] in ("missing",) else f" (got {got!r:.60})"
        line = f"{origin}: {path}: {msg.removeprefix('Value error, ')}{got_txt}"
        if line not in lines:
            lines.append(line)
    return "\n".join(lines)


def _is_union_tag(part: object) -> bool:
    """Pydantic names the branch of a union in error paths ('int', 'WorkerRange', ...)."""
    if not isinstance(part, str):
        return False
    return ("[" in part or "-" in part or part[:1].isupper()
            or part in {"int", "float", "str", "bool", "dict", "list"})


_BRANCH_MISMATCH = {"int_type", "int_parsing", "float_type", "dict_type", "model_type",
                    "model_attributes_type", "string_type"}


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
    """Read and validate a YAML training spec; raise :class:`SpecError` on any problem."""
    spec = load_any_spec(path)
    if not isinstance(spec, TrainSpec):
        raise SpecError(f"{path}: a fine-tuning spec (it names base_model), not a training spec")
    return spec


def parse_finetune_spec(raw: dict[str, Any], origin: str = "spec",
                        base_dir: Path | None = None) -> FineTuneSpec:
    """Validate a fine-tuning spec; local data paths become absolute (relative to ``base_dir``)."""
    try:
        spec = FineTuneSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, origin)) from None
    if base_dir is None:
        return spec
    update = {}
    for key in ("training_file", "validation_file"):
        value = getattr(spec, key)
        if value and "://" not in value and not value.startswith("file-") and not Path(value).is_absolute():
            update[key] = str((base_dir / value).resolve())
    return spec.model_copy(update=update)


def load_any_spec(path: str | Path) -> TrainSpec | FineTuneSpec:
    """A training spec, or a fine-tuning spec when it names a ``base_model``."""
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
    if isinstance(raw, dict) and "base_model" in raw:
        return parse_finetune_spec(raw, origin=str(path), base_dir=path.parent)
    return parse_spec(raw, origin=str(path), base_dir=path.parent)
