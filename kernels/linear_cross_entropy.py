"""Linear + cross-entropy, fused: the LM head and its loss without materialising the [tokens, vocab] logits.

With hidden states h [N, H], the head's weight W [V, H] and targets t [N], row i's logits are x = h_i W^T,
lse = log sum_j exp(x_j), and its loss (label smoothing eps, z-loss weight z; eps = z = 0 is plain
cross-entropy, log p(t_i) = x_t - lse):

    loss_i = lse - (1 - eps) * x_t - eps * mean_j x_j + z * lse^2          (0 where t_i == ignore_index)
    d loss_i / d x_j = softmax_j * (1 + 2 z lse) - (1 - eps) * [j == t_i] - eps / V

which is F.cross_entropy(label_smoothing=eps) plus PaLM's z-loss. 'mean' divides the sum by the number of
rows not ignored (by 1 when every row is: the loss and gradients are then 0, not NaN); 'sum'; 'none' gives
loss_i per row (DPO's per-token log-probs are its negation, with eps = z = 0).

The rows are taken a chunk at a time: the chunk's logits [C, V] are one matmul (in the inputs' dtype), a
row function turns them into the per-row loss and, when gradients are wanted, writes
d loss / d logits over them in place; then d h_chunk = g W and d W += g^T h_chunk, and the chunk's logits
are gone. So memory holds one chunk's logits, never all of them. For 'mean'/'sum' (training) the gradients
are computed in the forward (three matmuls a chunk, as the unfused head + loss; the backward only scales
them by the incoming gradient); for 'none' the forward keeps its inputs, and the backward recomputes each
chunk with the incoming per-row gradients.

The row function is the only part the two backends do differently:
- reference: PyTorch ops in fp32 on the chunk;
- Triton: one program per row, two passes over the vocabulary in blocks: an online maximum and sum of
  exponentials (with the sum of x for smoothing) give lse and the loss; the second pass writes the gradient.
"""

from __future__ import annotations

import torch

from ._triton import num_warps_for, tl, triton

REDUCTIONS = ("mean", "sum", "none")
CHUNK_ELEMENTS = 1 << 25  # logits per chunk (128 MB in fp32): rows = the largest power of 2 that fits
VOCAB_BLOCK = 4096  # columns a Triton program holds at once


