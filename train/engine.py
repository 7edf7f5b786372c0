"""The optimizer side of a training step, behind one small interface so the trainer never knows
whether plain PyTorch (one process, or DDP under torchrun) or a DeepSpeed engine does the work.

An engine offers:
- `module`: what the loss function calls (the model, a DDP wrapper, or the DeepSpeed engine);
- `backward(loss)` once per micro-batch and `step() -> grad norm` once per optimizer step;
- `lr`;
- `save_state(dir, client_state)` / `load_state(dir) -> client_state`: optimizer, schedule and the
  trainer's own state (every rank calls them);
- `full_state_dict()`: the whole model's weights on rank 0 (gathered under ZeRO-3), for our
  safetensors checkpoint and export.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from models.io import load_state_strict, read_weights

from .distributed import dist_info, init_process_group
from .errors import UserError

STATE_FILE = "trainer_state.pt"


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    max_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    grad_accum: int = 1


def lr_factor(step: int, cfg: OptimConfig) -> float:
    """Linear warmup to 1, then cosine down to min_lr_ratio at max_steps (constant after)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on norms, biases or embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embed" in name or "norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def schedule(cfg: OptimConfig):
    """The LR schedule as a factory for any optimizer (ours or DeepSpeed's)."""
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))


class TorchEngine:
    """AdamW + warmup/cosine + global-norm clipping; DistributedDataParallel when launched with
    several processes (torchrun or the deepspeed launcher without --deepspeed)."""

    def __init__(self, model: torch.nn.Module, cfg: OptimConfig, device: torch.device):
        self.model, self.cfg = model, cfg
        self.module = model
        if dist_info()[2] > 1:
            init_process_group(device)
            ids = [device.index] if device.type == "cuda" else None
            self.module = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        fused = all(p.is_cuda for p in model.parameters())
        self.optimizer = torch.optim.AdamW(
            param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
            fused=fused or None,
        )
        self.scheduler = schedule(cfg)(self.optimizer)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.cfg.grad_accum).backward()

    def step(self) -> float:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def save_state(self, ckpt_dir: Path, client_state: dict, is_main: bool) -> None:
        if is_main:  # every rank holds the same optimizer state under DDP
            state = {**client_state, "engine": {"optimizer": self.optimizer.state_dict(),
                                                "scheduler": self.scheduler.state_dict()}}
            torch.save(state, ckpt_dir / STATE_FILE)

    def load_state(self, ckpt_dir: Path) -> dict:
        load_state_strict(self.model, read_weights(ckpt_dir / "model.safetensors"), str(ckpt_dir))
        try:
            state = torch.load(ckpt_dir / STATE_FILE, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise UserError(f"{ckpt_dir}: no {STATE_FILE} (was this run trained with --deepspeed?)") from None
        except Exception as e:  # noqa: BLE001 - any unreadable state file is the same user-facing error
            raise UserError(f"{ckpt_dir / STATE_FILE}: cannot read the trainer state ({e})") from None
        self.optimizer.load_state_dict(state["engine"]["optimizer"])
        self.scheduler.load_state_dict(state["engine"]["scheduler"])
        return state

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """An inference-only copy living beside the trained model (DPO's reference)."""
        return model.to(next(self.model.parameters()).device).eval().requires_grad_(False)


def make_engine(model: torch.nn.Module, cfg: OptimConfig, device: torch.device, deepspeed_config: str | None,
                micro_batch: int):
    """A DeepSpeed engine when a --deepspeed config is given, else the plain PyTorch engine.
    deepspeed is imported only in the first case."""
    if deepspeed_config:
        from .ds_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg, device, deepspeed_config, micro_batch)
    return TorchEngine(model, cfg, device)
