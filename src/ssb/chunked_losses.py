"""The distillation losses of :mod:`ssb.losses` on hidden states, chunked so that (tokens x vocabulary) logits never
exist: same values and gradients as ``distill_loss`` / ``topk_distill_loss`` on the full logits.

Memory: ``chunked_distill_loss`` / ``chunked_topk_distill_loss`` take hidden states and the lm_head weight and produce
logits ``chunk_size`` positions at a time; nothing of size (N, V) is saved for backward. When only the hidden states
need a gradient (a frozen lm_head: the distill stage) each chunk's gradient is taken in the forward while its logits
exist, and backward scales the stored (N, H) gradient (``_FusedChunks``: no recomputation). Otherwise each chunk runs
inside ``torch.utils.checkpoint`` (``use_reentrant=False``) and its logits are recomputed in backward (the lm_head
matmul runs twice for student and teacher). Logits are produced in the dtype of the hidden states/weight (like the
model's own lm_head, plain linear, no soft-capping) and upcast to fp32 per chunk.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ssb.losses import check_loss_args, check_per_token, distill_loss, forward_kl_and_grad, topk_distill_loss

__all__ = ["chunked_distill_loss", "chunked_topk_distill_loss"]


def _chunked(fn: Callable[..., Tensor], n: int, chunk_size: int, per_token: Sequence[Optional[Tensor]],
             shared: Sequence[Optional[Tensor]]) -> Tensor:
    """sum over chunks of fn(*per_token[chunk], *shared), each chunk under non-reentrant checkpoint.
    N == 0 runs fn once on the empty slices, so the result is a 0 connected to the graph."""
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    total: Optional[Tensor] = None
    for start in range(0, max(n, 1), chunk_size):
        args = [None if t is None else t[start:start + chunk_size] for t in per_token] + list(shared)
        if torch.is_grad_enabled():
            part = checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            part = fn(*args)
        total = part if total is None else total + part
    return total


def _same(x: Tensor) -> Tensor:
    return x


class _FusedChunks(torch.autograd.Function):
    """The chunked loss when only the student's hidden states need a gradient (the distill stage: the lm_head is
    frozen). Forward computes each chunk's loss and, while that chunk's logits exist, its gradient with respect to the
    chunk's hidden states (autograd through the same ``fn``); backward only scales the stored (N, H) gradient. Same
    value and gradient as checkpointing, without recomputing every chunk in backward: two lm_head products of
    student and teacher and one pass of the loss's elementwise work fewer per chunk."""

    @staticmethod
    def forward(ctx, hidden, fn, chunk_size, per_token, shared):
        grad = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, max(hidden.shape[0], 1), chunk_size):
            h = hidden[start:start + chunk_size].detach().requires_grad_(grad is not None)
            args = [None if t is None else t[start:start + chunk_size] for t in per_token] + list(shared)
            # the chunk's graph lives only until its gradient is taken: outer saved-tensor hooks (offloading) skip it
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_same, _same):
                part = fn(h, *args)
                if isinstance(part, tuple):  # (loss, its gradient w.r.t. h), computed by fn itself
                    part, g = part
                elif grad is not None:
                    g = torch.autograd.grad(part, h)[0]
            if grad is not None:
                grad[start:start + chunk_size] = g
            total = total.to(part.dtype) + part.detach()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return (None if grad is None else grad * grad_out.to(grad.dtype)), None, None, None, None


def _chunked_loss(fn: Callable[..., Tensor], hidden: Tensor, chunk_size: int, per_token: Sequence[Optional[Tensor]],
                  shared: Sequence[Optional[Tensor]], fast: Optional[Callable[..., tuple]] = None) -> Tensor:
    """sum over chunks of fn(hidden[chunk], *per_token[chunk], *shared): fused (:class:`_FusedChunks`) when a
    gradient flows to ``hidden`` alone, else checkpointed chunk by chunk (:func:`_chunked`). ``fast``: the same
    chunk loss returning (loss, its gradient w.r.t. the chunk of ``hidden``), used by the fused path instead of fn."""
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    frozen = not any(t is not None and t.requires_grad for t in list(per_token) + list(shared))
    if torch.is_grad_enabled() and hidden.requires_grad and frozen:
        return _FusedChunks.apply(hidden, fast or fn, chunk_size, list(per_token), list(shared))
    return _chunked(fn, hidden.shape[0], chunk_size, [hidden, *per_token], shared)


