"""Token-level distillation losses (student = base + LoRA, teacher = frozen base on the hinted prompt).

Conventions (all functions):

* Inputs are per reply token, already gathered and flattened over the batch: logits ``(N, V)``, hidden states
  ``(N, H)``. Every loss returns the **sum** over tokens of ``per_token_loss * weights`` (``weights=None`` -> 1 each);
  the caller divides by its normaliser (per-token averaging: number of tokens; per-sequence averaging: weight each
  token ``1/len(seq)`` and divide by the number of sequences).
* ``per_token_loss = kd * (T**2 if scale_t2) + ce_weight * CE(student logits at T=1, targets)``. ``kd`` uses the
  softmax at temperature ``T`` (``logits / T``) for both sides. ``targets == -100`` contributes no CE.
* ``kind``: ``forward_kl`` = KL(p_t || p_s) = sum_v p_t (log p_t - log p_s); ``reverse_kl`` = KL(p_s || p_t);
  ``jsd`` = generalized JSD in TRL's GKD convention: ``m = beta * p_t + (1 - beta) * p_s`` and
  ``jsd = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)``. Edge cases exactly as TRL: ``beta == 0`` -> forward KL,
  ``beta == 1`` -> reverse KL (the bare formula would give 0 there; note ``jsd / beta -> forward KL`` as beta -> 0 and
  ``jsd / (1 - beta) -> reverse KL`` as beta -> 1, so the special cases are the continuous limits of the scaled JSD).
  ``beta`` outside [0, 1] is a ValueError.
* Arithmetic is float32 (float64 inputs stay float64); bf16/fp16 inputs are upcast. Log-probabilities come from
  ``log_softmax``. The teacher is a fixed target: its logits/log-probs are detached.
* Zero probabilities: terms with p == 0 in ``sum p (log p - log q)`` are 0 (0 log 0 = 0), so a teacher with ``-inf``
  logits gives no NaN. Where q == 0 but p > 0 (e.g. reverse KL with a teacher token at exactly zero probability) the
  true KL is infinite; ``log q`` is then replaced by ``LOG_FLOOR = -1e4`` so the loss stays finite and its gradient
  pushes the student's mass off that token.
* Empty input (N == 0) or all-zero weights give a loss of exactly 0 with zero gradients (never NaN).

Top-k teacher (cached teacher signal). Per reply token the teacher is stored as ``topk_logprobs (N, k)``,
``topk_ids (N, k)`` (distinct ids per row) and ``tail_logmass (N,)`` = log of the mass outside the top-k, all taken from
the teacher distribution at a cache temperature ``T_c``: ``topk_teacher(logits, k, temperature=T_c)`` =
top-k of ``log_softmax(logits / T_c)``. The loss is the chosen divergence between two distributions over k+1 *bins*
(the k kept tokens and one tail bin). Teacher bins: the stored values renormalised (``log_softmax`` over the k+1 bins,
which only absorbs fp16/bf16 rounding). Student bins: ``log_softmax(student / T)`` gathered at the ids, and its tail
bin = logsumexp of its log-probs outside the ids (exact, full vocabulary).
How the tail mass enters each kind (P = tail-bin mass, c = distribution conditioned on the tail tokens):
``forward_kl``: the tail adds ``P_t (log P_t - log P_s)``; the student is matched on its total tail mass, not on how it
spreads it; binned = full - ``P_t * KL(c_t || c_s)``. ``reverse_kl``: adds ``P_s (log P_s - log P_t)``; binned = full -
``P_s * KL(c_s || c_t)``. ``jsd``: the mixture is formed per bin, tail included; binned <= full. All three are
f-divergences, so binning never increases them (data-processing inequality) and the gap vanishes as the tail mass
does; with k = V (empty tail, ``tail_logmass = -inf``) the top-k loss equals ``distill_loss`` on the full logits.
Temperature: ``teacher_tempered=True`` (what the distill stage uses): the cache was built at ``T_c = T`` and the stored
values are used as-is; ``T`` is applied to the student only. This is the exact binned divergence of the two tempered
distributions; the truncation gap above is then taken at T, whose tail is heavier than at T=1 (e.g. 1e-8 -> 4e-3 for a
peaked teacher), so keep k moderate, not tiny. ``teacher_tempered=False``: the stored values are T=1 log-probs and
are tempered over the bins (``log_softmax(bins / T)``), treating the tail as one token. Exact for T=1 and for k=V,
but for T != 1 the tempered tail is ``sum_tail p_v^(1/T)``, not ``(sum_tail p_v)^(1/T)``: measured on V=2000 random
logits with P_tail ~ 1e-3, k=32..128, T=2, the loss is off by ~35-130%. Hence the distill stage caches at the
training temperature, records ``T_c`` and k in the cache index, and refuses a cache whose ``T_c`` or k differs.

Chunked versions that never hold (N, V) logits: :mod:`ssb.chunked_losses`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ssb.choices import LOSSES
LOG_FLOOR = -1e4  # substitute for log q = -inf where p > 0 (see module docstring)

__all__ = ["LOSSES", "LOG_FLOOR", "distill_loss", "forward_kl_and_grad", "topk_teacher", "topk_distill_loss",
           "check_loss_args", "check_per_token"]


# ----------------------------------------------------------------------------------------------- helpers
def _float(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def check_loss_args(kind: str, temperature: float, beta: float, ce_weight: float, targets: Optional[Tensor]) -> None:
    if kind not in LOSSES:
        raise ValueError(f"unknown distillation loss kind {kind!r}; expected one of {LOSSES}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta!r}")
    if ce_weight != 0 and targets is None:
        raise ValueError("ce_weight != 0 requires targets (N,) token ids")


def check_per_token(n: int, **tensors: Optional[Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """sum_v p (log p - log q) over the last dim -> (...). 0 log 0 = 0; log q = -inf (with p > 0) -> LOG_FLOOR.
    Written with masked (never NaN) intermediates so the backward pass is NaN-free too."""
    logq = torch.where(torch.isneginf(logq), LOG_FLOOR, logq)
    diff = torch.where(torch.isneginf(logp), 0.0, logp - logq)
    return (logp.exp() * diff).sum(-1)


def _logaddexp(a: Tensor, b: Tensor) -> Tensor:
    """logaddexp that is -inf (with zero, not NaN, gradient) where both inputs are -inf."""
    both = torch.isneginf(a) & torch.isneginf(b)
    out = torch.logaddexp(torch.where(both, 0.0, a), torch.where(both, 0.0, b))
    return torch.where(both, float("-inf"), out)


def _kd(log_ps: Tensor, log_pt: Tensor, kind: str, beta: float) -> Tensor:
    """Per-row divergence between student log-probs log_ps (N, B) and teacher log-probs log_pt (N, B) -> (N,)."""
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl(log_pt, log_ps)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl(log_ps, log_pt)
    log_m = _logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))
    return beta * _kl(log_pt, log_m) + (1.0 - beta) * _kl(log_ps, log_m)


def _reduce(kd: Tensor, student: Tensor, temperature: float, scale_t2: bool, ce_weight: float,
            targets: Optional[Tensor], weights: Optional[Tensor], kd_weight: float = 1.0) -> Tensor:
    """kd (N,), student fp32 logits (N, V) -> scalar sum_i w_i * (kd_weight * kd_i [* T^2] + ce_weight * CE_i)."""
    per_token = kd * (kd_weight * temperature ** 2 if scale_t2 else kd_weight)
    if ce_weight != 0:
        ce = F.cross_entropy(student, targets.long(), reduction="none", ignore_index=-100)
        per_token = per_token + ce_weight * ce
    if weights is not None:
        per_token = per_token * weights.to(per_token.dtype)
    return per_token.sum()


def _tail_logsumexp(logp: Tensor, ids: Tensor) -> Tensor:
    """logsumexp of logp (N, V) over the entries NOT in ids (N, k) -> (N,); -inf (zero gradient) if none left."""
    masked = logp.scatter(-1, ids, float("-inf"))
    m = masked.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)
    s = (masked - m).exp().sum(-1)
    pos = s > 0
    return torch.where(pos, m.squeeze(-1) + torch.log(torch.where(pos, s, 1.0)), float("-inf"))


# ----------------------------------------------------------------------------------------------- full vocab
def distill_loss(student_logits: Tensor, teacher_logits: Optional[Tensor], *, kind: str = "forward_kl",
                 temperature: float = 2.0, scale_t2: bool = True, beta: float = 0.5, ce_weight: float = 0.0,
                 targets: Optional[Tensor] = None, weights: Optional[Tensor] = None,
                 kd_weight: float = 1.0) -> Tensor:
    """Distillation loss over N reply tokens.

    student_logits, teacher_logits: (N, V) (any float dtype; computed in fp32); targets: (N,) int ids (needed iff
    ce_weight != 0; -100 = ignored); weights: (N,) float or None. Returns a 0-dim tensor:
    sum_i weights_i * (kd_weight * kd_kind(i) * (T^2 if scale_t2) + ce_weight * CE(student_logits_i at T=1, targets_i)).
    teacher_logits may be None only when kd_weight == 0 (pure cross-entropy: SFT).
    """
    check_loss_args(kind, temperature, beta, ce_weight, targets)
    if teacher_logits is None:
        if kd_weight != 0:
            raise ValueError("teacher_logits is None but kd_weight != 0")
        teacher_logits = student_logits.detach()  # any finite stand-in: its divergence is weighted by 0
    if student_logits.dim() != 2 or teacher_logits.dim() != 2:
        raise ValueError(f"expected (N, V) logits, got student {tuple(student_logits.shape)}, "
                         f"teacher {tuple(teacher_logits.shape)}")
    if student_logits.shape[1] != teacher_logits.shape[1]:
        raise ValueError(f"vocabulary size mismatch: student logits have V={student_logits.shape[1]}, teacher "
                         f"logits have V={teacher_logits.shape[1]} (student and teacher must share a tokenizer/lm_head)")
    n = student_logits.shape[0]
    if teacher_logits.shape[0] != n:
        raise ValueError(f"token count mismatch: student N={n}, teacher N={teacher_logits.shape[0]}")
    check_per_token(n, targets=targets, weights=weights)
    s = _float(student_logits)
    t = _float(teacher_logits.detach()).to(s.dtype)
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    return _reduce(_kd(log_ps, log_pt, kind, beta), s, temperature, scale_t2, ce_weight, targets, weights,
                   kd_weight)


def forward_kl_and_grad(student_logits: Tensor, teacher_logits: Optional[Tensor], *, temperature: float = 2.0,
                        scale_t2: bool = True, kd_weight: float = 1.0, ce_weight: float = 0.0,
                        targets: Optional[Tensor] = None, weights: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``distill_loss(kind="forward_kl", ...)`` and its gradient with respect to ``student_logits``, written out:
    d/ds KL(p_t || softmax(s / T)) = (softmax(s / T) - p_t) / T per row, d/ds CE(s, y) = softmax(s) - onehot(y).
    The fast path of the chunked loss (the distill stage's KD, SFT and RFT): about a third of the elementwise passes
    over (N, V) that autograd makes through :func:`distill_loss`, which is memory-bound on a CPU; with
    ``kd_weight == 0`` (SFT, RFT) no teacher is needed (``teacher_logits`` None) and no divergence is computed.
    Log-probabilities below ``LOG_FLOOR`` (``-inf`` included) count as ``LOG_FLOOR``, where fp32 probabilities are
    exactly 0, as in :func:`_kl`; targets of -100 are ignored. Returns (0-dim sum, gradient (N, V)), fp32 (fp64 for fp64 logits)."""
    check_loss_args("forward_kl", temperature, 0.0, ce_weight, targets)
    if teacher_logits is None and kd_weight != 0:
        raise ValueError("teacher_logits is None but kd_weight != 0")
    n = student_logits.shape[0]
    check_per_token(n, targets=targets, weights=weights)
    dt = torch.float64 if student_logits.dtype == torch.float64 else torch.float32  # the math's dtype
    w = torch.ones(n, dtype=dt, device=student_logits.device) if weights is None else weights.to(dt)

    def log_probs(x: Tensor, t: float) -> Tensor:
        x = x.to(dt) if x.dtype != dt else x.clone()
        if t != 1:
            x.div_(t)
        return x.sub_(torch.logsumexp(x, -1, keepdim=True)).clamp_(min=LOG_FLOOR)

    total, grad = student_logits.new_zeros((), dtype=dt), None
    if kd_weight != 0:
        log_pt = log_probs(teacher_logits.detach(), temperature)
        p_t = log_pt.exp()
        log_ps = log_probs(student_logits.detach(), temperature)
        kl = torch.linalg.vecdot(p_t, log_pt.sub_(log_ps))  # (N,); one sum of p_t (log p_t - log p_s): no cancellation
        coef = w * (kd_weight * (temperature ** 2 if scale_t2 else 1.0))
        total = total + (kl * coef).sum()
        grad = log_ps.exp_().sub_(p_t).mul_((coef / temperature).unsqueeze(-1))  # in place over log_ps
        del log_pt, p_t
    if ce_weight != 0:
        keep = targets != -100
        ids = torch.where(keep, targets, 0).long().unsqueeze(-1)
        coef = w * keep.to(dt) * ce_weight
        log_p = log_probs(student_logits.detach(), 1.0)
        total = total + (-log_p.gather(-1, ids).squeeze(-1) * coef).sum()
        g = log_p.exp_()
        g.scatter_add_(-1, ids, -torch.ones_like(ids, dtype=g.dtype)).mul_(coef.unsqueeze(-1))
        grad = g if grad is None else grad.add_(g)
    if grad is None:
        grad = torch.zeros(student_logits.shape, dtype=dt, device=student_logits.device)
    return total, grad


