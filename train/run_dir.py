"""What every training stage does before it trains: the run directory's rules (a new run, or --resume of
its own), the tokenizer, the starting model, and the checks that the data fits the model."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from models import CheckpointError, build_model, load_config, load_pretrained
from models.checkpoint import CONFIG_FILE, LATEST_FILE

from .data.tokenizer import check_vocab, fits_project, install_tokenizer, load_tokenizer, tokenizer_dir_for, vocab_of
from .engine.checkpoint import latest_checkpoint
from .engine.distributed import dist_info
from .errors import UserError
from .outputs import RunLock

# what a run writes at the top of its directory (none of them may be a symbolic link)
RUN_FILES = (
    "metrics.jsonl",
    "summary.json",
    "loss.png",
    LATEST_FILE,
    "checkpoints",
    "reference_logps.pt",
    "data",  # raw --data prepared into a token store (pretraining)
    "eval-data",
    "tokenizer",  # another model's tokenizer, made fit for this project
)


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
    """The run directory (claimed and locked for this run: train/outputs.py), the checkpoint to resume
    from, and the tokenizer. Use it as a context manager: the lock is released when the stage ends."""

    def __init__(
        self, out: str, resume: bool, tokenizer: str | None, init: str | None, default_tokenizer: Path | None = None
    ):
        self.out = Path(out)
        self.resume_ckpt = latest_checkpoint(self.out) if resume else None
        if resume and self.resume_ckpt is None:
            raise UserError(f"--resume: no checkpoint in {self.out}")
        if not resume and (self.out / LATEST_FILE).exists():
            raise UserError(f"{self.out} already holds a run; pass --resume to continue it or choose another --out")
        self.lock = RunLock(self.out, resume, RUN_FILES, take_lock=dist_info()[0] == 0)
        try:
            self._setup(tokenizer, init, default_tokenizer)
        except BaseException:
            self.lock.release(failed=True)
            raise

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.lock.release(failed=exc_type is not None)

    def _setup(self, tokenizer: str | None, init: str | None, default_tokenizer: Path | None) -> None:
        resume = self.resume_ckpt is not None
        self.init = init
        if tokenizer:
            self.tokenizer_dir = Path(tokenizer)
        elif resume:
            self.tokenizer_dir = self.resume_ckpt
        elif init:
            try:
                self.tokenizer_dir = tokenizer_dir_for(init)
            except CheckpointError as e:
                raise UserError(f"--init: {e}") from None
        elif default_tokenizer is not None:
            self.tokenizer_dir = default_tokenizer
        else:
            raise UserError("--tokenizer DIR is required (train one with `llm-scratch tokenizer`)")
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        if not resume and not init and not fits_project(self.tokenizer):  # another model's tokenizer
            if dist_info()[0] == 0:
                install_tokenizer(self.tokenizer_dir, self.out / "tokenizer")
            else:
                while not (self.out / "tokenizer" / "tokenizer.json").exists():
                    time.sleep(0.2)
            self.tokenizer_dir = self.out / "tokenizer"
            self.tokenizer = load_tokenizer(self.tokenizer_dir)
        if tokenizer and (resume or init):  # a --tokenizer beside a model: it must be the model's own
            try:
                model_dir = self.resume_ckpt if resume else tokenizer_dir_for(init)
            except CheckpointError as e:
                raise UserError(f"--init: {e}") from None
            if (model_dir / "tokenizer.json").exists() and vocab_of(model_dir) != vocab_of(self.tokenizer_dir):
                raise UserError(
                    f"--tokenizer {self.tokenizer_dir} is not the tokenizer {model_dir} was trained with "
                    "(their vocabularies differ); leave --tokenizer out to use the model's own"
                )

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
