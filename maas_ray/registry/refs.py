"""Model ids as users write them: ``name`` (latest) or ``name:version``.

Fine-tuned chat models follow OpenAI's ``ft:{base}:{suffix}:{job_id}``, and a
checkpoint the job kept ``ft:{base}:{suffix}:{job_id}:ckpt-step-{N}`` (OpenAI's
``fine_tuned_model_checkpoint``); their colons are part of the name, so a version
is only the last ``:`` part when it is all ASCII digits (at most 18: it fits a
signed 64-bit integer).

Every pattern here is matched whole (``fullmatch``): ``$`` would also match before
a trailing newline, and ``str.isdigit`` accepts digits such as ``²`` that ``int``
then refuses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Letters, digits, '.', '_', '-'; must not start with '.' so no name can walk out
# of the models folder ('..') or hide as a temp folder.
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_VERSION_RE = re.compile(r"[0-9]{1,18}")
CHECKPOINT = ":ckpt-step-"
_CHECKPOINT_RE = re.compile(rf"(ft:{_PART}:{_PART}:{_PART}){CHECKPOINT}({_VERSION_RE.pattern})")
_NAME_RE = re.compile(rf"{_CHECKPOINT_RE.pattern}|ft:{_PART}:{_PART}:{_PART}|{_PART}")


class InvalidModelName(ValueError):
    """A model id that cannot name a registry entry."""


def is_version(text: str) -> bool:
    """A version number as folders and ids write it: ASCII digits only."""
    return _VERSION_RE.fullmatch(text) is not None


def validate_name(name: str) -> str:
    """Return ``name`` if it is a legal model name, else raise :class:`InvalidModelName`."""
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidModelName(
            f"invalid model name {name!r}: use letters, digits, '.', '_' or '-' "
            "(at most 128, not starting with '.'), or 'ft:{base}:{suffix}:{job_id}' "
            "(a checkpoint: 'ft:{base}:{suffix}:{job_id}:ckpt-step-{N}')"
        )
    return name


def checkpoint_of(name: str) -> tuple[str, int] | None:
    """``(fine-tuned model name, step)`` of a checkpoint's name, else None."""
    match = _CHECKPOINT_RE.fullmatch(name)
    return (match.group(1), int(match.group(2))) if match else None


def checkpoint_name(model: str, step: int) -> str:
    return f"{model}{CHECKPOINT}{step}"


@dataclass(frozen=True)
class ModelRef:
    """A parsed model id; ``version=None`` means the latest version."""

    name: str
    version: int | None = None

    @classmethod
    def parse(cls, model_id: str) -> ModelRef:
        model_id = model_id.strip()
        head, sep, tail = model_id.rpartition(":")
        if sep and _VERSION_RE.fullmatch(tail) and _NAME_RE.fullmatch(head) and ".." not in head:
            return cls(head, int(tail))
        return cls(validate_name(model_id), None)

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}:{self.version}"