# ----------------------------------------------------------------------------------------------- top-k teacher
@torch.no_grad()
def topk_teacher(teacher_logits: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Compress teacher logits (N, V) at ``temperature`` to (topk_logprobs fp32 (N, k), topk_ids int64 (N, k),
    tail_logmass fp32 (N,)): the top-k of ``log_softmax(logits / temperature)`` and the log of the probability mass
    outside them (-inf if k == V). Computed without grad. Cast for storage as the caller likes (fp16, int32)."""
    if teacher_logits.dim() != 2:
        raise ValueError(f"expected (N, V) teacher logits, got {tuple(teacher_logits.shape)}")
    v = teacher_logits.shape[1]
    if not 1 <= k <= v:
        raise ValueError(f"k must be in [1, V={v}], got {k}")
    check_loss_args("forward_kl", temperature, 0.0, 0.0, None)
    logp = F.log_softmax(_float(teacher_logits) / temperature, dim=-1)
    vals, ids = logp.topk(k, dim=-1)
    return vals, ids, _tail_logsumexp(logp, ids)


def topk_distill_loss(student_logits: Tensor, topk_logprobs: Tensor, topk_ids: Tensor, tail_logmass: Tensor, *,
                      kind: str = "forward_kl", temperature: float = 2.0, scale_t2: bool = True, beta: float = 0.5,
                      ce_weight: float = 0.0, targets: Optional[Tensor] = None,
                      weights: Optional[Tensor] = None, kd_weight: float = 1.0,
                      teacher_tempered: bool = False) -> Tensor:
    """distill_loss against a cached top-k teacher, over k+1 bins (see module docstring).

    student_logits (N, V); topk_logprobs (N, k) any float dtype; topk_ids (N, k) int (distinct per row, < V);
    tail_logmass (N,); targets/weights (N,) as in distill_loss. ``teacher_tempered``: the cached values are already at
    ``temperature`` (only the student is tempered); else they are T=1 values tempered over the bins (approximate for
    T != 1). Returns a 0-dim fp32 tensor."""
    check_loss_args(kind, temperature, beta, ce_weight, targets)
    if student_logits.dim() != 2:
        raise ValueError(f"expected (N, V) student logits, got {tuple(student_logits.shape)}")
    n, v = student_logits.shape
    if topk_logprobs.dim() != 2 or topk_logprobs.shape[0] != n or topk_ids.shape != topk_logprobs.shape:
        raise ValueError(f"topk_logprobs/topk_ids must both be (N={n}, k), got {tuple(topk_logprobs.shape)} and "
                         f"{tuple(topk_ids.shape)}")
    if topk_logprobs.shape[1] > v:
        raise ValueError(f"vocabulary size mismatch: k={topk_logprobs.shape[1]} > student V={v}")
    check_per_token(n, tail_logmass=tail_logmass, targets=targets, weights=weights)
    s = _float(student_logits)
    ids = topk_ids.long()
    t_bins = torch.cat([topk_logprobs.detach().to(s.dtype), tail_logmass.detach().to(s.dtype).unsqueeze(-1)], -1)
    log_pt = F.log_softmax(t_bins if teacher_tempered else t_bins / temperature, dim=-1)
    log_ps_full = F.log_softmax(s / temperature, dim=-1)
    log_ps = torch.cat([log_ps_full.gather(-1, ids), _tail_logsumexp(log_ps_full, ids).unsqueeze(-1)], -1)
    return _reduce(_kd(log_ps, log_pt, kind, beta), s, temperature, scale_t2, ce_weight, targets, weights,
                   kd_weight)