def chunked_distill_loss(student_hidden: Tensor, teacher_hidden: Tensor, lm_head_weight: Tensor, *,
                         teacher_lm_head_weight: Optional[Tensor] = None, lm_head_bias: Optional[Tensor] = None,
                         teacher_lm_head_bias: Optional[Tensor] = None, chunk_size: int = 1024,
                         **loss_kwargs) -> Tensor:
    """distill_loss(student_hidden @ W.T + b, teacher_hidden @ W_t.T + b_t, **loss_kwargs) computed chunk_size
    positions at a time, never materialising (N, V) logits (forward or backward).

    student_hidden (N, H) (requires grad); teacher_hidden (N, H_t) (no grad); lm_head_weight (V, H) (grad flows to it
    if it requires grad); lm_head_bias (V,) or None. The teacher uses teacher_lm_head_weight/teacher_lm_head_bias if
    given, else lm_head_weight and lm_head_bias. loss_kwargs as distill_loss; targets/weights (N,) are chunked.
    Same value and gradients as the unchunked computation."""
    targets, weights = loss_kwargs.pop("targets", None), loss_kwargs.pop("weights", None)
    check_loss_args(loss_kwargs.get("kind", "forward_kl"), loss_kwargs.get("temperature", 2.0),
                    loss_kwargs.get("beta", 0.5), loss_kwargs.get("ce_weight", 0.0), targets)
    if teacher_lm_head_weight is None:
        teacher_lm_head_weight, teacher_lm_head_bias = lm_head_weight, lm_head_bias
    if teacher_hidden is None:  # kd_weight == 0 (checked by distill_loss): the student itself stands in
        teacher_hidden = student_hidden.detach()
    if student_hidden.dim() != 2 or teacher_hidden.dim() != 2 or student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(f"expected student/teacher hidden (N, H), got {tuple(student_hidden.shape)} and "
                         f"{tuple(teacher_hidden.shape)}")
    if lm_head_weight.shape[0] != teacher_lm_head_weight.shape[0]:
        raise ValueError(f"vocabulary size mismatch: student lm_head V={lm_head_weight.shape[0]}, teacher lm_head "
                         f"V={teacher_lm_head_weight.shape[0]}")
    n = student_hidden.shape[0]
    check_per_token(n, targets=targets, weights=weights)
    tw = teacher_lm_head_weight.detach()
    tb = None if teacher_lm_head_bias is None else teacher_lm_head_bias.detach()

    def chunk_loss(s_h, t_h, tgt, wts, w, b):
        s_logits = F.linear(s_h, w, b)
        with torch.no_grad():
            t_logits = F.linear(t_h, tw, tb)
        return distill_loss(s_logits, t_logits, targets=tgt, weights=wts, **loss_kwargs)

    fast = None
    kind, beta = loss_kwargs.get("kind", "forward_kl"), loss_kwargs.get("beta", 0.5)
    kd_weight = loss_kwargs.get("kd_weight", 1.0)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0) or kd_weight == 0:
        explicit = dict(temperature=loss_kwargs.get("temperature", 2.0), scale_t2=loss_kwargs.get("scale_t2", True),
                        kd_weight=kd_weight, ce_weight=loss_kwargs.get("ce_weight", 0.0))

        def written_out(s_h, t_h, tgt, wts, w, b):  # the fused path's chunk: (loss, gradient w.r.t. s_h)
            with torch.no_grad():
                t_logits = None if kd_weight == 0 else F.linear(t_h, tw, tb)
                loss, g = forward_kl_and_grad(F.linear(s_h, w, b), t_logits, targets=tgt, weights=wts, **explicit)
                return loss, g.to(w.dtype) @ w

        fast = written_out

    return _chunked_loss(chunk_loss, student_hidden, chunk_size, [teacher_hidden.detach(), targets, weights],
                         [lm_head_weight, lm_head_bias], fast)


def chunked_topk_distill_loss(student_hidden: Tensor, topk_logprobs: Tensor, topk_ids: Tensor, tail_logmass: Tensor,
                              lm_head_weight: Tensor, *, lm_head_bias: Optional[Tensor] = None,
                              chunk_size: int = 1024, **kw) -> Tensor:
    """topk_distill_loss(student_hidden @ W.T + b, topk_logprobs, topk_ids, tail_logmass, **kw), chunked and
    checkpointed like chunked_distill_loss. student_hidden (N, H); topk_* (N, k); tail_logmass (N,); W (V, H).
    kw as topk_distill_loss (kind, temperature, teacher_tempered, kd_weight, ...)."""
    targets, weights = kw.pop("targets", None), kw.pop("weights", None)
    check_loss_args(kw.get("kind", "forward_kl"), kw.get("temperature", 2.0), kw.get("beta", 0.5),
                    kw.get("ce_weight", 0.0), targets)
    if student_hidden.dim() != 2:
        raise ValueError(f"expected student hidden (N, H), got {tuple(student_hidden.shape)}")
    n = student_hidden.shape[0]
    check_per_token(n, tail_logmass=tail_logmass, targets=targets, weights=weights)
    if topk_logprobs.shape[0] != n or topk_ids.shape[0] != n:
        raise ValueError(f"topk_logprobs/topk_ids must have N={n} rows, got {tuple(topk_logprobs.shape)} and "
                         f"{tuple(topk_ids.shape)}")

    def chunk_loss(s_h, lp, ids, tail, tgt, wts, w, b):
        return topk_distill_loss(F.linear(s_h, w, b), lp, ids, tail, targets=tgt, weights=wts, **kw)

    return _chunked_loss(chunk_loss, student_hidden, chunk_size, [topk_logprobs, topk_ids, tail_logmass, targets,
                                                                  weights], [lm_head_weight, lm_head_bias])
