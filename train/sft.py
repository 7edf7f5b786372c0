"""Supervised fine-tuning on conversations, with the loss on assistant tokens only.

    llm-scratch sft --init RUN_OR_CHECKPOINT_OR_HF_DIR --data sft.jsonl --out DIR [--pack]
    python -m train.sft ... ; deepspeed --module train.sft --deepspeed ds_configs/zero2.json ...

See train/data/chat_masks.py for the loss mask and train/data/finetune.py for the truncation policy.
"""

from __future__ import annotations

import argparse

from models.chat_format import PAD

from .args import add_train_args, train_args_from
from .data.finetune import PACKING, PackedSFTDataset, SFTDataset, build_sft_examples, pad_collate, trained_tokens
from .data.formats import load_sft
from .engine.trainer import Trainer
from .errors import run_guarded
from .finetune import add_finetune_data_args, finetune_examples, freeze_except
from .losses import lm_loss
from .run_dir import RunDir, check_context


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(
        prog="python -m train.sft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_finetune_data_args(p, "SFT ({'messages': [...]})")
    p.add_argument("--pack", action="store_true", help="pack several conversations per row (kept apart by masks)")
    p.add_argument(
        "--pack-strategy",
        choices=sorted(PACKING),
        default="next-fit",
        help="how --pack plans its rows: next-fit (corpus order, a new row when the next conversation does not "
        "fit) or best-fit (longest first, each into the fullest row it fits: fuller rows)",
    )
    add_train_args(p, steps=500, lr=1e-3, batch_size=16)
    return p


def run(ns: argparse.Namespace) -> dict:
    targs, optim = train_args_from(ns)
    with RunDir(ns.out, ns.resume, ns.tokenizer, ns.init) as run_dir:
        return _train(ns, targs, optim, run_dir)


def _train(ns: argparse.Namespace, targs, optim, run_dir: RunDir) -> dict:
    tok = run_dir.tokenizer
    model = run_dir.starting_model(ns.seed)
    check_context(ns.seq_len, model.config)
    trainable = freeze_except(model, ns.train)
    train_ex, eval_ex, dropped, loader = finetune_examples(ns, model, load_sft, build_sft_examples, tok, "sft", run_dir)
    pad = tok.convert_tokens_to_ids(PAD)
    if ns.pack:
        make = lambda ex: PackedSFTDataset(ex, ns.seq_len, pad, loader, ns.pack_strategy)  # noqa: E731
    else:
        make = lambda ex: SFTDataset(ex, loader)  # noqa: E731
    train_set, eval_set = make(train_ex), (make(eval_ex) if eval_ex else None)
    info = {
        "stage": "sft",
        "init": ns.init,
        "trainable_parameters": trainable,
        "train": ns.train,
        "conversations": len(train_ex),
        "dropped_too_long": dropped,
        "rows": len(train_set),
        "pack_strategy": ns.pack_strategy if ns.pack else None,
        "trained_tokens": trained_tokens(train_ex),
    }
    trainer = Trainer(
        model,
        train_set,
        lm_loss,
        targs,
        optim,
        eval_set=eval_set,
        collate_fn=pad_collate(pad),
        tokenizer_dir=run_dir.tokenizer_dir,
        run_config={"run": info},
        title="sft",
    )
    if trainer.is_main:
        print(
            f"sft: {len(train_ex)} conversations ({info['trained_tokens']:,} assistant tokens) in "
            f"{len(train_set)} rows, {len(eval_ex)} held out; {info['dropped_too_long']} dropped as longer "
            f"than --seq-len {ns.seq_len}; device {trainer.device}, out {ns.out}",
            flush=True,
        )
    return trainer.fit()


def main(argv: list[str] | None = None) -> dict:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    run_guarded(main)
