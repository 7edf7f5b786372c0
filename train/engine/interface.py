"""The optimizer side of a training step, behind one small interface, so the trainer never knows whether
plain PyTorch (one process, or DDP under torchrun) or a DeepSpeed engine does the work."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from ..errors import UserError
from .optim import OptimConfig


class Engine(Protocol):
    """What the trainer calls; every rank calls every method."""

    module: torch.nn.Module  # what the loss function calls: the model, a DDP wrapper, or the DeepSpeed engine
    skips_nonfinite: bool

    @property
    def lr(self) -> float: ...

    def backward(self, loss: torch.Tensor) -> None:
        """Once per micro-batch."""

    def step(self) -> float:
        """Once per optimizer step; returns the gradient norm before clipping. `skips_nonfinite`: whether a
        non-finite norm leaves the weights untouched (else the trainer stops at once)."""

    def train(self, mode: bool = True) -> None: ...

    def save_state(self, ckpt_dir: Path, client_state: dict, is_main: bool) -> None:
        """Optimizer, schedule and the trainer's own state (client_state) into a checkpoint directory."""

    def load_state(self, ckpt_dir: Path) -> dict:
        """The weights, optimizer and schedule from a checkpoint; returns the client state."""

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on rank 0 (gathered under ZeRO-3 and expert parallelism)."""

    def frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """An inference-only copy of another model beside the trained one (DPO's reference)."""


def make_engine(
    model: torch.nn.Module,
    cfg: OptimConfig,
    device: torch.device,
    deepspeed_config: str | None,
    micro_batch: int,
    expert_parallel_size: int = 1,
) -> Engine:
    """A DeepSpeed engine when a --deepspeed config is given, else the plain PyTorch engine.
    deepspeed is imported only in the first case."""
    if expert_parallel_size > 1 and deepspeed_config:
        raise UserError(
            "--expert-parallel-size runs on the PyTorch engine (torchrun, or the deepspeed launcher "
            "without --deepspeed); under --deepspeed the MoE model's experts are ZeRO-partitioned instead"
        )
    if deepspeed_config:
        from .deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg, device, deepspeed_config, micro_batch)
    from .torch_engine import TorchEngine

    return TorchEngine(model, cfg, device, expert_parallel_size)
