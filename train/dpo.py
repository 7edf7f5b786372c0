"""Direct preference optimization with a hand-written loss (train/losses.py).

    llm-scratch dpo --init SFT_RUN --data dpo.jsonl --out DIR [--beta 0.1] [--loss sigmoid|ipo]
    python -m train.dpo ... ; deepspeed --module train.dpo --deepspeed ds_configs/zero3.json ...

The reference model is the starting policy, frozen. Two ways to use it, with the same loss:
- `--reference precompute` (default): before training, one pass of the starting policy over every
  pair stores the reference log-probs (OUT/reference_logps.pt, reused on --resume); no second model
  is kept in memory.
- `--reference model`: a frozen copy computes them batch by batch (under ZeRO-3 the copy is a
  partitioned inference engine, so no rank holds all of it).
`--sft-weight ALPHA` adds ALPHA times the chosen completions' per-token negative log-likelihood
(RPO, Pang et al. 2024): plain DPO can lower the likelihood of the chosen answers too ("likelihood
displacement"), which on the synthetic arithmetic pairs destroys the SFT model's accuracy.
"""

from __future__ import annotations

import argparse
import copy

import torch

from models import IGNORE_INDEX
from models.chat_format import PAD
from models.checkpoint import atomic_write

from .args import add_train_args, train_args_from
from .data.finetune import DPODataset, build_dpo_examples, dpo_collate
from .data.formats import load_dpo
from .engine.trainer import Trainer
from .errors import UserError, run_guarded
from .finetune import add_finetune_data_args, finetune_examples, freeze_except
from .losses import LOSS_TYPES, chosen_nll, dpo_loss, sequence_logps, token_logps
from .run_dir import RunDir, check_context

REF_FILE = "reference_logps.pt"


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(
        prog="python -m train.dpo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_finetune_data_args(p, "DPO ({'prompt', 'chosen', 'rejected'})")
    g = p.add_argument_group("DPO")
    g.add_argument("--beta", type=float, default=0.1)
    g.add_argument("--loss", choices=LOSS_TYPES, default="sigmoid")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="conservative DPO epsilon (sigmoid loss)")
    g.add_argument("--average-logps", action="store_true", help="length-average the log-probs instead of summing")
    g.add_argument("--reference", choices=["precompute", "model"], default="precompute")
    g.add_argument(
        "--sft-weight",
        type=float,
        default=0.0,
        help="add this times the chosen completions' per-token NLL (RPO), which keeps DPO from "
        "lowering the likelihood of the correct answers",
    )
    add_train_args(p, steps=200, lr=5e-5, batch_size=16)
    p.set_defaults(warmup_steps=10, weight_decay=0.0)
    return p


def pair_logps(module, batch: dict, average: bool) -> torch.Tensor:
    """[pairs, 2] log-probs of (chosen, rejected) completions."""
    logps = sequence_logps(token_logps(module, batch), batch["targets"], average)
    half = logps.shape[0] // 2
    return torch.stack([logps[:half], logps[half:]], dim=1)


class DPOObjective:
    """The trainer's loss function for DPO: policy log-probs against the reference's."""

    def __init__(
        self,
        beta: float,
        loss_type: str,
        label_smoothing: float,
        average: bool,
        reference=None,
        sft_weight: float = 0.0,
    ):
        if sft_weight < 0:
            raise UserError(f"--sft-weight must be >= 0, got {sft_weight}")
        if not 0 <= label_smoothing < 0.5:
            raise UserError(f"--label-smoothing must be in [0, 0.5), got {label_smoothing}")
        if beta <= 0:
            raise UserError(f"--beta must be positive, got {beta}")
        self.beta, self.loss_type, self.eps, self.average = beta, loss_type, label_smoothing, average
        self.reference, self.sft_weight = reference, sft_weight

    def __call__(self, module, batch: dict):
        pi = pair_logps(module, batch, self.average)
        if "ref_logps" in batch:
            ref = batch["ref_logps"].to(pi.dtype)
        else:
            with torch.no_grad():
                ref = pair_logps(self.reference, batch, self.average)
        loss, stats = dpo_loss(pi[:, 0], pi[:, 1], ref[:, 0], ref[:, 1], self.beta, self.loss_type, self.eps)
        if self.sft_weight:
            half = batch["targets"].shape[0] // 2
            n_chosen = (batch["targets"][:half] != IGNORE_INDEX).sum(-1).clamp(min=1)
            summed = pi[:, 0] * n_chosen if self.average else pi[:, 0]
            nll = chosen_nll(summed, n_chosen)
            loss = loss + self.sft_weight * nll
            stats["chosen_nll"] = nll.item()
        return loss, stats


