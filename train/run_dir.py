"""What every training stage does before it trains: the run directory's rules (a new run, or --resume of
its own), the tokenizer, the starting model, and the checks that the data fits the model."""

from __future__ import annotations

from pathlib import Path

import torch

from models import CheckpointError, build_model, load_config, load_pretrained
from models.checkpoint import CONFIG_FILE, LATEST_FILE

from .data.tokenizer import check_vocab, load_tokenizer, tokenizer_dir_for
from .engine.checkpoint import latest_checkpoint
from .errors import UserError


def check_context(seq_len: int, config) -> None:
    """Rows of seq_len tokens must fit the model's context (every stage checks this before it reads data)."""
    if seq_len < 1:
        raise UserError(f"--seq-len must be at least 1, got {seq_len}")
    if seq_len > config.max_position_embeddings:
        raise UserError(
            f"--seq-len {seq_len} is longer than the model's context "
            f"(max_position_embeddings={config.max_position_embeddings})"
        )


class RunDir:
    """The run directory, the checkpoint to resume from, and the tokenizer."""

    def __init__(self, out: str, resume: bool, tokenizer: str | None, init: str | None):
        self.out = Path(out)
        self.resume_ckpt = latest_checkpoint(self.out) if resume else None
        if resume and self.resume_ckpt is None:
            raise UserError(f"--resume: no checkpoint in {self.out}")
        if not resume and (self.out / LATEST_FILE).exists():
            raise UserError(f"{self.out} already holds a run; pass --resume to continue it or choose another --out")
        self.init = init
        if tokenizer:
            self.tokenizer_dir = Path(tokenizer)
        elif self.resume_ckpt is not None:
            self.tokenizer_dir = self.resume_ckpt
        elif init:
            try:
                self.tokenizer_dir = tokenizer_dir_for(init)
            except CheckpointError as e:
                raise UserError(f"--init: {e}") from None
        else:
            raise UserError("--tokenizer DIR is required (train one with `llm-scratch tokenizer`)")
        self.tokenizer = load_tokenizer(self.tokenizer_dir)

    def starting_model(self, seed: int) -> torch.nn.Module:
        """On resume: the architecture of the checkpoint (its weights are loaded by the trainer);
        otherwise the --init model with its weights."""
        torch.manual_seed(seed)
        if self.resume_ckpt is not None:
            model = build_model(load_config(self.resume_ckpt / CONFIG_FILE))
        elif self.init:
            try:
                model = load_pretrained(self.init)
            except CheckpointError as e:
                raise UserError(f"--init: {e}") from None
        else:
            raise UserError("--init DIR is required: the model this stage starts from")
        check_vocab(self.tokenizer, model, self.init or self.resume_ckpt)
        return model
