"""Exporting a Hugging Face causal LM folder to GGUF, so llama.cpp can serve it.

Fine-tuning writes safetensors (a merged LoRA is a plain model again); the
llama.cpp engine, the fast one on CPU, reads GGUF. This module writes that
GGUF with the ``gguf`` package's writer, offline, following what llama.cpp's
own ``convert_hf_to_gguf.py`` does for the Llama family (SmolLM2 is one):

- metadata from ``config.json`` (block count, heads, RoPE base, RMS epsilon);
- the tokenizer as a GPT-2 style BPE vocabulary with merges, special tokens,
  chat template and the pre-tokenizer llama.cpp must use (recognised, as
  llama.cpp does, by hashing how the tokenizer splits a fixed text);
- tensors renamed to GGUF names, with Q/K rows permuted back to the
  interleaved RoPE layout llama.cpp expects (transformers un-permutes them
  when it reads a GGUF).

Use it from a publish step::

    card = attach_gguf(folder, card, outtype="q8_0")   # writes folder/model.gguf
    registry.publish(name, folder, card)

``f32`` keeps the weights exactly (greedy output then matches the
transformers engine as closely as two different kernels can); ``f16`` halves
the file at a tiny precision cost; ``q8_0`` quarters it and is fastest on CPU.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from hashlib import sha256
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from maas_ray.registry.store import ModelVersion, Registry

logger = logging.getLogger(__name__)

OutType = Literal["f32", "f16", "q8_0"]
OUTTYPES: tuple[str, ...] = ("f32", "f16", "q8_0")
DEFAULT_OUTTYPE: OutType = "q8_0"
"""What the base SmolLM2 import, folder imports and ``maas models export-gguf`` write, chosen
by ``benchmarks/gguf_agreement.py`` (README, "GGUF models"): batch-invariant on the default
llama.cpp build, the fastest type there, and closer to the transformers reference than the
shipped Q4_1. f16/f32 agree more, but llama.cpp multiplies them with other kernels for one
row than for several, so the engine's self-check serves them one request at a time."""
GGUF_FILE = "model.gguf"
"""Where a registry version keeps its GGUF weights (see :func:`attach_gguf`)."""

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)

# llama.cpp's convert_hf_to_gguf.py: sha256 of str(tokenizer.encode(_CHKTXT)) → the
# pre-tokenizer name llama.cpp implements. Only GPT-2 style BPE tokenizers of
# Llama-architecture models we can test are listed.
_CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
_PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


class GGUFExportError(ValueError):
    """The folder holds a model this exporter cannot write as GGUF (says why)."""


def export_gguf(hf_dir: Path | str, out_file: Path | str, outtype: OutType = DEFAULT_OUTTYPE,
                name: str | None = None) -> Path:
    """Write the causal LM in ``hf_dir`` (config.json, safetensors, tokenizer) to ``out_file``.

    ``outtype``: ``"f32"`` (exact weights), ``"f16"`` or ``"q8_0"`` for the
    matrices; norms stay f32 as llama.cpp wants. ``name`` goes into the
    GGUF's ``general.name`` (default: the folder's name). The file appears atomically
    (written beside it, then renamed), so a failed export leaves nothing.
    Raises :class:`GGUFExportError` for an unsupported model or outtype.
    """
    import gguf

    hf_dir, out_file = Path(hf_dir), Path(out_file)
    if outtype not in OUTTYPES:
        raise GGUFExportError(f"outtype must be one of {OUTTYPES}, got {outtype!r}")
    config = _read_config(hf_dir)
    tmp = out_file.with_name(f".{out_file.name}.{uuid.uuid4().hex[:8]}.tmp")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        _write_metadata(writer, config, name or hf_dir.name, outtype)
        _write_tokenizer(writer, hf_dir, int(config["vocab_size"]))
        n_tensors = _write_tensors(writer, config, hf_dir, outtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out_file)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    logger.info("exported %s (%d tensors, %s) to %s", hf_dir, n_tensors, outtype, out_file)
    return out_file


def attach_gguf(folder: Path | str, card: dict[str, Any], outtype: OutType = DEFAULT_OUTTYPE) -> dict[str, Any]:
    """Add ``folder/model.gguf`` to a version being published; return the card to publish.

    ``folder`` is the HF folder about to go to ``Registry.publish``; the card
    gains ``"formats"`` (with ``"gguf"``) and ``"gguf": {"file", "outtype"}``,
    which the serving layer reads to pick the llama.cpp engine.
    """
    folder = Path(folder)
    export_gguf(folder, folder / GGUF_FILE, outtype, name=card.get("name") or card.get("base_model"))
    formats = list(dict.fromkeys([*weight_formats(card), "gguf"]))
    return dict(card, formats=formats, gguf={"file": GGUF_FILE, "outtype": outtype})


def export_version(registry: Registry, model_id: str, outtype: OutType = DEFAULT_OUTTYPE) -> ModelVersion:
    """Publish a copy of a chat version with GGUF weights added, as the next version of its name.

    A LoRA version is merged into its base first, so the new version holds
    full weights (safetensors and GGUF). The card records ``derived_from``.
    """
    mv = registry.get(model_id)
    if mv.task != "chat":
        raise GGUFExportError(f"model {mv.id!r} is a {mv.task!r} model; only chat models are served from GGUF")
    if mv.card.get("format") == "peft-lora":
        from maas_ray.registry.adapters import model_dir  # the adapter merged into its base

        source = model_dir(registry, mv)
    else:
        source = registry.local_dir(mv)
    skip = {"card.json", GGUF_FILE, gguf_file(mv.card)}
    keep = {k: v for k, v in mv.card.items() if k not in ("files", "created_at", "name", "gguf")}
    card = dict(keep, format="hf-transformers", formats=["hf-transformers"], derived_from=mv.id)
    with tempfile.TemporaryDirectory(prefix="maas-gguf-") as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True, ignore=lambda _d, names: [n for n in names if n in skip])
        card = attach_gguf(tmp, card, outtype)
        return registry.publish(mv.name, Path(tmp), card)