def run(ns: argparse.Namespace) -> dict:
    targs, optim = train_args_from(ns)
    with RunDir(ns.out, ns.resume, ns.tokenizer, ns.init) as run_dir:
        return _train(ns, targs, optim, run_dir)


def _train(ns: argparse.Namespace, targs, optim, run_dir: RunDir) -> dict:
    tok = run_dir.tokenizer
    model = run_dir.starting_model(ns.seed)
    check_context(ns.seq_len, model.config)
    trainable = freeze_except(model, ns.train)
    train_ex, eval_ex, dropped, loader = finetune_examples(ns, model, load_dpo, build_dpo_examples, tok, "dpo", run_dir)
    train_set = DPODataset(train_ex, loader)
    eval_set = DPODataset(eval_ex, loader) if eval_ex else None
    reference_copy = copy.deepcopy(model) if ns.reference == "model" and run_dir.resume_ckpt is None else None
    if ns.reference == "model" and run_dir.resume_ckpt is not None:
        raise UserError("--resume with --reference model: the starting policy is gone; use --reference precompute")
    objective = DPOObjective(ns.beta, ns.loss, ns.label_smoothing, ns.average_logps, sft_weight=ns.sft_weight)
    info = {
        "stage": "dpo",
        "init": ns.init,
        "trainable_parameters": trainable,
        "train": ns.train,
        "pairs": len(train_ex),
        "held_out_pairs": len(eval_ex),
        "dropped_too_long": dropped,
        "beta": ns.beta,
        "loss": ns.loss,
        "reference": ns.reference,
    }
    trainer = Trainer(
        model,
        train_set,
        objective,
        targs,
        optim,
        eval_set=eval_set,
        collate_fn=dpo_collate(tok.convert_tokens_to_ids(PAD)),
        weight_fn=lambda batch: float(len(batch["index"])),  # the loss is a mean over pairs
        tokenizer_dir=run_dir.tokenizer_dir,
        run_config={"run": info},
        title="dpo",
    )
    if ns.reference == "model":
        objective.reference = trainer.engine.frozen(reference_copy)
    else:
        _attach_reference_logps(trainer, run_dir, train_set, eval_set, ns.average_logps)
    if trainer.is_main:
        print(
            f"dpo: {len(train_ex)} pairs, {len(eval_ex)} held out, {info['dropped_too_long']} dropped as longer "
            f"than --seq-len {ns.seq_len}; beta {ns.beta}, {ns.loss} loss, reference by {ns.reference}; "
            f"device {trainer.device}, out {ns.out}",
            flush=True,
        )
    return trainer.fit()


def _attach_reference_logps(trainer: Trainer, run_dir: RunDir, train_set, eval_set, average: bool) -> None:
    """Reference log-probs from the starting policy, computed once and stored in the run directory."""
    path = run_dir.out / REF_FILE
    if run_dir.resume_ckpt is not None:
        if not path.exists():
            raise UserError(
                f"--resume: {path} is missing; the reference log-probs cannot be recomputed from a trained policy"
            )
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            assert isinstance(saved, dict) and isinstance(saved.get("train"), torch.Tensor)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same one-line error
            raise UserError(f"{path}: not a readable reference log-prob file ({type(e).__name__})") from None
    else:
        fn = lambda module, batch: pair_logps(module, batch, average)
        saved = {"train": torch.from_numpy(trainer.map_rows(train_set, fn, 2)), "fingerprint": {}}
        if eval_set is not None:
            saved["eval"] = torch.from_numpy(trainer.map_rows(eval_set, fn, 2))
        saved["fingerprint"] = {
            name: ds.fingerprint() for name, ds in (("train", train_set), ("eval", eval_set)) if ds is not None
        }
        if trainer.is_main:
            run_dir.out.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: torch.save(saved, tmp))
    for name, ds in (("train", train_set), ("eval", eval_set)):
        if ds is None:
            continue
        stored_for = saved.get("fingerprint", {}).get(name, ds.fingerprint())  # older files: by size alone
        if name not in saved or len(saved[name]) != len(ds) or stored_for != ds.fingerprint():
            raise UserError(f"{path}: stored for other data ({name} split); resume with the same data")
        ds.ref = saved[name].numpy()


def main(argv: list[str] | None = None) -> dict:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    run_guarded(main)
