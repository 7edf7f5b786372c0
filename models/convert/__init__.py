"""Conversion to and from native transformers checkpoints, one module per architecture, and
`load_pretrained` for both formats.

| our model | transformers class              | converter                     |
|-----------|---------------------------------|-------------------------------|
| dense     | `Qwen2ForCausalLM`              | models/convert/qwen2.py       |
| moe       | `DeepseekV3ForCausalLM`         | models/convert/deepseek_v3.py |
| vlm       | `LlavaForConditionalGeneration` | models/convert/llava.py       |

Each converter module names its `MODEL_TYPE` (ours) and `HF_MODEL_TYPE` (the `model_type` in a
transformers `config.json`), and has `export(model, special, out)` (writes config.json and the weights
in transformers' on-disk layout; no trust_remote_code needed to load them) and `load(d, hf_config)`
(our model with the directory's weights, loaded strictly). `CONVERTERS` is the table both directions
choose from.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from ..chat_format import ENDOFTEXT, IM_END, PAD
from ..checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    copy_tokenizer_files,
    load_model,
    make_tokenizer_config_portable,
    replace_dir,
    resolve_checkpoint,
)
from . import deepseek_v3, llava, qwen2

CONVERTERS = (qwen2, deepseek_v3, llava)
log = logging.getLogger(__name__)
EXPORT_MARKER = "llm_scratch_export.json"  # marks a directory export wrote (it may replace it later)
BY_MODEL_TYPE = {c.MODEL_TYPE: c for c in CONVERTERS}
BY_HF_MODEL_TYPE = {c.HF_MODEL_TYPE: c for c in CONVERTERS}


def special_ids(tokenizer_dir: Path) -> dict[str, int]:
    """The added tokens of the tokenizer beside a checkpoint, by content ({} when there is none)."""
    path = tokenizer_dir / "tokenizer.json"
    if not path.exists():
        return {}
    added = json.loads(path.read_text()).get("added_tokens", [])
    return {t["content"]: t["id"] for t in added}


def is_transformers_dir(path: Path) -> bool:
    return (path / "config.json").exists() and not (path / CONFIG_FILE).exists()


def check_export_target(out: Path) -> None:
    """Export writes only to a new or empty directory, or to one it exported before (replaced whole)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise CheckpointError(f"{out}: export needs a directory path that is not a file or a link")
    if out.exists() and any(out.iterdir()) and not (out / EXPORT_MARKER).is_file():
        raise CheckpointError(
            f"{out}: not empty and not an earlier export; export goes to a new or empty directory "
            "(or one it wrote before, which it replaces whole)"
        )


def export_hf(checkpoint: str | Path, out_dir: str | Path, consolidate_zero: bool = False) -> Path:
    """Write a transformers checkpoint (config.json, the weights, generation_config.json and the
    tokenizer files) from one of our checkpoints or run directories (or a transformers directory, which
    is written again in this project's layout). Everything is written into a temporary directory beside
    OUT and renamed into place, so OUT is either the old export or the new one, never a mix.
    `consolidate_zero`: the checkpoint is a bare DeepSpeed ZeRO directory whose pickled shards the caller
    trusts (models/checkpoint.py)."""
    p = Path(checkpoint)
    src = p if is_transformers_dir(p) else resolve_checkpoint(p)
    out = Path(out_dir)
    check_export_target(out)
    if out.exists() and src.resolve().is_relative_to(out.resolve()):
        raise CheckpointError(f"{out}: the checkpoint to export lies inside it")
    model = import_hf(src) if is_transformers_dir(src) else load_model(src, consolidate_zero=consolidate_zero)
    converter = BY_MODEL_TYPE.get(model.config.model_type)
    if converter is None:
        raise CheckpointError(f"{src}: export of model type {model.config.model_type!r} is not supported")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        special = special_ids(src)
        converter.export(model, special, tmp)
        if (src / "tokenizer.json").exists():
            copy_tokenizer_files(src, tmp)
            make_tokenizer_config_portable(tmp)  # also for tokenizers written before it was done on training
            normalizer = json.loads((src / "tokenizer.json").read_text()).get("normalizer")
            if model.config.model_type in ("dense", "vlm") and (normalizer or {}).get("type") != "NFC":
                log.warning(
                    f"{src}: its tokenizer does not normalise to NFC, but transformers loads a Qwen2 export with "
                    "Qwen2Tokenizer, which does: text that NFC changes will get other ids there"
                )
        eos = [special[t] for t in (IM_END, ENDOFTEXT) if t in special]
        gen = {"eos_token_id": eos, "pad_token_id": special.get(PAD), "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        (tmp / EXPORT_MARKER).write_text(json.dumps({"exported_from": str(src.resolve())}, indent=2) + "\n")
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def export_gguf(checkpoint: str | Path, out_file: str | Path, fmt: str = "f16", consolidate_zero: bool = False) -> Path:
    """One GGUF file (llama.cpp) from one of our checkpoints or run directories, or a transformers
    directory: the dense model as `qwen2`, the MoE model as `deepseek2` (models/convert/gguf_file.py).
    OUT is a new file or an earlier GGUF file, replaced whole."""
    from .gguf_file import export_gguf as write_gguf

    p = Path(checkpoint)
    src = p if is_transformers_dir(p) else resolve_checkpoint(p)
    out = Path(out_file)
    if out.is_dir():
        raise CheckpointError(f"{out}: a directory; a GGUF export is one file (for example {out / 'model.gguf'})")
    if out.exists():
        with open(out, "rb") as f:
            if f.read(4) != b"GGUF":
                raise CheckpointError(f"{out}: exists and is not a GGUF file; it is left as it is")
    model = import_hf(src) if is_transformers_dir(src) else load_model(src, consolidate_zero=consolidate_zero)
    return write_gguf(model, src, out, fmt, name=src.resolve().name)


def import_hf(hf_dir: str | Path) -> torch.nn.Module:
    """Our model from a transformers `Qwen2ForCausalLM`, `DeepseekV3ForCausalLM` or
    `LlavaForConditionalGeneration` directory (strict)."""
    from transformers import AutoConfig

    d = Path(hf_dir)
    try:
        hf = AutoConfig.from_pretrained(str(d), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{d / 'config.json'}: cannot read the transformers config ({e})") from None
    converter = BY_HF_MODEL_TYPE.get(hf.model_type)
    if converter is None:
        raise CheckpointError(
            f"{d / 'config.json'}: model_type {hf.model_type!r} is not supported "
            f"(expected one of {', '.join(repr(t) for t in BY_HF_MODEL_TYPE)})"
        )
    return converter.load(d, hf)


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Our model from one of our checkpoints, a run directory, or a transformers directory."""
    p = Path(path)
    if is_transformers_dir(p):
        return import_hf(p).to(device)
    return load_model(resolve_checkpoint(p), device)
