"""What the SFT and DPO stages share: their data options, reading the records and building the rows
(a held-out slice when no --eval-data), and --train (which parts of a VLM learn)."""

from __future__ import annotations

import argparse
import functools

from .data.images import image_inputs
from .errors import UserError


def add_finetune_data_args(p: argparse.ArgumentParser, what: str) -> None:
    d = p.add_argument_group("data")
    d.add_argument("--init", metavar="DIR", help="starting model: our checkpoint or run dir, or a transformers dir")
    d.add_argument("--data", nargs="+", required=True, metavar="FILE", help=f"{what} .jsonl files")
    d.add_argument("--eval-data", nargs="+", metavar="FILE", help="held-out files (default: a slice of --data)")
    d.add_argument("--eval-fraction", type=float, default=0.02, help="records held out when no --eval-data")
    d.add_argument("--tokenizer", metavar="DIR", help="default: the --init checkpoint's tokenizer")
    d.add_argument("--seq-len", type=int, default=512, help="longest row in tokens (see the truncation policy)")
    d.add_argument(
        "--train",
        default="all",
        metavar="PARTS",
        help="VLM: the parts that learn, comma-separated from vision, projector, language "
        "(default all; the alignment stage trains 'projector' or 'vision,projector')",
    )
    d.add_argument(
        "--images-anywhere",
        action="store_true",
        help="VLM data: allow image paths outside the data file's directory (refused by default)",
    )


def split_held_out(records: list, fraction: float) -> tuple[list, list]:
    """The last `fraction` of the records (at least one when there are two or more) are held out."""
    n_eval = max(1, int(len(records) * fraction)) if len(records) > 1 and fraction > 0 else 0
    return records[: len(records) - n_eval], records[len(records) - n_eval :]


def finetune_examples(ns: argparse.Namespace, model, load, build, tokenizer):
    """(train examples, held-out examples, number dropped as too long, image loader) from --data and
    --eval-data (or a held-out slice of --data) with a stage's record loader and example builder: a VLM's
    image placeholders expand to its image tokens and its rows carry their images."""
    image_tokens, loader = image_inputs(model)
    build = functools.partial(build, image_tokens=image_tokens)
    load = functools.partial(load, images_anywhere=ns.images_anywhere)
    records = [r for path in ns.data for r in load(path)]
    if ns.eval_data:
        eval_records = [r for path in ns.eval_data for r in load(path)]
    else:
        records, eval_records = split_held_out(records, ns.eval_fraction if ns.eval_every else 0)
    train_ex, dropped = build(tokenizer, records, ns.seq_len)
    eval_ex, eval_dropped = build(tokenizer, eval_records, ns.seq_len)
    return train_ex, eval_ex, dropped + eval_dropped, loader


VLM_PARTS = {"vision": "vision_tower.", "projector": "multi_modal_projector.", "language": "language_model."}


def freeze_except(model, parts: str) -> int:
    """Train only the named parts of a VLM (--train); returns the number of trainable parameters."""
    if parts == "all":
        return sum(p.numel() for p in model.parameters())
    names = [x.strip() for x in parts.split(",") if x.strip()]
    unknown = [x for x in names if x not in VLM_PARTS]
    if unknown:
        raise UserError(f"--train: unknown part(s) {', '.join(unknown)}; choose from {', '.join(VLM_PARTS)} or 'all'")
    if model.config.model_type != "vlm":
        raise UserError("--train selects parts of a VLM; this model trains whole ('all')")
    prefixes = tuple(VLM_PARTS[x] for x in names)
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
        n += p.numel() if p.requires_grad else 0
    return n
