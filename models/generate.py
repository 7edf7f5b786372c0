"""Autoregressive generation with a KV cache: greedy or sampled (temperature, top-k, top-p),
repetition penalty, batched left-padded prompts, stop tokens, and a streaming callback.

Sampling draws from one torch.Generator for the whole batch, or, given `uniforms` [B, steps], by
inverting each row's cumulative distribution at its own uniform number: a row's sample then depends
only on its prompt, its numbers and the model, not on which other rows share the batch (the RL stage
uses this so that a prompt's samples are the same on one rank or many)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch


def _filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token once the mass before it already reaches top_p (the first token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def _penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style repetition penalty (as transformers applies it): for tokens already in the context,
    positive logits are divided by the penalty and negative ones multiplied by it."""
    scores = logits.gather(-1, seen)
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits.scatter(-1, seen, scores)


def pick_next(
    logits: torch.Tensor,
    context: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
    uniform: torch.Tensor | None = None,
) -> torch.Tensor:
    """The next token [B] from the last position's logits [B, V]: greedy at temperature 0, else sampled
    after the repetition penalty (over `context` [B, T], the ids so far), top-k and top-p; with `uniform`
    [B] in [0, 1), row i takes the first token whose cumulative probability exceeds uniform[i]."""
    logits = logits.float()
    if repetition_penalty != 1.0:
        logits = _penalize_repeats(logits, context, repetition_penalty)
    if temperature > 0:
        probs = _filter_logits(logits / temperature, top_k, top_p).softmax(-1)
        if uniform is None:
            return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        cdf = probs.cumsum(-1)
        u = uniform.to(cdf)[:, None] * cdf[:, -1:]
        return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)
    return logits.argmax(-1)


def without_image_token(model, logits: torch.Tensor) -> torch.Tensor:
    """A VLM's logits [..., V] with its image placeholder made impossible: a generated <|image|> has no
    image to fill it (the next forward would refuse it). Other models' logits are returned as they are."""
    image_id = getattr(model.config, "image_token_id", None)
    if image_id is None:
        return logits
    out = logits.clone()
    out[..., image_id] = float("-inf")
    return out


def check_sampling(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None, repetition_penalty: float
) -> None:
    """Raise ValueError naming the first setting out of its range."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must not be negative, got {max_new_tokens}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be 0 (greedy) or positive, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1 (or unset), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not math.isfinite(repetition_penalty) or repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be positive, got {repetition_penalty}")


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, T] padded on the left, and the attention mask (1 = real token)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p) :] = 1
    return ids, mask


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    on_token: Callable[[int, int], None] | None = None,
    pixel_values: torch.Tensor | None = None,
    uniforms: torch.Tensor | None = None,
    on_logits: Callable[[torch.Tensor], None] | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (stop token included when reached). temperature 0 means greedy.
    on_token(batch_index, token_id) is called as each token is produced. pixel_values (a VLM): the
    prompts' images, in prompt order, used by the prefill. uniforms [B, >= max_new_tokens]: each row's
    random numbers for sampling (instead of `generator`). on_logits(logits [B, V]) sees the logits each
    new token is picked from (row i's k-th call belongs to its k-th token while it has not stopped)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    longest = max(len(p) for p in prompts)
    if longest > model.config.max_position_embeddings:
        raise ValueError(
            f"a prompt of {longest} tokens is longer than the model's context "
            f"(max_position_embeddings={model.config.max_position_embeddings})"
        )
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    b, t = ids.shape
    max_len = min(t + max_new_tokens, model.config.max_position_embeddings)
    cache = model.make_kv_cache(b, max_len)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    was_training = model.training
    model.eval()
    out: list[list[int]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    padded = bool((mask == 0).any())
    extra = {"pixel_values": pixel_values.to(device)} if pixel_values is not None else {}
    logits = model(ids, attention_mask=mask if padded else None, position_ids=positions, kv_cache=cache, **extra).logits
    context = ids  # prompt (padding included: pad_id is never a real token) and tokens so far
    if uniforms is not None and (uniforms.dim() != 2 or uniforms.shape[0] != b or uniforms.shape[1] < max_len - t):
        raise ValueError(f"uniforms must be [{b}, >= {max_len - t}], got {list(uniforms.shape)}")
    for k in range(max_len - t):
        last = without_image_token(model, logits[:, -1, :])
        if on_logits is not None:
            on_logits(last)
        u = uniforms[:, k] if uniforms is not None else None
        nxt = pick_next(last, context, temperature, top_k, top_p, repetition_penalty, generator, u)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        context = torch.cat([context, nxt[:, None]], dim=1)
        for i in range(b):
            if not done[i]:
                out[i].append(int(nxt[i]))
                if on_token is not None:
                    on_token(i, int(nxt[i]))
        done |= torch.isin(nxt, stop) if len(stop) else torch.zeros_like(done)
        if bool(done.all()) or cache.length + 1 > max_len:
            break
        mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
        logits = model(
            nxt[:, None], attention_mask=mask if padded else None, position_ids=positions, kv_cache=cache
        ).logits
    model.train(was_training)
    return out
