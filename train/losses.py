"""Losses of the training stages, written out here (no library loss is imported).

- `lm_loss`: next-token cross-entropy over the target tokens (pretraining, SFT).
- `sequence_logps`: per-sequence log-probability of the target tokens, summed or length-averaged, from
  the per-token log-probs the model's fused head gives (`token_logps=True`: no logits materialised).
- `dpo_loss`: sigmoid DPO with conservative label smoothing, and IPO; `chosen_nll`: the optional
  RPO term (per-token NLL of the chosen completion) that DPO can add.

DPO (Rafailov et al. 2023, Eq. 7). With policy log-probs pi_c, pi_r and reference log-probs ref_c,
ref_r of the chosen and rejected completions, d = (pi_c - ref_c) - (pi_r - ref_r):
    sigmoid:  -(1 - eps) * log sigmoid(beta * d) - eps * log sigmoid(-beta * d)   (eps = label smoothing;
              eps = 0 is plain DPO, eps > 0 the conservative cDPO of Mitchell 2023)
    ipo:      (d - 1 / (2 * beta))^2                                             (Azar et al. 2023)
Rewards are beta * (pi - ref); the margin is their difference; accuracy is the share of pairs whose
chosen reward exceeds the rejected one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models import IGNORE_INDEX

LOSS_TYPES = ("sigmoid", "ipo")


def lm_loss(model, batch: dict) -> tuple[torch.Tensor, dict]:
    """The model's own training loss (cross-entropy, plus the MoE model's balance and MTP terms, whose
    values come back as statistics for the log)."""
    inputs = {
        k: v for k, v in batch.items() if k in ("input_ids", "targets", "segment_ids", "position_ids", "pixel_values")
    }
    out = model(**inputs)
    return out.loss, aux_stats(out)


def aux_stats(out) -> dict[str, float]:
    return {k: float(v) for k, v in (out.aux or {}).items()}


def sequence_logps(token_logps: torch.Tensor, targets: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sum (or mean) over each row of log p(target) [B, T] at the positions whose target is not ignored."""
    mask = targets != IGNORE_INDEX
    total = (token_logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def chosen_nll(summed_logps: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of the chosen completion's per-token negative log-likelihood (the RPO term)."""
    return (-summed_logps / n_tokens).mean()


def dpo_loss(
    pi_c: torch.Tensor,
    pi_r: torch.Tensor,
    ref_c: torch.Tensor,
    ref_r: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """Mean loss over the pairs, and the statistics the trainer logs."""
    d = (pi_c - ref_c) - (pi_r - ref_r)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * d) - label_smoothing * F.logsigmoid(-beta * d)
    elif loss_type == "ipo":
        losses = (d - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    chosen_reward = beta * (pi_c - ref_c).detach()
    rejected_reward = beta * (pi_r - ref_r).detach()
    stats = {
        "reward_chosen": chosen_reward.mean().item(),
        "reward_rejected": rejected_reward.mean().item(),
        "margin": (chosen_reward - rejected_reward).mean().item(),
        "accuracy": (chosen_reward > rejected_reward).float().mean().item(),
        "prefers_chosen": (pi_c > pi_r).float().mean().item(),  # the policy's own preference
        "logp_chosen": pi_c.detach().mean().item(),
        "logp_rejected": pi_r.detach().mean().item(),
    }
    return losses.mean(), stats