def chunk_rows(n: int, vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
    rows = max(1, elements // max(vocab, 1))
    return max(1, min(1 << (rows.bit_length() - 1), n))


# ---------------------------------------------------------------------------------------- row functions


def ce_rows_reference(logits, targets, ignore_index: int, eps: float, z: float, scale):
    """The loss [C] in fp32 of each row of a chunk of logits [C, V]; with `scale` [C], the gradient of
    sum_i scale_i * loss_i with respect to the logits is written over `logits`."""
    x = logits.float()
    v = x.shape[1]
    valid = targets != ignore_index
    t = torch.where(valid, targets, 0)
    lse = torch.logsumexp(x, dim=1)
    loss = lse - (1 - eps) * x.gather(1, t[:, None]).squeeze(1)
    if eps:
        loss = loss - eps * x.mean(dim=1)
    if z:
        loss = loss + z * lse * lse
    loss = torch.where(valid, loss, 0.0)
    if scale is not None:
        g = torch.exp(x - lse[:, None])
        if z:
            g.mul_((1 + 2 * z * lse)[:, None])
        if eps:
            g.sub_(eps / v)
        g[torch.arange(len(t), device=t.device), t] -= 1 - eps
        g.mul_(torch.where(valid, scale, 0.0)[:, None])
        logits.copy_(g)
    return loss


@triton.jit
def _ce_rows(X, T, LOSS, SCALE, stride_x, V, ignore_index, eps, z, HAS_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    xp = X + row * stride_x
    t = tl.load(T + row)
    valid = t != ignore_index
    t = tl.where(valid, t, 0).to(tl.int64)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.full((), 0.0, tl.float32)
    sx = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < V
        x = tl.load(xp + cols, mask=inside, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        sx += tl.sum(tl.where(inside, x, 0.0), 0)
        m = m_new
    lse = m + tl.log(s)
    x_t = tl.load(xp + t).to(tl.float32)
    loss = lse - (1.0 - eps) * x_t - eps * sx / V + z * lse * lse
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    if HAS_GRAD:
        sc = tl.where(valid, tl.load(SCALE + row), 0.0)
        up = 1.0 + 2.0 * z * lse
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < V
            x = tl.load(xp + cols, mask=inside, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) * up - eps / V
            g = tl.where(cols == t, g - (1.0 - eps), g)
            tl.store(xp + cols, (g * sc).to(X.dtype.element_ty), mask=inside)


def ce_rows_triton(logits, targets, ignore_index: int, eps: float, z: float, scale):
    """As ce_rows_reference, one Triton program per row."""
    c, v = logits.shape
    loss = torch.empty(c, dtype=torch.float32, device=logits.device)
    if c:
        block = min(VOCAB_BLOCK, triton.next_power_of_2(v))
        _ce_rows[(c,)](
            logits,
            targets,
            loss,
            scale if scale is not None else loss,
            logits.stride(0),
            v,
            ignore_index,
            float(eps),
            float(z),
            HAS_GRAD=scale is not None,
            BLOCK=block,
            num_warps=num_warps_for(block),
        )
    return loss


# ---------------------------------------------------------------------------------------- the chunked op


def _chunks(n: int, rows: int):
    for c0 in range(0, n, rows):
        yield slice(c0, min(n, c0 + rows))


def _accumulate(dh, dw, g, h, w, sl) -> None:
    """d h[sl] = g W and d W += g^T h[sl] (dW accumulated in fp32 across chunks)."""
    if dh is not None:
        torch.mm(g, w, out=dh[sl])
    if dw is not None:
        if dw.dtype == g.dtype:  # addmm with out= (FLOP counters see it; they miss the in-place addmm_)
            torch.addmm(dw, g.t(), h[sl], out=dw)
        else:
            dw.add_(g.t() @ h[sl])


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, targets, ignore_index, eps, z, reduction, rows_fn, rows, need_h, need_w):
        n = h.shape[0]
        valid = targets != ignore_index
        losses = torch.empty(n, dtype=torch.float32, device=h.device)
        count = valid.sum().clamp(min=1)
        now = (need_h or need_w) and reduction != "none"  # gradients now, scaled in the backward
        dh = torch.empty_like(h) if now and need_h else None
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if now and need_w else None
        scale = None
        if now:
            scale = torch.ones(n, dtype=torch.float32, device=h.device)
            if reduction == "mean":
                scale /= count
        for sl in _chunks(n, rows):
            logits = h[sl] @ w.t()
            losses[sl] = rows_fn(logits, targets[sl], ignore_index, eps, z, scale[sl] if now else None)
            if now:
                _accumulate(dh, dw, logits, h, w, sl)
        ctx.reduction, ctx.rows_fn, ctx.rows, ctx.args = reduction, rows_fn, rows, (ignore_index, eps, z)
        ctx.need, ctx.w_dtype = (need_h, need_w), w.dtype
        if reduction == "none":
            ctx.save_for_backward(h, w, targets)
            return losses
        ctx.save_for_backward(dh, dw)
        total = losses.sum()
        return total / count if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad):
        need_h, need_w = ctx.need
        none = (None,) * 9
        if ctx.reduction != "none":
            dh, dw = ctx.saved_tensors
            gh = dh * grad.to(dh.dtype) if need_h else None
            gw = (dw * grad).to(ctx.w_dtype) if need_w else None
            return (gh, gw, *none)
        h, w, targets = ctx.saved_tensors
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        scale = grad.float().contiguous()
        for sl in _chunks(h.shape[0], ctx.rows):
            logits = h[sl] @ w.t()
            ctx.rows_fn(logits, targets[sl], *ctx.args, scale[sl])
            _accumulate(dh, dw, logits, h, w, sl)
        return (dh, dw.to(w.dtype) if dw is not None else None, *none)


def linear_cross_entropy_chunked(
    rows_fn,
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    chunk: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of (h @ weight^T) against targets, a chunk of rows at a time, with `rows_fn` for the
    per-row part. h [..., H], targets [...] (long); 'none' returns a loss per target in targets' shape.
    Under autocast the matmuls run in the autocast dtype (the loss math is fp32 either way)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"linear_cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if h.shape[:-1] != targets.shape or h.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden {tuple(h.shape)}, weight {tuple(weight.shape)} and targets "
            f"{tuple(targets.shape)} do not fit ([..., H], [V, H], [...])"
        )
    v = weight.shape[0]
    t = targets.reshape(-1)
    bad = (t != ignore_index) & ((t < 0) | (t >= v))
    if bool(bad.any()):
        raise ValueError(f"linear_cross_entropy: target {int(t[bad][0])} is outside the vocabulary of {v}")
    dev = h.device.type
    h2 = h.reshape(-1, h.shape[-1])
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        h2, weight = h2.to(dt), weight.to(dt)
    grad_on = torch.is_grad_enabled()
    need_h, need_w = grad_on and h2.requires_grad, grad_on and weight.requires_grad
    rows = chunk or chunk_rows(h2.shape[0], v)
    with torch.autocast(dev, enabled=False):
        out = LinearCrossEntropy.apply(
            h2.contiguous(),
            weight,
            t.contiguous(),
            ignore_index,
            float(label_smoothing),
            float(z_loss),
            reduction,
            rows_fn,
            rows,
            need_h,
            need_w,
        )
    return out.view(targets.shape) if reduction == "none" else out


def linear_cross_entropy_reference(
    h, weight, targets, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, reduction="mean", chunk=None
):
    return linear_cross_entropy_chunked(
        ce_rows_reference, h, weight, targets, ignore_index, label_smoothing, z_loss, reduction, chunk
    )


def linear_cross_entropy_triton(
    h, weight, targets, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, reduction="mean", chunk=None
):
    return linear_cross_entropy_chunked(
        ce_rows_triton, h, weight, targets, ignore_index, label_smoothing, z_loss, reduction, chunk
    )
