"""What the SFT and DPO stages share: their data options, reading the records and building the rows
(a held-out slice when no --eval-data), and --train (which parts of a VLM learn)."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from .data.images import image_inputs
from .errors import UserError


def add_finetune_data_args(p: argparse.ArgumentParser, what: str) -> None:
    d = p.add_argument_group("data")
    add_start_args(d)
    d.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="PATH",
        help=f"{what} .jsonl/.jsonl.gz/.parquet files, or a store of them (llm-scratch prepare --kind)",
    )
    d.add_argument(
        "--eval-data", nargs="+", metavar="PATH", help="held-out files or store (default: a slice of --data)"
    )
    d.add_argument("--workers", type=int, help="processes that tokenize the data (default: one per core from 32 MB)")
    d.add_argument("--eval-fraction", type=float, default=0.02, help="records held out when no --eval-data")
    d.add_argument("--seq-len", type=int, default=512, help="longest row in tokens (see the truncation policy)")
    add_vlm_data_args(d)


def add_start_args(d) -> None:
    """The starting model and its tokenizer (every stage that fine-tunes a model)."""
    d.add_argument("--init", metavar="DIR", help="starting model: our checkpoint or run dir, or a transformers dir")
    d.add_argument("--tokenizer", metavar="DIR", help="default: the --init checkpoint's tokenizer")


def add_vlm_data_args(d) -> None:
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
    n_eval = held_out_count(len(records), fraction)
    return records[: len(records) - n_eval], records[len(records) - n_eval :]


def stored_examples(ns: argparse.Namespace, kind: str, run_dir):
    """(train examples, held-out examples, number dropped) read from stores of the stage's kind."""
    from .data.finetune_store import StoredDPOExamples, StoredSFTExamples

    examples = StoredSFTExamples if kind == "sft" else StoredDPOExamples
    progress = not ns.no_progress
    store = open_store(ns.data, kind, run_dir.tokenizer_dir, run_dir.out / "data", ns.workers, progress)
    if ns.eval_data:
        held = open_store(ns.eval_data, kind, run_dir.tokenizer_dir, run_dir.out / "eval-data", ns.workers, progress)
        train, evals = examples(store, ns.seq_len), examples(held, ns.seq_len)
    elif store.eval_store() is not None:
        train, evals = examples(store, ns.seq_len), examples(store.eval_store(), ns.seq_len)
    else:
        n = store.num_docs if kind == "sft" else store.num_docs // 3
        n_eval = held_out_count(n, ns.eval_fraction if ns.eval_every else 0)
        train, evals = examples(store, ns.seq_len, 0, n - n_eval), examples(store, ns.seq_len, n - n_eval, n)
    return train, evals, train.dropped + evals.dropped


def open_store(specs: list[str], kind: str, tokenizer_dir, prepared_dir, workers, progress: bool):
    """--data as one store of `kind`: a store given as it is, or the files prepared into the run."""
    from .data.corpus import check_tokenizer, ensure_prepared
    from .data.store import TokenStore, is_store

    paths = [Path(p) for p in specs]
    if any(is_store(p) for p in paths):
        if len(paths) > 1:
            raise UserError(f"--data: give one {kind.upper()} store, or data files")
        store = TokenStore(paths[0])
    else:
        store = TokenStore(ensure_prepared(paths, tokenizer_dir, prepared_dir, workers, progress, kind))
    if store.kind != kind:
        raise UserError(
            f"{store.path} is a {store.kind} store; this stage reads a {kind} store (prepare --kind {kind})"
        )
    check_tokenizer(store, tokenizer_dir)
    return store


def held_out_count(n: int, fraction: float) -> int:
    """The last `fraction` of n records (at least one when there are two or more) are held out."""
    return max(1, int(n * fraction)) if n > 1 and fraction > 0 else 0


def finetune_examples(ns: argparse.Namespace, model, load, build, tokenizer, kind: str, run_dir):
    """(train examples, held-out examples, number dropped as too long, image loader) from --data and
    --eval-data (or a held-out slice of --data). A language model's data is prepared into a store (in the
    run directory, unless --data is one) and read from it (train/data/finetune_store.py); a VLM's records
    are read in memory with a stage's record loader and example builder: its image placeholders expand to
    its image tokens and its rows carry their images."""
    image_tokens, loader = image_inputs(model)
    if not image_tokens:
        return (*stored_examples(ns, kind, run_dir), None)
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
