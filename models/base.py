"""What the decoder models share, and what every model shows the trainer.

- `ModelOutput`: what a forward returns (attribute access, like transformers' outputs).
- `TrainableModel`: the one declared interface between a model and the trainer (the hooks it calls);
  every model has all of it, so the trainer never probes with getattr.
- `CausalLMBase`: embedding the input, positions, rotary tables and the attention mask for a forward,
  the LM head, the GPT-2 style initialisation, and the trainer hooks' defaults (a model without
  experts has nothing to do after an optimizer step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.utils.checkpoint

import kernels

from .layers import build_attention_mask, packed_rows

IGNORE_INDEX = -100

RESIDUAL_OUTPUTS = ("o_proj.weight", "down_proj.weight", "experts.down_proj")


@dataclass
class ModelOutput:
    logits: torch.Tensor | None = None  # None when targets were given: the loss never materialises them
    loss: torch.Tensor | None = None
    aux: dict | None = None  # extra per-model losses/statistics (MoE balance, MTP), for the trainer to log
    logps: torch.Tensor | None = None  # with token_logps=True: log p(target) per position (0 where ignored)


@runtime_checkable
class TrainableModel(Protocol):
    """What the trainer and the engines need from a model, besides being an nn.Module with a `config`."""

    config: object
    # module classes that ZeRO-3 must gather whole (an MoE block: some of its experts may get no tokens)
    zero3_leaf_modules: tuple[type[nn.Module], ...]

    def moe_blocks(self) -> list[nn.Module]:
        """The blocks with routed experts (expert parallelism shards them; empty for a dense model)."""
        ...

    def after_optimizer_step(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """Run after every optimizer step with `reduce` summing a tensor over data-parallel ranks; returns
        statistics for the log (the MoE model's expert-bias update and load balance)."""
        ...

    def set_activation_checkpointing(self, every: int) -> None:
        """Recompute every `every`-th decoder layer's activations in the backward instead of keeping them
        (0: keep all)."""
        ...

    def compile_layers(self) -> None:
        """torch.compile each decoder layer in place (parameter names unchanged)."""
        ...


def in_recomputation() -> bool:
    """True while autograd runs a backward pass: a layer's forward runs then only to recompute the
    activations activation checkpointing dropped (statistics gathered in forward must not count it twice)."""
    return torch._C._current_graph_task_id() != -1


class LMHead(nn.Linear):
    """The output projection. Given targets it returns their cross-entropy instead of the logits, through
    the fused linear + cross-entropy op (kernels/linear_cross_entropy.py: chunks of rows, the [tokens,
    vocab] logits never all in memory at once). It stays an nn.Linear (`lm_head.weight`, its hooks), so
    ZeRO-3 gathers its weight for the forward as for any linear layer."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__(hidden, vocab, bias=False)

    def forward(self, h: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        """Logits [..., V]; with targets (IGNORE_INDEX where no loss): the mean cross-entropy over the
        positions not ignored, or with reduction='none' the loss per position (-log p(target))."""
        if targets is None:
            return super().forward(h)
        return kernels.linear_cross_entropy(h, self.weight, targets, ignore_index=IGNORE_INDEX, reduction=reduction)


class CausalLMBase(nn.Module):
    """Subclasses have `self.config` and `self.model` with `embed_tokens` and `rotary_emb`."""

    zero3_leaf_modules: tuple[type[nn.Module], ...] = ()

    def moe_blocks(self) -> list[nn.Module]:
        return []

    def after_optimizer_step(self, reduce) -> dict[str, float]:
        return {}

    def add_lm_head(self) -> None:
        """The output projection, sharing the embedding matrix when the config ties them."""
        c = self.config
        self.lm_head = LMHead(c.hidden_size, c.vocab_size)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def packed_mode(self, x: torch.Tensor) -> bool | None:
        """How packed rows (segment ids, no padding mask, no cache) reach attention: None, a dense mask;
        False, PackedRows with sequence starts; True, also cumulative lengths (flash-attn's varlen)."""
        return None

    def head_output(self, hidden: torch.Tensor, targets, token_logps: bool) -> ModelOutput:
        """Logits without targets; with them the mean next-token loss, or (token_logps) log p(target) at
        every position, both from the fused head, without the logits."""
        if targets is None:
            return ModelOutput(logits=self.lm_head(hidden))
        if token_logps:
            return ModelOutput(logps=-self.lm_head(hidden, targets, reduction="none"))
        return ModelOutput(loss=self.lm_head(hidden, targets))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    checkpoint_every = 0  # activation checkpointing: every k-th decoder layer (0: off)

    def set_activation_checkpointing(self, every: int) -> None:
        if every < 0:
            raise ValueError(f"activation checkpointing takes every k-th layer, k >= 0; got {every}")
        self.checkpoint_every = every

    def compile_layers(self) -> None:
        for layer in self.model.layers:
            layer.compile()

    def run_layer(self, i: int, layer: nn.Module, *args, **kwargs):
        """layer(*args, **kwargs), its activations recomputed in the backward when it is a checkpointed layer."""
        if self.checkpoint_every and i % self.checkpoint_every == 0 and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False, **kwargs)
        return layer(*args, **kwargs)

    def init_weights(self, is_norm) -> None:
        """Normal(0, initializer_range) matrices, zero biases, unit norms; residual outputs scaled by
        1/sqrt(2 * layers) (GPT-2) so the residual stream's variance does not grow with depth."""
        std = self.config.initializer_range
        scale = 1 / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if is_norm(name):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=std * (scale if name.endswith(RESIDUAL_OUTPUTS) else 1.0))

    def prepare(self, input_ids, inputs_embeds, attention_mask, position_ids, segment_ids, kv_cache):
        """(hidden states, cos, sin, mask) for a forward over T new tokens after the cache's `past`."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds = self.model.embed_tokens(input_ids)
        b, t, _ = inputs_embeds.shape
        past = kv_cache.length if kv_cache is not None else 0
        if past + t > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {past + t} tokens is longer than the model's context "
                f"(max_position_embeddings={self.config.max_position_embeddings})"
            )
        device = inputs_embeds.device
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=device).expand(b, t)
        cos, sin = self.model.rotary_emb(position_ids, inputs_embeds.dtype)
        packed = segment_ids is not None and attention_mask is None and kv_cache is None
        mode = self.packed_mode(inputs_embeds) if packed else None
        if mode is not None:  # no [B, 1, T, T] mask: sequence starts (and cumulative lengths for varlen kernels)
            return inputs_embeds, cos, sin, packed_rows(segment_ids, with_cu_seqlens=mode)
        mask = build_attention_mask(t, past + t, device, attention_mask, segment_ids)
        return inputs_embeds, cos, sin, mask
