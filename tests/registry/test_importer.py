"""Importing the offline base models (and any local HF folder) into the registry."""

from __future__ import annotations

import json
from pathlib import Path

from maas_ray.registry import Registry
from maas_ray.registry.importer import BASE_MODELS, ensure_base_models, import_hf_model


def test_base_models_import_as_safetensors(base_models: dict[str, str], maas_home: str) -> None:
    reg = Registry(maas_home)
    chat, emb = reg.get("smollm2-135m-instruct"), reg.get("all-minilm-l6-v2")
    assert (chat.task, emb.task) == ("chat", "embedding")
    for mv in (chat, emb):
        folder = Path(base_models[mv.name])
        assert (folder / "model.safetensors").exists()
        assert not list(folder.glob("*.gguf")) and not list(folder.glob("*.bin"))
        assert (folder / "tokenizer.json").exists()
        assert mv.card["format"] == "hf-transformers"
        assert mv.card["num_parameters"] > 1_000_000
    assert chat.card["architecture"] == "LlamaForCausalLM"
    assert chat.card["source"].endswith(BASE_MODELS["smollm2-135m-instruct"].gguf_file)
    assert json.loads((Path(base_models[chat.name]) / "config.json").read_text()).get(
        "quantization_config") is None, "GGUF is dequantised once, at import"


def test_second_ensure_is_a_no_op(base_models: dict[str, str], maas_home: str) -> None:
    reg = Registry(maas_home)
    before = {n: reg.versions(n) for n in BASE_MODELS}
    ensure_base_models(reg)
    assert {n: reg.versions(n) for n in BASE_MODELS} == before


def test_local_hf_folder_imports_the_same_way(tmp_path: Path) -> None:
    reg = Registry(str(tmp_path))
    mv = import_hf_model(reg, "my-minilm", BASE_MODELS["all-minilm-l6-v2"].folder(), "embedding")
    assert mv.id == "my-minilm:1" and mv.task == "embedding"
    assert (Path(mv.uri) / "model.safetensors").exists()
