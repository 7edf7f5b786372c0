"""The stages, one table for the command line (`llm-scratch STAGE ...`) and the demo. Each is a module
with `build_parser(p)` and `run(ns) -> summary`; the training stages also run as `python -m train.STAGE`,
under `torchrun -m` and under `deepspeed --module`, with the same options."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from . import dpo, grpo, pretrain, sft, vlm_init


@dataclass(frozen=True)
class Stage:
    module: ModuleType
    help: str


STAGES: dict[str, Stage] = {
    "pretrain": Stage(pretrain, "pretrain a model on text"),
    "sft": Stage(sft, "supervised fine-tuning on conversations (loss on assistant tokens)"),
    "dpo": Stage(dpo, "direct preference optimization on chosen/rejected pairs"),
    "grpo": Stage(grpo, "reinforcement learning with verifiable rewards (GRPO, Dr. GRPO, DAPO)"),
    "vlm-init": Stage(vlm_init, "a VLM from a dense model and a fresh vision tower"),
}


def run_stage(name: str, argv: list[str]) -> dict:
    """Run a stage exactly as `llm-scratch NAME ARGV...` would; returns its summary."""
    module = STAGES[name].module
    return module.run(module.build_parser().parse_args(argv))
