"""What both engines share: the optimizer settings, the parameter groups (no weight decay on norms,
biases and embeddings), and the learning-rate schedule (linear warmup, then cosine; or warmup, a constant
rate, and a cosine over the last `decay_steps` only: warmup-stable-decay)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    decay_steps: int = 0  # > 0: hold lr after warmup, cosine over the last decay_steps (WSD); 0: cosine throughout
    max_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    grad_accum: int = 1


def lr_factor(step: int, cfg: OptimConfig) -> float:
    """Linear warmup to 1, then cosine down to min_lr_ratio at max_steps (constant after). With decay_steps,
    the rate stays at 1 until max_steps - decay_steps and the cosine spans only those last steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    start = max(cfg.warmup_steps, cfg.max_steps - cfg.decay_steps) if cfg.decay_steps else cfg.warmup_steps
    span = max(1, cfg.max_steps - start)
    progress = min(1.0, max(0.0, (step - start) / span))
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
