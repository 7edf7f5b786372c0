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

GRPO (Shao et al. 2024, DeepSeekMath) and two variants, `grpo_advantages` and `grpo_loss`. For a group of
G completions of one prompt with rewards r_1..r_G, and per token t of completion i the ratio
rho = exp(logp - old_logp) of the policy to the one that sampled it:
    advantage   A_i = (r_i - mean(r)) / (std(r) + 1e-4)       grpo, dapo (std: the sample std, n - 1)
                A_i =  r_i - mean(r)                           dr_grpo (no division: Liu et al. 2025)
    token loss  l_it = -min(rho * A_i, clip(rho, 1 - eps_low, 1 + eps_high) * A_i)
                       + beta * (exp(ref - logp) - (ref - logp) - 1)      (k3 estimate of KL(pi || ref))
    aggregate   grpo:    mean over completions of (mean over its tokens)
                dapo:    sum over all tokens / number of tokens            (token level; Yu et al. 2025)
                dr_grpo: sum over all tokens / (completions * max_new_tokens)   (a constant length)
DAPO also clips asymmetrically (eps_high > eps_low) and drops the groups whose rewards are all equal
(their advantages are zero: they would only dilute the batch); a dropped completion has `keep` False.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models import IGNORE_INDEX

LOSS_TYPES = ("sigmoid", "ipo")
GRPO_VARIANTS = ("grpo", "dr_grpo", "dapo")


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


def token_logps(module, batch: dict) -> torch.Tensor:
    """log p(target) [B, T] of a batch's rows from the model's fused head (no logits materialised); a
    VLM's images are passed along. DPO's policy and reference and GRPO's three log-probs all come from here."""
    extra = {"pixel_values": batch["pixel_values"]} if "pixel_values" in batch else {}
    return module(batch["input_ids"], targets=batch["targets"], token_logps=True, **extra).logps


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


def grpo_advantages(rewards: torch.Tensor, variant: str) -> torch.Tensor:
    """Advantages [P, G] of rewards [P, G] (one row per prompt's group), normalised within each group."""
    if rewards.shape[-1] < 2:
        raise ValueError("a group needs at least 2 completions")
    centered = rewards - rewards.mean(-1, keepdim=True)
    if variant == "dr_grpo":
        return centered
    return centered / (rewards.std(-1, keepdim=True) + 1e-4)


def grpo_loss(
    logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    variant: str,
    old_logps: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    max_new_tokens: int = 1,
) -> tuple[torch.Tensor, dict]:
    """The loss of one micro-batch of completions (the formulas above) and its statistics.

    logps, old_logps, ref_logps: [N, T] log-probs of each completion token (old: the sampling policy's;
    None when it is this very policy, so the ratio is 1 with its gradient); advantages [N]; mask [N, T]
    True at the completion tokens of kept completions. The mean over a micro-batch (of completions for
    grpo and dr_grpo, of tokens for dapo) is what the trainer's weights (`grpo_weight`) combine into the
    mean over the global batch."""
    if variant not in GRPO_VARIANTS:
        raise ValueError(f"variant must be one of {GRPO_VARIANTS}, got {variant!r}")
    # positions outside the mask (prompt, padding, dropped completions) hold whatever a forward gave there:
    # zeroed first, so not even an infinite value there reaches the loss or its gradient
    off = ~mask.bool()
    logps = logps.masked_fill(off, 0.0)
    old = logps.detach() if old_logps is None else old_logps.masked_fill(off, 0.0)
    ref_logps = None if ref_logps is None else ref_logps.masked_fill(off, 0.0)
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old)
    adv = advantages.to(logps.dtype)[:, None]
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = None
    if ref_logps is not None:  # logged whenever the reference is there; in the loss when beta > 0
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        if beta:
            per_token = per_token + beta * kl
    tokens_per_seq = mask.sum(-1)
    kept = tokens_per_seq > 0
    if variant == "grpo":
        loss = ((per_token * mask).sum(-1) / tokens_per_seq.clamp(min=1)).sum() / kept.sum().clamp(min=1)
    elif variant == "dapo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    else:
        loss = (per_token * mask).sum() / (kept.sum().clamp(min=1) * max_new_tokens)
    with torch.no_grad():
        # statistics averaged the way the micro-batch is weighted (grpo_weight): over tokens for dapo, else
        # over completions (each its token mean), so they combine into the global batch's exactly
        def average(x: torch.Tensor) -> float:
            if variant == "dapo":
                return float((x * mask).sum() / mask.sum().clamp(min=1))
            return float(((x * mask).sum(-1) / tokens_per_seq.clamp(min=1)).sum() / kept.sum().clamp(min=1))

        is_clipped = (clipped < unclipped).to(mask.dtype)  # the clip is the smaller term: no gradient there
        stats = {"clip_fraction": average(is_clipped), "ratio": average(ratio)}
        if kl is not None:
            stats["kl"] = average(kl)
    return loss, stats


def grpo_weight(variant: str, mask: torch.Tensor) -> float:
    """A micro-batch's share of the global mean: its kept completions (grpo, dr_grpo) or tokens (dapo)."""
    if variant == "dapo":
        return float(mask.sum())
    return float((mask.sum(-1) > 0).sum())
