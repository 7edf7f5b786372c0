"""Pretraining: next-token prediction on packed documents.

llm-scratch pretrain --data FILE... --tokenizer DIR --out DIR [--preset tiny | --model-config F]
python -m train.pretrain ...   (the same options)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from models import ConfigError, build_model, load_config, make_config
from models.chat_format import ENDOFTEXT
from models.checkpoint import CONFIG_FILE

from .args import add_model_args, add_train_args, train_args_from
from .data.corpus import eval_rows, open_stores, pretrain_rows
from .data.prepare import parse_mixture
from .data.store import TokenStore, is_store
from .data.tokenizer import special_token_ids
from .engine.trainer import Trainer
from .errors import UserError, run_guarded
from .losses import lm_loss
from .run_dir import RunDir, check_context


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(
        prog="python -m train.pretrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = p.add_argument_group("data")
    d.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="PATH",
        help="token stores (llm-scratch prepare; STORE:WEIGHT mixes them) or raw files, prepared into OUT/data",
    )
    d.add_argument("--eval-data", nargs="+", metavar="PATH", help="held-out files or store (default: the last rows)")
    d.add_argument(
        "--eval-fraction", type=float, help="rows held out when no --eval-data (default: the store's, else 0.02)"
    )
    d.add_argument("--workers", type=int, help="processes that tokenize raw --data (default: one per core from 32 MB)")
    d.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="tokenizer directory, this project's or another model's (default: the store's; on --resume the run's)",
    )
    d.add_argument("--seq-len", type=int, default=256, help="tokens per training row")
    d.add_argument(
        "--no-document-mask", action="store_true", help="let packed documents attend to each other (plain causal rows)"
    )
    add_model_args(p)
    add_train_args(p, steps=1000, lr=3e-3, batch_size=16)
    return p


def round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def model_config_for(ns: argparse.Namespace, vocab: int, resume_ckpt: Path | None):
    """The run's model config: from the checkpoint on resume, else the file, else the preset."""
    if ns.model not in ("dense", "moe"):
        raise UserError(f"--model {ns.model}: pretraining takes 'dense' or 'moe' (the VLM starts from a dense model)")
    try:
        if resume_ckpt is not None:
            config = load_config(resume_ckpt / CONFIG_FILE)
        elif ns.model_config:
            config = load_config(ns.model_config)
        else:
            config = make_config(ns.model, ns.preset, vocab_size=round_up(vocab, 64))
    except ConfigError as e:
        raise UserError(str(e)) from None
    if config.model_type != ns.model:
        raise UserError(f"--model {ns.model} but the model config is a {config.model_type!r} config")
    if vocab > config.vocab_size:
        raise UserError(
            f"the tokenizer has {vocab} tokens but the model's vocab_size is {config.vocab_size}; "
            "use a matching tokenizer or a larger vocab_size"
        )
    check_context(ns.seq_len, config)
    return config


def main(argv: list[str] | None = None) -> dict:
    ns = build_parser().parse_args(argv)
    return run(ns)


def run(ns: argparse.Namespace) -> dict:
    targs, optim = train_args_from(ns)
    stores = [p for p, _ in parse_mixture(ns.data) if is_store(p)]
    default_tok = TokenStore(stores[0]).tokenizer_dir if stores else None
    with RunDir(ns.out, ns.resume, ns.tokenizer, init=None, default_tokenizer=default_tok) as run_dir:
        return _train(ns, targs, optim, run_dir)


def _train(ns: argparse.Namespace, targs, optim, run_dir: RunDir) -> dict:
    out, resume_ckpt, tok_dir, tokenizer = run_dir.out, run_dir.resume_ckpt, run_dir.tokenizer_dir, run_dir.tokenizer
    eot = special_token_ids(tokenizer)[ENDOFTEXT]
    config = model_config_for(ns, len(tokenizer), resume_ckpt)

    doc_mask = not ns.no_document_mask
    stores = open_stores(ns.data, tok_dir, out / "data", ns.workers, targs.progress)
    if ns.eval_data:
        train_set, _ = pretrain_rows(stores, ns.seq_len, eot, doc_mask, 0.0, 0)
        eval_stores = open_stores(ns.eval_data, tok_dir, out / "eval-data", ns.workers, targs.progress)
        eval_set = eval_rows(eval_stores, ns.seq_len, eot, doc_mask)
    else:
        train_set, eval_set = pretrain_rows(stores, ns.seq_len, eot, doc_mask, ns.eval_fraction, ns.eval_every)
    torch.manual_seed(ns.seed)  # the same initial weights on every rank and every run with this seed
    model = build_model(config)
    info = {
        "stage": "pretrain",
        "model_type": config.model_type,
        "parameters": model.num_parameters(),
        "train_tokens": int(len(train_set) * ns.seq_len),
        "data": [str(p) for p in ns.data],
    }
    trainer = Trainer(
        model,
        train_set,
        lm_loss,
        targs,
        optim,
        eval_set=eval_set,
        tokenizer_dir=tok_dir,
        run_config={"run": info},
        title="pretrain",
    )
    if trainer.is_main:
        print(
            f"pretrain: {info['parameters'] / 1e6:.2f}M parameters, {info['train_tokens']:,} training tokens "
            f"in {len(train_set)} rows of {ns.seq_len}, device {trainer.device}, out {out}",
            flush=True,
        )
    return trainer.fit()


if __name__ == "__main__":
    run_guarded(main)
