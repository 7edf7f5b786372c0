"""Training checkpoints: weights and config (our model format), tokenizer files, and the state to
resume exactly (optimizer, schedule, data position, RNG, step) in `trainer_state.pt`.

Layout of a run directory:
    OUT/checkpoints/step_0000100/   one complete checkpoint
    OUT/latest                      the name of the newest complete checkpoint
Each checkpoint is written under a temporary name and renamed into place, then `latest` is replaced
atomically, so a crash at any moment leaves the previous checkpoint as "latest".
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from models import save_model
from models.hf import LATEST_FILE
from models.io import WEIGHTS_FILE, atomic_write, load_state_strict, read_weights

from .errors import UserError

STATE_FILE = "trainer_state.pt"
ARGS_FILE = "train_args.json"


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def save_checkpoint(out_dir: Path, step: int, model, trainer_state: dict, args: dict,
                    tokenizer_dir: Path | None, keep: int = 2) -> Path:
    ckpt_root = out_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / checkpoint_name(step)
    tmp = ckpt_root / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        save_model(model, tmp, tokenizer_dir)
        torch.save(trainer_state, tmp / STATE_FILE)
        (tmp / ARGS_FILE).write_text(json.dumps(args, indent=2, default=str) + "\n")
        if final.exists():  # re-saving the same step (e.g. a resumed run that ends where it started)
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    atomic_write(out_dir / LATEST_FILE, lambda p: p.write_text(final.name + "\n"))
    _prune(ckpt_root, keep)
    return final


def _prune(ckpt_root: Path, keep: int) -> None:
    done = sorted(p for p in ckpt_root.iterdir() if p.name.startswith("step_"))
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out_dir: Path) -> Path | None:
    marker = out_dir / LATEST_FILE
    if not marker.exists():
        return None
    path = out_dir / "checkpoints" / marker.read_text().strip()
    if not (path / STATE_FILE).exists():
        raise UserError(f"{marker} names {path.name}, which is incomplete or missing")
    return path


def load_training_state(path: Path, model: torch.nn.Module) -> dict:
    """Load a checkpoint's weights into `model` (strict) and return its trainer state."""
    load_state_strict(model, read_weights(path / WEIGHTS_FILE), str(path))
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable state file is the same user-facing error
        raise UserError(f"{path / STATE_FILE}: cannot read the trainer state ({e})") from None
