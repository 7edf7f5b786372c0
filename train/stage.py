"""What the training stages share: the run directory rules, the tokenizer, the starting model, and
the held-out split."""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch

from models import CheckpointError, build_model, load_config, load_pretrained

from .checkpoint import latest_checkpoint
from .errors import UserError
from .sampling import check_vocab, tokenizer_dir_for
from .tokenizer import load_tokenizer


def add_finetune_data_args(p: argparse.ArgumentParser, what: str) -> None:
    d = p.add_argument_group("data")
    d.add_argument("--init", metavar="DIR", help="starting model: our checkpoint or run dir, or a transformers dir")
    d.add_argument("--data", nargs="+", required=True, metavar="FILE", help=f"{what} .jsonl files")
    d.add_argument("--eval-data", nargs="+", metavar="FILE", help="held-out files (default: a slice of --data)")
    d.add_argument("--eval-fraction", type=float, default=0.02, help="records held out when no --eval-data")
    d.add_argument("--tokenizer", metavar="DIR", help="default: the --init checkpoint's tokenizer")
    d.add_argument("--seq-len", type=int, default=512, help="longest row in tokens (see the truncation policy)")
    d.add_argument("--kernels", choices=["auto", "triton", "torch"], help="kernel backend for this run")
    d.add_argument("--train", default="all", metavar="PARTS",
                   help="VLM: the parts that learn, comma-separated from vision, projector, language "
                        "(default all; the alignment stage trains 'projector' or 'vision,projector')")


class Run:
    """The run directory, the checkpoint to resume from, and the tokenizer."""

    def __init__(self, out: str, resume: bool, tokenizer: str | None, init: str | None):
        self.out = Path(out)
        self.resume_ckpt = latest_checkpoint(self.out) if resume else None
        if resume and self.resume_ckpt is None:
            raise UserError(f"--resume: no checkpoint in {self.out}")
        if not resume and (self.out / "latest").exists():
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

    def starting_model(self, seed: int, kernels: str | None) -> torch.nn.Module:
        """On resume: the architecture of the checkpoint (its weights are loaded by the trainer);
        otherwise the --init model with its weights."""
        torch.manual_seed(seed)
        if self.resume_ckpt is not None:
            model = build_model(load_config(self.resume_ckpt / "model_config.json"))
        elif self.init:
            try:
                model = load_pretrained(self.init)
            except CheckpointError as e:
                raise UserError(f"--init: {e}") from None
        else:
            raise UserError("--init DIR is required: the model this stage starts from")
        if kernels:
            model.config.kernel_backend = kernels
        check_vocab(self.tokenizer, model, self.init or self.resume_ckpt)
        return model


def load_examples(ns: argparse.Namespace, load, build, tokenizer) -> tuple[list, list, int]:
    """(train examples, held-out examples, number dropped as too long) from --data and --eval-data
    (or a held-out slice of --data) with a stage's record loader and example builder."""
    records = [r for path in ns.data for r in load(path)]
    if ns.eval_data:
        eval_records = [r for path in ns.eval_data for r in load(path)]
    else:
        records, eval_records = split_held_out(records, ns.eval_fraction if ns.eval_every else 0)
    train_ex, dropped = build(tokenizer, records, ns.seq_len)
    eval_ex, eval_dropped = build(tokenizer, eval_records, ns.seq_len)
    return train_ex, eval_ex, dropped + eval_dropped


def fit_and_summarize(trainer, info: dict) -> dict:
    """Train, then write OUT/summary.json (rank 0) with the run's figures and the stage's info."""
    summary = {**trainer.fit(), **info}
    if trainer.is_main:
        (trainer.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def split_held_out(records: list, fraction: float) -> tuple[list, list]:
    """The last `fraction` of the records (at least one when there are two or more) are held out."""
    n_eval = max(1, int(len(records) * fraction)) if len(records) > 1 and fraction > 0 else 0
    return records[: len(records) - n_eval], records[len(records) - n_eval:]


def vision_inputs(model) -> tuple[int, object]:
    """(image tokens per image, an image loader) for a VLM; (0, None) for a text model."""
    config = model.config
    if getattr(config, "model_type", None) != "vlm":
        return 0, None
    from .images import ImageLoader

    return config.image_tokens, ImageLoader(config)


VLM_PARTS = {"vision": "vision_tower.", "projector": "multi_modal_projector.", "language": "language_model."}


def freeze_except(model, parts: str) -> int:
    """Train only the named parts of a VLM (--train); returns the number of trainable parameters."""
    if parts == "all":
        return sum(p.numel() for p in model.parameters())
    names = [x.strip() for x in parts.split(",") if x.strip()]
    unknown = [x for x in names if x not in VLM_PARTS]
    if unknown:
        raise UserError(f"--train: unknown part(s) {', '.join(unknown)}; choose from {', '.join(VLM_PARTS)} or 'all'")
    if getattr(model.config, "model_type", None) != "vlm":
        raise UserError("--train selects parts of a VLM; this model trains whole ('all')")
    prefixes = tuple(VLM_PARTS[x] for x in names)
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
        n += p.numel() if p.requires_grad else 0
    return n


def finetune_examples(ns: argparse.Namespace, model, load, build, tokenizer):
    """(train examples, held-out examples, number dropped, image loader) for SFT or DPO: a VLM's image
    placeholders expand to its image tokens and its rows carry their images."""
    image_tokens, loader = vision_inputs(model)
    build = functools.partial(build, image_tokens=image_tokens)
    return (*load_examples(ns, load, build, tokenizer), loader)
