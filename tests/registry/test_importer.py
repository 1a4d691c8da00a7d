"""Importing the offline base models (and any local HF folder) into the registry."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from maas_ray.registry import Registry
from maas_ray.registry.importer import BASE_MODELS, _gguf_file_type, ensure_base_models, import_hf_model

CHAT, EMB = "smollm2-135m-instruct", "all-minilm-l6-v2"


def test_base_models_import_as_safetensors_with_a_card(llm_home: str) -> None:
    reg = Registry(llm_home)
    chat, emb = reg.get(CHAT), reg.get(EMB)
    assert (chat.id, emb.id) == (f"{CHAT}:1", f"{EMB}:1")
    assert (chat.task, emb.task) == ("chat", "embedding")
    for mv in (chat, emb):
        folder = reg.local_dir(mv)  # verifies every file's sha256 against the card
        assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
        assert not list(folder.glob("*.bin"))
        card = mv.card
        assert card["format"] == "hf-transformers" and card["base_model"] == mv.name
        assert card["dtype"] == "float32" and card["num_parameters"] > 1_000_000
        assert Path(card["source"]).exists()
    # The chat model also gets a GGUF for the llama.cpp engine: q8_0 written from the dequantised
    # weights (closer to them than the shipped Q4_1, and faster; see BASE_MODELS).
    assert chat.card["formats"] == ["hf-transformers", "gguf"] and emb.card["formats"] == ["hf-transformers"]
    assert chat.card["gguf"] == {"file": "model.gguf", "outtype": "q8_0",
                                 "source_file": BASE_MODELS[CHAT].gguf_file}
    assert _gguf_file_type(reg.local_dir(chat) / "model.gguf") == "MOSTLY_Q8_0"
    assert not list(reg.local_dir(emb).glob("*.gguf"))
    assert chat.card["architecture"] == "LlamaForCausalLM" and chat.card["context_length"] == 8192
    assert chat.card["source"].endswith(BASE_MODELS[CHAT].gguf_file)
    assert 130e6 < chat.card["num_parameters"] < 140e6
    chat_dir = reg.local_dir(chat)
    assert "quantization_config" not in json.loads((chat_dir / "config.json").read_text()), \
        "GGUF is dequantised once, at import"
    assert json.loads((chat_dir / "generation_config.json").read_text())["eos_token_id"] == 2  # <|im_end|>
    assert emb.card["architecture"] == "BertModel"
    assert emb.card["context_length"] == 256, "sentence-transformers' limit, not BERT's 512"
    assert (reg.local_dir(emb) / "1_Pooling" / "config.json").exists()


def test_second_ensure_is_a_no_op(llm_home: str) -> None:
    reg = Registry(llm_home)
    before = {n: reg.versions(n) for n in BASE_MODELS}
    start = time.perf_counter()
    again = ensure_base_models(reg)
    assert time.perf_counter() - start < 5, "nothing should be converted again"
    assert [mv.id for mv in again] == [f"{CHAT}:1", f"{EMB}:1"]
    assert {n: reg.versions(n) for n in BASE_MODELS} == before


def test_local_hf_folder_imports_the_same_way(tmp_path: Path, llm_dirs: dict[str, str]) -> None:
    """A tiny Llama saved by transformers (with SmolLM2's tokenizer) round-trips bit for bit."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = tmp_path / "tiny-llama"
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(src)
    AutoTokenizer.from_pretrained(llm_dirs[CHAT]).save_pretrained(src)

    reg = Registry(str(tmp_path / "home"))
    seen: list[str] = []
    mv = import_hf_model(reg, "tiny-llama", src, "chat", progress=seen.append)
    assert mv.id == "tiny-llama:1" and mv.task == "chat" and seen
    assert mv.card["architecture"] == "LlamaForCausalLM" and mv.card["context_length"] == 512
    assert mv.card["source"] == str(src)
    weights = load_file(reg.local_dir(mv) / "model.safetensors")
    for key, tensor in model.state_dict().items():
        if key in weights:
            assert torch.equal(weights[key], tensor), key
    assert import_hf_model(reg, "tiny-llama", src, "chat").id == "tiny-llama:2"


def test_bad_sources_fail_before_anything_is_written(tmp_path: Path) -> None:
    reg = Registry(str(tmp_path))
    with pytest.raises(ValueError, match="task"):
        import_hf_model(reg, "x", tmp_path, "regression")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        import_hf_model(reg, "x", tmp_path / "missing", "chat")
    with pytest.raises(FileNotFoundError):
        import_hf_model(reg, "x", tmp_path, "chat", gguf_file="nope.gguf")
    assert reg.names() == []


def test_pickled_checkpoints_are_refused(tmp_path: Path, llm_dirs: dict[str, str]) -> None:
    """A folder whose weights are a pickle (pytorch_model.bin) is never loaded."""
    src = tmp_path / "pickled"
    shutil.copytree(llm_dirs["all-minilm-l6-v2"], src)
    for weights in src.glob("*.safetensors"):
        torch.save(load_file(weights), src / "pytorch_model.bin")
        weights.unlink()
    reg = Registry(str(tmp_path / "home"))
    with pytest.raises(FileNotFoundError, match="only from safetensors"):
        import_hf_model(reg, "pickled", src, "embedding")
    assert reg.names() == []


def test_a_second_storage_root_reuses_the_machines_conversion(tmp_path: Path, llm_home: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The session's import left SmolLM2's conversion in the machine's cache: importing it
    into another storage root gives the very same files without dequantising again, and a
    damaged cache entry is dropped instead of published."""
    from maas_ray.registry import importer

    first = Registry(llm_home).get(CHAT)
    source = BASE_MODELS[CHAT]
    entry = importer._conversion_cache(CHAT, source.folder(), "chat", source.gguf_file, "both", source.gguf_outtype)
    assert importer._cached_card(entry) is not None, "the session's import was cached"
    messages: list[str] = []
    other = Registry(str(tmp_path / "other"))
    mv = import_hf_model(other, CHAT, source.folder(), "chat", source.gguf_file, messages.append,
                         gguf_outtype=source.gguf_outtype)
    assert any("reusing" in m for m in messages) and not any("dequantising" in m for m in messages)
    assert mv.card["files"] == first.card["files"]  # byte-identical (sha256 of every file)
    assert {k: v for k, v in mv.card.items() if k != "created_at"} == \
           {k: v for k, v in first.card.items() if k != "created_at"}
    # A damaged copy (here: of the entry, in a private cache) is refused and removed.
    copy = tmp_path / "cache" / entry.name
    shutil.copytree(entry, copy)
    with (copy / "config.json").open("a") as f:
        f.write(" ")
    assert importer._cached_card(copy) is None and not copy.exists()
