"""Command-line options shared by the training stages (pretrain, sft, dpo), and the settings they make."""

from __future__ import annotations

import argparse
import math

import kernels

from .engine.ds_config import check_ds_config, load_ds_config
from .engine.optim import OptimConfig
from .engine.trainer import TrainArgs
from .errors import UserError


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=["dense", "moe", "vlm"], default="dense", help="model family")
    g.add_argument("--model-config", metavar="FILE.json", help="a model config file (overrides --preset)")
    g.add_argument("--preset", default="tiny", help="named size when no --model-config (e.g. micro, tiny, small)")


def add_train_args(p: argparse.ArgumentParser, *, steps: int, lr: float, batch_size: int) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, loss.png)")
    g.add_argument("--max-steps", type=int, default=steps, help="optimizer steps the schedule spans")
    g.add_argument("--stop-after", type=int, help="stop (and checkpoint) at this step; --resume continues")
    g.add_argument("--resume", action="store_true", help="continue from OUT's latest checkpoint")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=batch_size, help="rows per micro-batch per rank")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    g.add_argument("--warmup-steps", type=int, default=20)
    g.add_argument(
        "--decay-steps",
        type=int,
        default=0,
        help="warmup-stable-decay: hold --lr after warmup and anneal over only the last N steps (0: cosine "
        "over the whole run)",
    )
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm (0: off)")
    g.add_argument("--eval-every", type=int, default=50, help="held-out evaluation interval (0: off)")
    g.add_argument("--eval-batches", type=int, default=8)
    g.add_argument("--save-every", type=int, default=100)
    g.add_argument("--keep-checkpoints", type=int, default=2)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument(
        "--max-nonfinite-steps",
        type=int,
        default=0,
        help="skip up to this many steps whose loss or gradient is not finite (PyTorch engine); one more "
        "stops the run, without saving",
    )
    g.add_argument(
        "--activation-checkpointing",
        type=int,
        nargs="?",
        const=1,
        default=0,
        metavar="K",
        help="keep no activations inside every K-th decoder layer (default K=1: every layer) and recompute them "
        "in the backward: less memory for one more forward",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile each decoder layer (the first steps pay the compilation)",
    )
    add_kernels_arg(g)
    g = p.add_argument_group("distributed")
    g.add_argument(
        "--deepspeed",
        metavar="CONFIG.json",
        help="train through DeepSpeed with this config (ds_configs/zero{1,2,3}.json, *_offload.json)",
    )
    g.add_argument(
        "--expert-parallel-size",
        type=int,
        default=1,
        metavar="P",
        help="MoE: split the routed experts over groups of P ranks (all-to-all token dispatch)",
    )
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # from launchers


def add_kernels_arg(p) -> None:
    p.add_argument(
        "--kernels",
        choices=kernels.BACKENDS,
        help=f"kernel backend for this run: auto (Triton on CUDA), triton, torch; default: ${kernels.ENV_VAR} or auto",
    )


def train_args_from(ns: argparse.Namespace) -> tuple[TrainArgs, OptimConfig]:
    targs = TrainArgs(
        out=ns.out,
        max_steps=ns.max_steps,
        stop_after=ns.stop_after,
        batch_size=ns.batch_size,
        grad_accum=ns.grad_accum,
        seed=ns.seed,
        eval_every=ns.eval_every,
        eval_batches=ns.eval_batches,
        save_every=ns.save_every,
        keep_checkpoints=ns.keep_checkpoints,
        device=ns.device,
        progress=not ns.no_progress,
        resume=ns.resume,
        deepspeed=ns.deepspeed,
        expert_parallel_size=ns.expert_parallel_size,
        kernels=ns.kernels,
        max_nonfinite_steps=ns.max_nonfinite_steps,
        activation_checkpointing=ns.activation_checkpointing,
        compile=ns.compile,
    )
    optim = OptimConfig(
        lr=ns.lr,
        min_lr_ratio=ns.min_lr_ratio,
        warmup_steps=ns.warmup_steps,
        decay_steps=ns.decay_steps,
        max_steps=ns.max_steps,
        weight_decay=ns.weight_decay,
        grad_clip=ns.grad_clip,
    )
    check_train_options(ns)
    if ns.deepspeed:  # the whole config is checked now, not minutes later when DeepSpeed starts
        check_ds_config(load_ds_config(ns.deepspeed), ns.deepspeed)
    return targs, optim


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_train_options(ns: argparse.Namespace) -> None:
    """Every numeric training option in its range (one error line naming the option)."""
    at_least_one = ("max_steps", "batch_size", "grad_accum", "eval_batches", "save_every", "expert_parallel_size")
    for name in at_least_one:
        if getattr(ns, name) < 1:
            raise UserError(f"{_option(name)} must be at least 1, got {getattr(ns, name)}")
    for name in (
        "warmup_steps",
        "decay_steps",
        "eval_every",
        "keep_checkpoints",
        "max_nonfinite_steps",
        "activation_checkpointing",
    ):
        if getattr(ns, name) < 0:
            raise UserError(f"{_option(name)} must not be negative, got {getattr(ns, name)}")
    if ns.stop_after is not None and ns.stop_after < 1:
        raise UserError(f"--stop-after must be at least 1, got {ns.stop_after}")
    for name in ("lr", "weight_decay", "grad_clip", "min_lr_ratio"):
        v = getattr(ns, name)
        if not math.isfinite(v) or v < 0 or (name == "lr" and v == 0):
            need = "positive" if name == "lr" else "non-negative"
            raise UserError(f"{_option(name)} must be a finite {need} number, got {v}")
    if ns.min_lr_ratio > 1:
        raise UserError(f"--min-lr-ratio is a fraction of --lr, from 0 to 1; got {ns.min_lr_ratio}")
