"""Who may see what: the one tenant check that every lookup goes through.

Base models (no ``tenant`` in their card) are shared by every tenant; a fine-tuned
model belongs to the tenant whose job made it; uploaded files and fine-tuning
jobs are rows that carry their tenant. HTTP routes (through
``ServiceContext.resolve``), :class:`~maas_ray.finetune.jobs.JobService` and the
job runner all ask here.

Something that is not the caller's reads exactly like something that never
existed: the same exception with the same message, built from nothing but the id
the caller sent. Otherwise the answer would tell a tenant which ids exist (an
existence oracle), and ``name:99`` would list another tenant's versions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from maas_ray.registry import ModelNotFound, ModelVersion
from maas_ray.registry.checkpoints import CheckpointNotKept

DEFAULT_TENANT = "default"  # the one tenant of a service without API keys


def visible_to(card: dict[str, Any], tenant: str) -> bool:
    """Base models (no ``tenant`` in the card) are shared; fine-tuned ones belong to one tenant."""
    owner = card.get("tenant")
    return owner is None or owner == tenant


def owns(row: Any, tenant: str) -> bool:
    """Whether a database row with a ``tenant`` column (a file, a job) exists and is ``tenant``'s."""
    return row is not None and row.tenant == tenant


def model_not_found(model_id: str) -> ModelNotFound:
    """The one answer for a model a tenant may not use, whether or not it exists (OpenAI's
    wording). It names only the id as sent: never versions, owners or paths."""
    return ModelNotFound(f"the model {model_id!r} does not exist or you do not have access to it")


def resolve_model(lookup: Callable[[str], ModelVersion], model_id: str, tenant: str) -> ModelVersion:
    """``lookup(model_id)`` (``Registry.get`` or a cached equivalent) if ``tenant`` may use
    the model; else :func:`model_not_found`, also when the lookup found nothing, so its
    message (which may list versions) never reaches a tenant. The exception: a checkpoint
    step the job did not keep, told to the model's own tenant (which steps were kept)."""
    try:
        mv = lookup(model_id)
    except CheckpointNotKept as err:
        if visible_to(err.card, tenant):
            raise ModelNotFound(str(err)) from None
        raise model_not_found(model_id) from None
    except ModelNotFound:
        raise model_not_found(model_id) from None
    if not visible_to(mv.card, tenant):
        raise model_not_found(model_id)
    return mv
