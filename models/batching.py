"""Continuous batching: sequences join a running batch at any decode step and leave it when done.

One KV cache of `slots` rows shares one time axis of length L. The n active sequences hold rows 0..n-1,
and each one's tokens fill a contiguous span of columns that ends at L; the columns left of its span
are masked out for it. A joining prompt is prefilled alone (batch 1, a cache of its own) and copied
into row n, right-aligned to L; when it is longer than L the whole cache shifts right first. Each step
feeds every active row its last token at its own position, in one forward. A sequence that ends gives
its row to the last active one (rows stay 0..n-1, so a step computes nothing for free slots), and
columns no active row uses any more are dropped from the left: L never exceeds the longest active
span, which the model's context bounds. Rotary positions are applied before keys enter the cache, so
moving a span along the time axis changes nothing it attends to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .generate import check_sampling, pick_next, without_image_token


@dataclass(eq=False)
class Request:
    """One sequence to generate. `on_token(token_id)` is called for each new token (a stop token
    included), `on_finish(reason)` once at the end: "stop" (a stop token), "length" (max_new_tokens or
    the context) or "cancelled"."""

    prompt: Sequence[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop_ids: Sequence[int] = ()
    generator: torch.Generator | None = None
    pixel_values: torch.Tensor | None = None
    on_token: Callable[[int], None] | None = None
    on_finish: Callable[[str], None] | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False  # set from any thread; the decoder drops the sequence at its next step


class BatchDecoder:
    """Decodes up to `slots` sequences at once; `add` joins one, `step` advances all by one token."""

    def __init__(self, model, slots: int, pad_id: int = 0):
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.model, self.slots, self.pad_id = model.eval(), slots, pad_id
        self.context = model.config.max_position_embeddings
        self.device = next(model.parameters()).device
        self.cache = model.make_kv_cache(slots, self.context)
        for buf in self.cache.buffers():  # masked-out columns are still multiplied by 0: never NaN garbage
            buf.zero_()
        self.active: list[Request] = []  # row i holds active[i]
        self.mask = torch.zeros(slots, 0, dtype=torch.long, device=self.device)  # 1 = a real token of the row
        self.positions = torch.zeros(slots, dtype=torch.long, device=self.device)  # the next token's position
        self.last = torch.zeros(slots, dtype=torch.long, device=self.device)  # the next token to feed

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    @property
    def free(self) -> int:
        return self.slots - len(self.active)

    def _shift(self, by: int) -> None:
        """Move every row's columns `by` to the right (by > 0) or left (by < 0) along the time axis."""
        length, dim = self.length, self.cache.TIME_DIM
        keep = length - max(-by, 0)
        for buf in self.cache.buffers():
            src = buf.narrow(dim, max(-by, 0), keep).clone()
            buf.narrow(dim, max(by, 0), keep).copy_(src)
        if by > 0:
            self.mask = torch.cat([self.mask.new_zeros(self.slots, by), self.mask], dim=1)
        else:
            self.mask = self.mask[:, -by:]

    def _compact(self) -> None:
        """Drop the columns to the left of every active span."""
        n = len(self.active)
        if n == 0:
            self.mask = self.mask[:, :0]
            return
        first = int(self.mask[:n].argmax(dim=1).min())  # each row's first real column
        if first > 0:
            self._shift(-first)

    @torch.no_grad()
    def add(self, request: Request) -> None:
        """Prefill `request` alone and join it to the batch (its first token is produced here)."""
        if not self.free:
            raise RuntimeError("no free slot: wait until a sequence finishes")
        check_sampling(
            request.max_new_tokens, request.temperature, request.top_k, request.top_p, request.repetition_penalty
        )
        p = len(request.prompt)
        if p == 0 or p >= self.context:
            raise ValueError(f"a prompt of {p} tokens does not fit the model's context of {self.context}")
        if request.max_new_tokens == 0:
            self._finish(request, "length")
            return
        ids = torch.tensor([list(request.prompt)], dtype=torch.long, device=self.device)
        own = self.model.make_kv_cache(1, p)
        extra = {} if request.pixel_values is None else {"pixel_values": request.pixel_values.to(self.device)}
        logits = self.model(ids, kv_cache=own, **extra).logits[:, -1]
        if p > self.length:
            self._shift(p - self.length)
        row, dim, start = len(self.active), self.cache.TIME_DIM, self.length - p
        for big, small in zip(self.cache.buffers(), own.buffers()):
            big[row].narrow(dim - 1, start, p).copy_(small[0].narrow(dim - 1, 0, p))
        self.mask[row] = 0
        self.mask[row, start:] = 1
        self.positions[row] = p
        self.active.append(request)
        self._accept(row, request, self._pick([request], logits)[0])

    def _pick(self, requests: list[Request], logits: torch.Tensor) -> list[int]:
        """The next token of each request from its row of logits [n, V]: greedy rows in one argmax,
        sampled ones each with its own settings and generator."""
        logits = without_image_token(self.model, logits)
        tokens = logits.float().argmax(-1).tolist()
        for i, r in enumerate(requests):
            if r.temperature > 0 or r.repetition_penalty != 1.0:
                seen = list(r.prompt) + r.tokens if r.repetition_penalty != 1.0 else [0]
                context = torch.tensor([seen], dtype=torch.long, device=self.device)
                tokens[i] = int(
                    pick_next(
                        logits[i : i + 1], context, r.temperature, r.top_k, r.top_p, r.repetition_penalty, r.generator
                    )[0]
                )
        return tokens

    def _accept(self, row: int, request: Request, token: int) -> bool:
        """Record the row's next token; False when the sequence ended."""
        request.tokens.append(token)
        self.last[row] = token
        if request.on_token is not None:
            request.on_token(token)
        if token in request.stop_ids:
            return self._leave(request, "stop")
        if len(request.tokens) >= request.max_new_tokens or len(request.prompt) + len(request.tokens) >= self.context:
            return self._leave(request, "length")
        return True

    def _finish(self, request: Request, reason: str) -> None:
        request.finish_reason = reason
        if request.on_finish is not None:
            request.on_finish(reason)

    def _leave(self, request: Request, reason: str) -> bool:
        """Free the request's row: the last active row moves into it."""
        row, last = self.active.index(request), len(self.active) - 1
        if row != last:
            for buf in self.cache.buffers():
                buf[row].copy_(buf[last])
            for state in (self.mask, self.positions, self.last):
                state[row] = state[last]
            self.active[row] = self.active[last]
        self.active.pop()
        self.mask[last] = 0
        if not self.active:
            self.mask = self.mask[:, :0]
        self._finish(request, reason)
        return False

    @torch.no_grad()
    def step(self) -> None:
        """One token for every active sequence (cancelled ones leave first)."""
        for request in [r for r in self.active if r.cancelled]:
            self._leave(request, "cancelled")
        self._compact()
        n = len(self.active)
        if n == 0:
            return
        if self.length + 1 > self.context:  # cannot happen: a span ends before it outgrows the context
            raise RuntimeError("the batch outgrew the KV cache")
        self.mask = torch.cat([self.mask, self.mask.new_zeros(self.slots, 1)], dim=1)
        self.mask[:n, -1] = 1
        view = self.cache.rows(n)
        view.length = self.length - 1
        logits = self.model(
            self.last[:n, None],
            attention_mask=self.mask[:n],
            position_ids=self.positions[:n, None],
            kv_cache=view,
        ).logits[:, -1]
        self.positions[:n] += 1
        requests = list(self.active)
        tokens = self._pick(requests, logits)
        for row in reversed(range(n)):  # a leaving row takes the last one's place: go from the end
            self._accept(row, requests[row], tokens[row])

    def run(self, requests: Sequence[Request]) -> None:
        """Decode `requests`, each joining as soon as a slot is free, until all have finished."""
        waiting = list(requests)
        while waiting or self.active:
            while waiting and self.free:
                self.add(waiting.pop(0))
            self.step()