def weight_formats(card: dict[str, Any]) -> list[str]:
    """The weight formats a version holds: ``"hf-transformers"`` (safetensors) and/or ``"gguf"``.

    Cards written before formats were recorded name one ``"format"``.
    """
    formats = card.get("formats")
    if formats:
        return list(formats)
    return [card["format"]] if card.get("format") else []


def gguf_file(card: dict[str, Any]) -> str | None:
    """The GGUF file's name inside the version folder, if the version has one."""
    entry = card.get("gguf")
    return str(entry["file"]) if isinstance(entry, dict) and entry.get("file") else None


# -- pieces ------------------------------------------------------------------
def _read_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise GGUFExportError(f"{hf_dir} has no config.json: not a Hugging Face model folder")
    config = json.loads(path.read_text())
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFExportError(f"cannot export {arch} to GGUF: supported are {SUPPORTED_ARCHITECTURES}")
    rope_type = _rope(config).get("rope_type", _rope(config).get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise GGUFExportError(f"cannot export RoPE scaling {rope_type!r} to GGUF (default or linear only)")
    if not any(hf_dir.glob("*.safetensors")):
        raise GGUFExportError(f"{hf_dir} has no .safetensors weights")
    return config


def _rope(config: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings: transformers 5 writes ``rope_parameters`` (theta included), 4.x ``rope_scaling``."""
    return dict(config.get("rope_parameters") or config.get("rope_scaling") or {})


def _write_metadata(writer: Any, config: dict[str, Any], name: str, outtype: str) -> None:
    import gguf

    n_head = int(config["num_attention_heads"])
    writer.add_name(name)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(int(config.get("num_key_value_heads", n_head)))
    rope = _rope(config)
    writer.add_rope_freq_base(float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(config["vocab_size"]))
    head_dim = config.get("head_dim") or int(config["hidden_size"]) // n_head
    writer.add_rope_dimension_count(int(head_dim))
    if rope.get("rope_type", rope.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    writer.add_file_type(int(file_type))
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_tokenizer(writer: Any, hf_dir: Path, vocab_size: int) -> None:
    """A GPT-2 style BPE vocabulary, as ``convert_hf_to_gguf.py``'s ``_set_vocab_gpt2``."""
    import gguf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True, trust_remote_code=False)
    if not (hf_dir / "tokenizer.json").is_file() or \
            json.loads((hf_dir / "tokenizer.json").read_text())["model"]["type"] != "BPE":
        raise GGUFExportError(f"{hf_dir}: only BPE tokenizers (tokenizer.json) can be exported to GGUF")
    chkhsh = sha256(str(tok.encode(_CHKTXT)).encode()).hexdigest()
    pre = _PRE_TOKENIZERS.get(chkhsh)
    if pre is None:
        raise GGUFExportError(f"{hf_dir}: unknown BPE pre-tokenizer (hash {chkhsh}); "
                              f"known: {sorted(_PRE_TOKENIZERS.values())}")
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            special = decoder[i].special or (token.startswith("<|") and token.endswith("|>"))
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=vocab_size)
    if special.chat_template is None and getattr(tok, "chat_template", None):
        special.chat_template = tok.chat_template
    special.add_to_gguf(writer, quiet=True)
    # What the tokenizer does, not what a config flag claims: llama.cpp adds BOS
    # to a prompt only if this says so.
    probe = tok("a")["input_ids"]
    writer.add_add_bos_token(bool(tok.bos_token_id is not None and probe and probe[0] == tok.bos_token_id))
    writer.add_add_space_prefix(False)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half Q/K rows → llama.cpp's interleaved pairs (convert_hf_to_gguf's permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tensors(writer: Any, config: dict[str, Any], hf_dir: Path, outtype: str) -> int:
    import gguf
    from safetensors import safe_open

    n_layers = int(config["num_hidden_layers"])
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads", n_head))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    tied = bool(config.get("tie_word_embeddings", False))
    count = 0
    for path in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            for hf_name in fh.keys():  # noqa: SIM118 - safe_open is not a dict
                if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
                    continue
                name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise GGUFExportError(f"{path.name}: tensor {hf_name!r} has no GGUF name")
                data = fh.get_tensor(hf_name).float().numpy()
                if hf_name.endswith("q_proj.weight"):
                    data = _permute(data, n_head)
                elif hf_name.endswith("k_proj.weight"):
                    data = _permute(data, n_kv)
                _add_tensor(writer, name, data, outtype)
                count += 1
    return count


def _add_tensor(writer: Any, name: str, data: np.ndarray, outtype: str) -> None:
    import gguf

    if data.ndim <= 1 or outtype == "f32":  # norms (and f32 exports) stay f32
        writer.add_tensor(name, data.astype(np.float32))
    elif outtype == "f16":
        writer.add_tensor(name, data.astype(np.float16))
    elif data.shape[-1] % 32 == 0:  # q8_0 blocks are 32 values along a row
        qtype = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(data.astype(np.float32), qtype), raw_dtype=qtype)
    else:
        writer.add_tensor(name, data.astype(np.float16))
