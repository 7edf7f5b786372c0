"""Our checkpoint format: `model_config.json` + `model.safetensors` (+ tokenizer files beside them), and
finding the checkpoint a run directory names (`latest`).

Loading is strict: a missing or unexpected tensor, or a shape that does not fit the config, is an
error naming the key. Tied embeddings are stored once (as transformers does) and re-tied on load.
Writes go to a temporary name in the same directory and are renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .chat_format import RESPONSE_TEMPLATE
from .config import ConfigError, load_config, save_config
from .registry import build_model

CONFIG_FILE = "model_config.json"
WEIGHTS_FILE = "model.safetensors"
CHECKSUMS_FILE = "checksums.json"  # SHA-256 of the weights, verified on every load
LATEST_FILE = "latest"  # in a training run's directory: the name of the newest complete checkpoint
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and key."""


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename tmp_path onto path."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def replace_dir(new: Path, target: Path) -> None:
    """Put directory `new` where `target` is (same filesystem): the old target, if any, is renamed aside
    first and removed after, so `target` always holds one whole version."""
    if target.exists() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def save_weights(state: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt", **(metadata or {})}))


def add_config_keys(out_dir: Path, keys: dict) -> None:
    """Add keys to a transformers config.json that its config class does not write (for other consumers)."""
    path = Path(out_dir) / "config.json"
    config = json.loads(path.read_text())
    config.update(keys)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))


def save_model(model: torch.nn.Module, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    return write_model_files(model.state_dict(), model.config, out_dir, tokenizer_dir)


def write_model_files(
    state: dict[str, torch.Tensor], config, out_dir: str | Path, tokenizer_dir: str | Path | None = None
) -> Path:
    """Weights (tied lm_head stored once), config and, if given, the tokenizer files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if not k.endswith("lm_head.weight")}
    save_weights({k: v.detach().contiguous().cpu() for k, v in state.items()}, out / WEIGHTS_FILE)
    checksums = json.dumps({WEIGHTS_FILE: file_sha256(out / WEIGHTS_FILE)}, indent=2) + "\n"
    atomic_write(out / CHECKSUMS_FILE, lambda tmp: tmp.write_text(checksums))
    atomic_write(out / CONFIG_FILE, lambda tmp: save_config(config, tmp))
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out)
    return out


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> None:
    src, dst = Path(src), Path(dst)
    if not (src / "tokenizer.json").exists():
        raise CheckpointError(f"{src}: no tokenizer.json here")
    for name in TOKENIZER_FILES:
        if (src / name).exists() and src.resolve() != Path(dst).resolve():
            shutil.copy2(src / name, Path(dst) / name)


def make_tokenizer_config_portable(d: str | Path) -> None:
    """Rewrite a tokenizer_config.json so that transformers 4.x and 5.x load it alike (4.x is what
    llama.cpp's converter and vLLM's CPU build use): the generic fast class, and the extra special
    tokens under their 4.x name as a list (5.x writes `extra_special_tokens` as a list, which 4.x reads
    as a dict and fails on; 5.x still reads the 4.x name). It also declares the response template, so
    that transformers' pipeline returns the reasoning apart from the answer."""
    path = Path(d) / "tokenizer_config.json"
    if not path.exists():
        return
    config = json.loads(path.read_text())
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, dict):
        extra = list(extra.values())
    if extra:
        config["additional_special_tokens"] = list(dict.fromkeys(config.get("additional_special_tokens", []) + extra))
    config.pop("backend", None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["response_template"] = RESPONSE_TEMPLATE
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def verify_checksum(path: Path) -> None:
    """Where a checkpoint lists the file's SHA-256 (checksums.json beside it), the bytes must match it."""
    listed = path.parent / CHECKSUMS_FILE
    if not listed.is_file():
        return  # checkpoints written before checksums, and transformers directories
    try:
        want = json.loads(listed.read_text()).get(path.name)
    except (ValueError, AttributeError):
        raise CheckpointError(f"{listed}: not a readable checksum list") from None
    if want is not None and file_sha256(path) != want:
        raise CheckpointError(f"{path}: its bytes do not match the checksum in {listed.name}; the file is damaged")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.is_file():
        verify_checksum(path)
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: weights file not found") from None
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def read_hf_weights(d: Path) -> dict[str, torch.Tensor]:
    """The weights of a transformers directory: model.safetensors, or the shards its index names."""
    index = d / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for f in files:
            state.update(read_weights(d / f))
        return state
    return read_weights(d / WEIGHTS_FILE)


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if not k.endswith("lm_head.weight")}
        expected = {k: v for k, v in expected.items() if not k.endswith("lm_head.weight")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        raise CheckpointError(f"{where}: weights do not match the model config ({'; '.join(parts)})")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(
                f"{where}: tensor '{k}' has shape {tuple(v.shape)}, the config expects {tuple(expected[k].shape)}"
            )
    model.load_state_dict(state, strict=False)  # keys were checked above; tied lm_head follows embed


def is_zero_checkpoint(d: Path) -> bool:
    return any(d.glob("*model_states.pt"))


def consolidate_zero_checkpoint(d: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a DeepSpeed checkpoint directory of any ZeRO stage. DeepSpeed's loader
    unpickles the shards (torch.load with weights_only=False), which can run code: only for trusted files,
    and only when asked for by name (`llm-scratch export --consolidate-zero`)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(d.parent), tag=d.name)


def checkpoint_weights(d: Path, consolidate_zero: bool = False) -> dict[str, torch.Tensor]:
    """The weights of one of our checkpoints: model.safetensors. A directory that holds only DeepSpeed
    ZeRO shards is consolidated only when `consolidate_zero` says the caller trusts its pickled files;
    otherwise it is an error that says how."""
    if not (d / WEIGHTS_FILE).exists() and is_zero_checkpoint(d):
        if not consolidate_zero:
            raise CheckpointError(
                f"{d}: no {WEIGHTS_FILE}, only DeepSpeed ZeRO shards, which are pickled files that can run code "
                "when loaded; if you trust them, consolidate them once with `llm-scratch export --checkpoint "
                f"{d} --out DIR --consolidate-zero`"
            )
        return consolidate_zero_checkpoint(d)
    return read_weights(d / WEIGHTS_FILE)


def load_model(
    ckpt_dir: str | Path, device: str | torch.device = "cpu", consolidate_zero: bool = False
) -> torch.nn.Module:
    d = Path(ckpt_dir)
    try:
        config = load_config(d / CONFIG_FILE)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    model = build_model(config)
    load_state_strict(model, checkpoint_weights(d, consolidate_zero), str(d))
    return model.to(device)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint dir itself or a training run's output dir."""
    p = Path(path)
    if (p / CONFIG_FILE).exists():
        return p
    if (p / LATEST_FILE).exists():
        name = (p / LATEST_FILE).read_text().strip()
        ckpt = p / "checkpoints" / name
        if (ckpt / CONFIG_FILE).exists():
            return ckpt
        raise CheckpointError(f"{p / LATEST_FILE} names {name!r}, which is not a complete checkpoint")
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint directory")
    raise CheckpointError(f"{p}: not a checkpoint (no {CONFIG_FILE} and no '{LATEST_FILE}' file)")
