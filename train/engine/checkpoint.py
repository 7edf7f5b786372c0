"""Training checkpoints: the whole model in our format (model.safetensors + model_config.json, the
tokenizer files) plus what the engine needs to resume exactly: the optimizer and schedule, and the
trainer's own state (step, data position, RNG) as client state. With the plain engine that is
`trainer_state.pt`; with DeepSpeed it is DeepSpeed's own checkpoint files in the same directory.

Layout of a run directory:
    OUT/checkpoints/step_0000100/   one complete checkpoint
    OUT/latest                      the name of the newest complete checkpoint
Every rank writes into `checkpoints/.tmp-step_N`; after all have finished, rank 0 renames it to
`step_N` and replaces `latest` atomically. A run killed at any moment leaves the previous checkpoint
as "latest"; the next save clears the stale temporary directory.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from models.checkpoint import CONFIG_FILE, LATEST_FILE, atomic_write, write_model_files

from ..errors import UserError
from .distributed import barrier

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


def save_checkpoint(
    out_dir: Path,
    step: int,
    engine,
    config,
    client_state: dict,
    args: dict,
    tokenizer_dir: Path | None,
    keep: int,
    is_main: bool,
) -> Path:
    """Every rank calls this (DeepSpeed shards and ZeRO-3 gathers need all of them). A write that fails
    (disk full) is one error; the previous checkpoint stays the latest."""
    root = out_dir / "checkpoints"
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    try:
        engine.save_state(tmp, client_state, is_main)
        weights = engine.full_state_dict()
        barrier()
        if is_main:
            write_model_files(weights, config, tmp, tokenizer_dir)
            (tmp / ARGS_FILE).write_text(json.dumps(args, indent=2, default=str) + "\n")
            if final.exists():  # re-saving the same step (a resumed run that ends where it started)
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write(out_dir / LATEST_FILE, lambda p: p.write_text(final.name + "\n"))
            _prune(root, keep)
    except OSError as e:
        kept = latest_checkpoint(out_dir)
        raise UserError(
            f"{final}: could not write the checkpoint ({e.strerror or e}); "
            + (f"{kept.name} stays the latest" if kept else "there is no earlier checkpoint")
        ) from None
    finally:
        if is_main and tmp.exists():
            shutil.rmtree(tmp)
    barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.iterdir() if p.name.startswith("step_"))
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out_dir: Path) -> Path | None:
    marker = out_dir / LATEST_FILE
    if not marker.exists():
        return None
    path = out_dir / "checkpoints" / marker.read_text().strip()
    if not (path / CONFIG_FILE).exists():
        raise UserError(f"{marker} names {path.name}, which is incomplete or missing")
    return path
