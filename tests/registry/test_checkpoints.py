"""Checkpoints as models (issue 17, item 6): ``ft:...:ckpt-step-N`` resolves through the
fine-tuned model's card, checksummed, owned by the model's tenant. No Ray, no weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from maas_ray.registry import InvalidModelName, ModelNotFound, ModelRef, Registry, TamperedModel
from maas_ray.registry.checkpoints import CheckpointNotKept, describe
from maas_ray.tenancy import resolve_model

NAME = "ft:tiny:s:ftjob-0123456789abcdef01234567"


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    """A fine-tuned model of tenant "a" whose job kept steps 2 and 4 (as the runner publishes)."""
    kept = []
    for step in (4, 2):
        folder = tmp_path / "runs" / f"checkpoint_{step}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(f"weights at {step}".encode())
        (folder / "optimizer.pt").write_bytes(b"restart only")
        kept.append({"uri": str(folder), "step": step, "epoch": step // 2 - 1, "train_loss": 1.0 / step})
    src = tmp_path / "model"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"final weights")
    reg = Registry(str(tmp_path / "home"))
    reg.publish(NAME, src, {"task": "chat", "format": "hf-transformers", "tenant": "a", "owned_by": "a",
                            "gguf": {"file": "model.gguf"}, "checkpoints": describe(kept, ("optimizer.pt",))})
    return reg


def test_a_kept_checkpoint_resolves_as_a_version_of_its_own_name(registry: Registry, tmp_path: Path) -> None:
    mv = registry.get(f"{NAME}:ckpt-step-2")
    assert (mv.name, mv.version, mv.id) == (f"{NAME}:ckpt-step-2", 1, f"{NAME}:ckpt-step-2:1")
    assert registry.get(f"{NAME}:ckpt-step-2:1") == mv
    assert mv.card["tenant"] == "a" and mv.card["checkpoint"] == {"step": 2, "epoch": 0}
    assert mv.card["metrics"] == {"train_loss": 0.5} and "gguf" not in mv.card  # the model's own
    assert list(mv.card["files"]) == ["model.safetensors"]  # optimizer state is not the model
    assert (registry.local_dir(mv) / "model.safetensors").read_bytes() == b"weights at 2"
    assert registry.versions(mv.name) == [1] and registry.names() == [NAME]
    assert registry.change_stamp(mv.name) == registry.change_stamp(NAME)
    # Checksummed like any version: a changed checkpoint is refused at load.
    (tmp_path / "runs" / "checkpoint_2" / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(TamperedModel):
        registry.local_dir(mv)


def test_a_step_not_kept_says_which_were_to_its_owner_only(registry: Registry) -> None:
    with pytest.raises(CheckpointNotKept, match=r"kept no checkpoint at step 3 \(kept steps: 2, 4\)"):
        registry.get(f"{NAME}:ckpt-step-3")
    assert registry.versions(f"{NAME}:ckpt-step-3") == []
    with pytest.raises(ModelNotFound, match="kept steps: 2, 4"):
        resolve_model(registry.get, f"{NAME}:ckpt-step-3", "a")
    for model_id in (f"{NAME}:ckpt-step-3", f"{NAME}:ckpt-step-2"):  # another tenant learns nothing
        with pytest.raises(ModelNotFound) as err:
            resolve_model(registry.get, model_id, "b")
        assert str(err.value) == f"the model {model_id!r} does not exist or you do not have access to it"
    assert resolve_model(registry.get, f"{NAME}:ckpt-step-4", "a").card["checkpoint"]["step"] == 4


def test_checkpoint_ids_parse_and_are_removed_only_with_their_model(registry: Registry) -> None:
    assert ModelRef.parse(f"{NAME}:ckpt-step-2:1") == ModelRef(f"{NAME}:ckpt-step-2", 1)
    for bad in ("m:ckpt-step-2", f"{NAME}:ckpt-step-", f"{NAME}:ckpt-step-x", f"{NAME}:ckpt-2"):
        with pytest.raises(InvalidModelName):
            ModelRef.parse(bad)
    with pytest.raises(InvalidModelName, match="removed with that model"):
        registry.remove(f"{NAME}:ckpt-step-2")
    registry.remove(NAME)
    with pytest.raises(ModelNotFound):
        registry.get(f"{NAME}:ckpt-step-2")
