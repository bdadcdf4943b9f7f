"""Tests for ssb.losses and ssb.chunked_losses against a plain float64 full-vocabulary reference (offline, CPU,
fast)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ssb.chunked_losses import chunked_distill_loss, chunked_topk_distill_loss
from ssb.losses import LOG_FLOOR, LOSSES, distill_loss, forward_kl_and_grad, topk_distill_loss, topk_teacher

N, V, H = 13, 37, 8


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _logits(n=N, v=V, seed=0, scale=2.0):
    g = _gen(seed)
    return torch.randn(n, v, generator=g) * scale, torch.randn(n, v, generator=g) * scale


def reference(s, t, kind, T, scale_t2=True, beta=0.5, ce_weight=0.0, targets=None, weights=None):
    """Plain float64 full-vocabulary reference, written from the definitions."""
    s, t = s.double(), t.double()
    ps, pt = torch.softmax(s / T, -1), torch.softmax(t / T, -1)

    def kl(p, q):
        return (p * (p.log() - q.log())).sum(-1)

    if kind == "forward_kl":
        kd = kl(pt, ps)
    elif kind == "reverse_kl":
        kd = kl(ps, pt)
    else:
        m = beta * pt + (1 - beta) * ps
        kd = beta * kl(pt, m) + (1 - beta) * kl(ps, m)
    loss = kd * (T * T if scale_t2 else 1.0)
    if ce_weight:
        loss = loss - ce_weight * torch.log_softmax(s, -1).gather(-1, targets[:, None]).squeeze(-1)
    if weights is not None:
        loss = loss * weights.double()
    return loss.sum()


def _value_and_grad(fn, x):
    x = x.clone().requires_grad_(True)
    out = fn(x)
    (g,) = torch.autograd.grad(out, x)
    return out.detach(), g


def _seq_weights(n=N):
    # per-sequence averaging: 3 sequences of lengths 4, 6, 3 -> each token weighs 1/len(seq)
    lens = [4, 6, n - 10]
    return torch.cat([torch.full((L,), 1.0 / L) for L in lens])


# ------------------------------------------------------------------------------------------- full vocabulary
@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("T", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("scale_t2", [True, False])
@pytest.mark.parametrize("extras", ["plain", "ce_weights"])
def test_matches_float64_reference(kind, T, scale_t2, extras):
    s, t = _logits(seed=1)
    kw = dict(kind=kind, temperature=T, scale_t2=scale_t2, beta=0.3)
    if extras == "ce_weights":
        kw.update(ce_weight=0.7, targets=torch.randint(0, V, (N,), generator=_gen(2)), weights=_seq_weights())
    val, grad = _value_and_grad(lambda x: distill_loss(x, t, **kw), s)
    rval, rgrad = _value_and_grad(lambda x: reference(x, t.double(), T=T, **{k: v for k, v in kw.items()
                                                                            if k not in ("kind", "temperature")},
                                                      kind=kind), s.double())
    assert val.dtype == torch.float32
    torch.testing.assert_close(val.double(), rval, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.double(), rgrad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("T", [0.5, 2.0])
@pytest.mark.parametrize("scale_t2", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_forward_kl_written_out_matches_float64_reference(T, scale_t2, weighted):
    """The fast path's value and explicit gradient against autograd through the float64 definition."""
    s, t = _logits(seed=30)
    weights = _seq_weights() if weighted else None
    val, grad = forward_kl_and_grad(s, t, temperature=T, scale_t2=scale_t2, kd_weight=0.8, weights=weights)
    rval, rgrad = _value_and_grad(lambda x: 0.8 * reference(x, t, "forward_kl", T, scale_t2, weights=weights),
                                  s.double())
    assert val.dtype == grad.dtype == torch.float32 and grad.shape == s.shape
    torch.testing.assert_close(val.double(), rval, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.double(), rgrad, rtol=1e-5, atol=1e-7)
    # bf16 logits (the model's): upcast, the same numbers as through distill_loss's autograd
    sb, tb = s.bfloat16(), t.bfloat16()
    bval, bgrad = forward_kl_and_grad(sb, tb, temperature=T, scale_t2=scale_t2, kd_weight=0.8, weights=weights)
    aval, agrad = _value_and_grad(lambda x: distill_loss(x, tb, temperature=T, scale_t2=scale_t2, kd_weight=0.8,
                                                         weights=weights), sb.float())
    torch.testing.assert_close(bval, aval, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bgrad, agrad, rtol=1e-5, atol=1e-7)


def test_forward_kl_written_out_with_masked_teacher_tokens_is_finite():
    s, t = _logits(seed=31)
    t[:, :5] = float("-inf")  # tokens the teacher never emits: 0 log 0 = 0, no NaN
    val, grad = forward_kl_and_grad(s, t, temperature=2.0)
    want, wgrad = _value_and_grad(lambda x: distill_loss(x, t, temperature=2.0), s)
    assert torch.isfinite(val) and torch.isfinite(grad).all()
    torch.testing.assert_close(val, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, wgrad, rtol=1e-5, atol=1e-7)
    assert LOG_FLOOR < 0


@pytest.mark.parametrize("kd_weight", [0.0, 0.8])
@pytest.mark.parametrize("weighted", [False, True])
def test_written_out_with_ce_matches_float64_reference(kd_weight, weighted):
    """SFT/RFT (kd_weight 0, no teacher) and KD + CE: value and gradient against the float64 definition; a target of
    -100 contributes nothing."""
    s, t = _logits(seed=33)
    targets = torch.randint(0, V, (N,), generator=_gen(34))
    weights = _seq_weights() if weighted else None
    val, grad = forward_kl_and_grad(s, None if kd_weight == 0 else t, temperature=2.0, kd_weight=kd_weight,
                                    ce_weight=0.7, targets=targets, weights=weights)
    rval, rgrad = _value_and_grad(lambda x: kd_weight * reference(x, t, "forward_kl", 2.0, weights=weights)
                                  + reference(x, t, "forward_kl", 2.0, ce_weight=0.7, targets=targets,
                                              weights=weights) - reference(x, t, "forward_kl", 2.0, weights=weights),
                                  s.double())
    torch.testing.assert_close(val.double(), rval, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.double(), rgrad, rtol=1e-5, atol=1e-6)
    ignored = targets.clone()
    ignored[3] = -100
    _, g = forward_kl_and_grad(s, None, kd_weight=0.0, ce_weight=1.0, targets=ignored)
    assert torch.count_nonzero(g[3]) == 0 and torch.count_nonzero(g[2]) == V
    with pytest.raises(ValueError, match="kd_weight"):
        forward_kl_and_grad(s, None, kd_weight=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_ce_only_fast_path_matches_autograd(dtype, monkeypatch):
    """SFT and RFT (kd_weight 0, ce_weight 1, no teacher hidden states) take the written-out path too."""
    import ssb.chunked_losses

    calls = []
    real = ssb.chunked_losses.forward_kl_and_grad
    monkeypatch.setattr(ssb.chunked_losses, "forward_kl_and_grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    sh, _, w, b = _hidden(seed=35, bias=True)
    sh, w, b = sh.to(dtype), w.to(dtype), b.to(dtype)
    targets = torch.randint(0, V, (N,), generator=_gen(36))
    targets[0] = -100
    kw = dict(kd_weight=0.0, ce_weight=1.0, targets=targets, weights=_seq_weights())

    def run(chunked):
        h = sh.clone().requires_grad_(True)
        loss = (chunked_distill_loss(h, None, w, lm_head_bias=b, chunk_size=5, **kw) if chunked
                else distill_loss(F.linear(h, w, b), None, **kw))
        (loss * 1.3).backward()
        return loss.detach(), h.grad.float()

    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, **tol)
    assert len(calls) == -(-N // 5)


@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_forward_kl_fast_path_matches_autograd(chunk_size, dtype, monkeypatch):
    """chunked_distill_loss with a frozen lm_head, forward KL and no CE (the distill stage's default) takes the
    written-out gradient: the same loss and hidden-state gradient as autograd through the unchunked loss."""
    import ssb.chunked_losses

    calls = []
    real = ssb.chunked_losses.forward_kl_and_grad
    monkeypatch.setattr(ssb.chunked_losses, "forward_kl_and_grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    sh, th, w, b = _hidden(seed=32, bias=True)
    sh, th, w, b = sh.to(dtype), th.to(dtype), w.to(dtype), b.to(dtype)
    kw = dict(temperature=2.0, weights=_seq_weights(), kd_weight=0.9)

    def run(chunked):
        h = sh.clone().requires_grad_(True)
        loss = (chunked_distill_loss(h, th, w, lm_head_bias=b, chunk_size=chunk_size, **kw) if chunked
                else distill_loss(F.linear(h, w, b), F.linear(th, w, b), **kw))
        (loss * 1.3).backward()
        return loss.detach(), h.grad.float()

    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    for got, want in zip(run(True), run(False)):
        torch.testing.assert_close(got, want, **tol)
    assert len(calls) == -(-N // chunk_size)  # one per chunk: the fast path ran


def test_jsd_beta_edge_cases():
    s, t = _logits(seed=3)
    fwd = distill_loss(s, t, kind="forward_kl")
    rev = distill_loss(s, t, kind="reverse_kl")
    # TRL convention: beta=0 -> forward KL, beta=1 -> reverse KL (exactly)
    torch.testing.assert_close(distill_loss(s, t, kind="jsd", beta=0.0), fwd)
    torch.testing.assert_close(distill_loss(s, t, kind="jsd", beta=1.0), rev)
    # ...which are the limits of the scaled JSD
    b = 1e-4
    torch.testing.assert_close(distill_loss(s, t, kind="jsd", beta=b) / b, fwd, rtol=2e-3, atol=0)
    torch.testing.assert_close(distill_loss(s, t, kind="jsd", beta=1 - b) / b, rev, rtol=2e-3, atol=0)
    # symmetric JSD is symmetric and bounded by log 2 per token (times T^2)
    j = distill_loss(s, t, kind="jsd", beta=0.5, scale_t2=False)
    torch.testing.assert_close(j, distill_loss(t, s, kind="jsd", beta=0.5, scale_t2=False))
    assert 0 < j < N * math.log(2)
    with pytest.raises(ValueError):
        distill_loss(s, t, kind="jsd", beta=1.5)


def test_identical_distributions_give_zero():
    s, _ = _logits(seed=4)
    for kind in LOSSES:
        assert abs(distill_loss(s, s.clone(), kind=kind).item()) < 1e-5


def test_small_temperature_and_invalid_temperature():
    s, t = _logits(seed=5, scale=5.0)
    for kind in LOSSES:
        val, grad = _value_and_grad(lambda x: distill_loss(x, t, kind=kind, temperature=0.05), s)
        assert torch.isfinite(val) and torch.isfinite(grad).all()
        rval = reference(s, t, kind, 0.05)
        torch.testing.assert_close(val.double(), rval, rtol=1e-4, atol=1e-6)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            distill_loss(s, t, temperature=bad)
        with pytest.raises(ValueError, match="temperature"):
            chunked_distill_loss(torch.randn(2, H), torch.randn(2, H), torch.randn(V, H), temperature=bad)


@pytest.mark.parametrize("kind", LOSSES)
def test_teacher_with_zero_probabilities(kind):
    s, t = _logits(seed=6)
    t[:, :5] = float("-inf")  # teacher prob exactly 0 on 5 tokens
    val, grad = _value_and_grad(lambda x: distill_loss(x, t, kind=kind, ce_weight=0.1,
                                                      targets=torch.full((N,), 7)), s)
    assert torch.isfinite(val) and torch.isfinite(grad).all()
    if kind == "forward_kl":  # zero-prob tokens simply drop out of sum p_t log(p_t/p_s): exact
        ps = torch.softmax(s.double() / 2, -1)
        pt = torch.softmax(t.double() / 2, -1)[:, 5:]
        ref = 4 * (pt * (pt.log() - ps[:, 5:].log())).sum() + 0.1 * F.cross_entropy(s.double(), torch.full((N,), 7),
                                                                                   reduction="sum")
        torch.testing.assert_close(val.double(), ref, rtol=1e-5, atol=1e-6)
    if kind == "reverse_kl":  # infinite KL made finite with log q -> LOG_FLOOR; pushes student mass off
        assert val > 0 and (grad[:, :5] > 0).all()
    # student also -inf on the same tokens (e.g. padded vocab rows): still finite, zero grad there
    s2 = s.clone()
    s2[:, :5] = float("-inf")
    val2, grad2 = _value_and_grad(lambda x: distill_loss(x, t, kind=kind), s2)
    assert torch.isfinite(val2) and torch.isfinite(grad2).all() and (grad2[:, :5] == 0).all()
    torch.testing.assert_close(val2.double(), reference(s[:, 5:], t[:, 5:], kind, 2.0), rtol=1e-5, atol=1e-6)


def test_zero_weights_and_empty_input():
    s, t = _logits(seed=7)
    for kind in LOSSES:
        val, grad = _value_and_grad(lambda x: distill_loss(x, t, kind=kind, weights=torch.zeros(N)), s)
        assert val.item() == 0.0 and (grad == 0).all()
        val, grad = _value_and_grad(lambda x: distill_loss(x, t[:0], kind=kind, ce_weight=1.0,
                                                          targets=torch.zeros(0, dtype=torch.long)), s[:0])
        assert val.item() == 0.0 and grad.shape == (0, V)
    # chunked, N == 0: 0 loss, zero (not None) grads for the lm_head
    w = torch.randn(V, H, requires_grad=True)
    h = torch.randn(0, H, requires_grad=True)
    loss = chunked_distill_loss(h, torch.randn(0, H), w, chunk_size=4)
    loss.backward()
    assert loss.item() == 0.0 and w.grad is not None and (w.grad == 0).all()


def test_validation_errors():
    s, t = _logits(seed=8)
    with pytest.raises(ValueError, match="vocabulary size mismatch"):
        distill_loss(s, t[:, :-1])
    with pytest.raises(ValueError, match="vocabulary size mismatch"):
        chunked_distill_loss(torch.randn(3, H), torch.randn(3, H), torch.randn(V, H),
                             teacher_lm_head_weight=torch.randn(V + 1, H))
    with pytest.raises(ValueError, match="vocabulary size mismatch"):
        topk_distill_loss(s[:, :3], *topk_teacher(t, 5))
    with pytest.raises(ValueError, match="kind"):
        distill_loss(s, t, kind="kl")
    with pytest.raises(ValueError, match="targets"):
        distill_loss(s, t, ce_weight=1.0)
    with pytest.raises(ValueError, match="weights"):
        distill_loss(s, t, weights=torch.ones(N + 1))
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_distill_loss(torch.randn(3, H), torch.randn(3, H), torch.randn(V, H), chunk_size=0)


def test_bf16_inputs_computed_in_fp32():
    s, t = _logits(seed=9)
    sb, tb = s.bfloat16(), t.bfloat16()
    for kind in LOSSES:
        x = sb.clone().requires_grad_(True)
        val = distill_loss(x, tb, kind=kind)
        val.backward()
        assert val.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
        # exactly the fp32 computation on the bf16-rounded values
        torch.testing.assert_close(val, distill_loss(sb.float(), tb.float(), kind=kind), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------- chunked
def _hidden(n=N, seed=10, bias=False):
    g = _gen(seed)
    sh, th = torch.randn(n, H, generator=g), torch.randn(n, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.5
    b = torch.randn(V, generator=g) if bias else None
    return sh, th, w, b


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("chunk_size", [1, 4, 5, N, 1000])
@pytest.mark.parametrize("frozen_head", [False, True])  # True: the distill stage's case (fused chunks)
def test_chunked_matches_unchunked(kind, chunk_size, frozen_head):
    sh, th, w, b = _hidden(bias=True)
    kw = dict(kind=kind, temperature=1.5, ce_weight=0.3, targets=torch.randint(0, V, (N,), generator=_gen(11)),
              weights=_seq_weights())

    def run(chunked):
        h, ww = sh.clone().requires_grad_(True), w.clone().requires_grad_(not frozen_head)
        if chunked:
            loss = chunked_distill_loss(h, th, ww, lm_head_bias=b, chunk_size=chunk_size, **kw)
        else:
            loss = distill_loss(F.linear(h, ww, b), F.linear(th, ww, b).detach(), **kw)
        (loss * 0.7).backward()  # the upstream gradient is applied
        return loss.detach(), h.grad, ww.grad

    for got, want in zip(run(True), run(False)):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_chunked_separate_teacher_head():
    sh, th, w, _ = _hidden(seed=12)
    tw = torch.randn(V, H, generator=_gen(13))
    tb = torch.randn(V, generator=_gen(14))
    got = chunked_distill_loss(sh, th, w, teacher_lm_head_weight=tw, teacher_lm_head_bias=tb, chunk_size=3)
    torch.testing.assert_close(got, distill_loss(sh @ w.T, th @ tw.T + tb), rtol=1e-5, atol=1e-6)


class _MaxTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor produced by any op (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                self.max_numel = max(self.max_numel, o.numel())
        return out


def _saved_bytes(fn, exclude=()):
    """Bytes of distinct storages saved for backward by fn(), not counting the storages of `exclude` (the inputs
    and lm_head weight, which the caller holds anyway). Only sees what is saved outside checkpointed regions."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(x):
        st = x.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = fn()
    return loss, sum(seen.values())


@pytest.mark.parametrize("kind", LOSSES)
def test_chunked_does_not_keep_full_logits(kind):
    n, v, h, chunk = 256, 512, 16, 16
    g = _gen(15)
    sh = torch.randn(n, h, generator=g, requires_grad=True)
    th = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g, requires_grad=True)
    full_logits_bytes = n * v * 4

    inputs = (sh, th, w)
    loss_u, saved_u = _saved_bytes(lambda: distill_loss(F.linear(sh, w), F.linear(th, w).detach(), kind=kind),
                                   inputs)
    assert saved_u >= full_logits_bytes  # unchunked path keeps (N, V) fp32 activations for backward

    loss_c, saved_c = _saved_bytes(lambda: chunked_distill_loss(sh, th, w, chunk_size=chunk, kind=kind), inputs)
    assert saved_c < full_logits_bytes / 50
    torch.testing.assert_close(loss_c, loss_u, rtol=1e-5, atol=1e-5)
    # a frozen lm_head (the distill stage): fused chunks keep only the hidden states' gradient, (N, H)
    frozen = w.detach()
    loss_f, saved_f = _saved_bytes(lambda: chunked_distill_loss(sh, th, frozen, chunk_size=chunk, kind=kind),
                                   (sh, th, frozen))
    assert saved_f <= n * h * 4 < full_logits_bytes / 25
    torch.testing.assert_close(loss_f, loss_u, rtol=1e-5, atol=1e-5)
    with _MaxTensor() as mode:
        chunked_distill_loss(sh, th, frozen, chunk_size=chunk, kind=kind).backward()
    assert mode.max_numel <= max(chunk * v, v * h) < n * v / 4

    # and no single tensor of (N, V) size is ever created, neither in forward nor in backward
    with _MaxTensor() as mode:
        chunked_distill_loss(sh, th, w, chunk_size=chunk, kind=kind).backward()
    assert mode.max_numel <= max(chunk * v, v * h) < n * v / 4

    lp, ids, tail = topk_teacher(F.linear(th, w), 8)
    _, saved_k = _saved_bytes(lambda: chunked_topk_distill_loss(sh, lp, ids, tail, w, chunk_size=chunk, kind=kind),
                              (sh, lp, ids, tail, w))
    assert saved_k < full_logits_bytes / 50


# ------------------------------------------------------------------------------------------- top-k
def test_topk_teacher_tail_mass():
    _, t = _logits(seed=16)
    k = 5
    lp, ids, tail = topk_teacher(t, k)
    assert lp.dtype == torch.float32 and ids.dtype == torch.int64 and lp.shape == ids.shape == (N, k)
    full = torch.log_softmax(t.double(), -1)
    torch.testing.assert_close(lp.double(), full.gather(-1, ids), rtol=1e-6, atol=1e-6)
    assert (lp.double() >= full.topk(k, -1).values.min(-1, keepdim=True).values - 1e-6).all()
    mask = torch.ones_like(full, dtype=torch.bool).scatter(-1, ids, False)
    want_tail = torch.logsumexp(full.masked_fill(~mask, float("-inf")), -1)
    torch.testing.assert_close(tail.double(), want_tail, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tail.exp() + lp.exp().sum(-1), torch.ones(N), rtol=1e-5, atol=1e-6)
    assert torch.isneginf(topk_teacher(t, V)[2]).all()  # k == V: empty tail
    with pytest.raises(ValueError):
        topk_teacher(t, V + 1)


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("T", [0.5, 1.0, 2.0])
def test_topk_with_k_equal_V_matches_full(kind, T):
    s, t = _logits(seed=17)
    lp, ids, tail = topk_teacher(t, V)
    kw = dict(kind=kind, temperature=T, ce_weight=0.2, targets=torch.randint(0, V, (N,), generator=_gen(18)),
              weights=_seq_weights())
    val, grad = _value_and_grad(lambda x: topk_distill_loss(x, lp, ids.int(), tail, **kw), s)
    rval, rgrad = _value_and_grad(lambda x: distill_loss(x, t, **kw), s)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0  # gradient flows to the student
    torch.testing.assert_close(val, rval, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, rgrad, rtol=1e-5, atol=1e-6)


def test_topk_close_for_peaked_teacher():
    g = _gen(19)
    s = torch.randn(N, V, generator=g)
    t = torch.randn(N, V, generator=g)
    t[torch.arange(N), torch.randint(0, V, (N,), generator=g)] += 14.0  # peaked teacher
    s = s + 0.5 * t
    k = 8
    lp, ids, tail = topk_teacher(t, k)
    p_tail = tail.double().exp()
    assert p_tail.max() < 1e-3
    # T = 1, forward KL (per token): 0 <= full - binned = P_tail * KL(tail-conditionals) <= P_tail * max |log ratio|
    full = torch.stack([distill_loss(s[i:i + 1], t[i:i + 1], temperature=1.0) for i in range(N)]).double()
    binned = torch.stack([topk_distill_loss(s[i:i + 1], lp[i:i + 1], ids[i:i + 1], tail[i:i + 1], temperature=1.0)
                          for i in range(N)]).double()
    lt, ls = torch.log_softmax(t.double(), -1), torch.log_softmax(s.double(), -1)
    outside = torch.ones(N, V, dtype=torch.bool).scatter(-1, ids, False)
    cond_t = lt - torch.logsumexp(lt.masked_fill(~outside, -math.inf), -1, keepdim=True)
    cond_s = ls - torch.logsumexp(ls.masked_fill(~outside, -math.inf), -1, keepdim=True)
    bound = p_tail * ((cond_t - cond_s).abs().masked_fill(~outside, 0).amax(-1))
    assert (full - binned >= -1e-6).all() and (full - binned <= bound + 1e-6).all()
    # all three are f-divergences: collapsing onto bins can only lower them at T = 1 (data-processing inequality)
    for kind in ("reverse_kl", "jsd"):
        f = distill_loss(s, t, kind=kind, temperature=1.0)
        assert topk_distill_loss(s, lp, ids, tail, kind=kind, temperature=1.0) <= f + 1e-6
    # fp16/int32 storage of the cached teacher: forward KL at T = 1 stays within 1%
    f = distill_loss(s, t, temperature=1.0)
    b = topk_distill_loss(s, lp.half(), ids.int(), tail.half(), temperature=1.0)
    assert abs(f - b) <= 0.01 * f


def test_topk_teacher_at_a_temperature():
    _, t = _logits(seed=24)
    lp, ids, tail = topk_teacher(t, 5, temperature=2.0)
    lp1, ids1, _ = topk_teacher(t, 5)
    assert torch.equal(ids, ids1)  # tempering is monotone: same tokens
    full = torch.log_softmax(t.double() / 2.0, -1)
    torch.testing.assert_close(lp.double(), full.gather(-1, ids), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tail.exp() + lp.exp().sum(-1), torch.ones(N), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(lp, lp1)
    with pytest.raises(ValueError):
        topk_teacher(t, 5, temperature=0.0)


@pytest.mark.parametrize("kind", LOSSES)
def test_tempered_cache_with_k_equal_V_equals_online_loss_at_T2(kind):
    s, t = _logits(seed=25)
    lp, ids, tail = topk_teacher(t, V, temperature=2.0)
    kw = dict(kind=kind, temperature=2.0, ce_weight=0.3, targets=torch.randint(0, V, (N,), generator=_gen(26)),
              weights=_seq_weights(), kd_weight=0.7)
    val, grad = _value_and_grad(lambda x: topk_distill_loss(x, lp, ids.int(), tail, teacher_tempered=True, **kw), s)
    rval, rgrad = _value_and_grad(lambda x: distill_loss(x, t, **kw), s)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(val, rval, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, rgrad, rtol=1e-5, atol=1e-6)
    # the T=1 cache read as if tempered is a different (wrong) loss: the flag matters
    lp1, ids1, tail1 = topk_teacher(t, V)
    assert not torch.allclose(topk_distill_loss(s, lp1, ids1, tail1, teacher_tempered=True, **kw), rval, rtol=1e-2)


def test_tempered_cache_is_close_for_peaked_teacher_at_T2_and_legacy_is_not():
    g = _gen(27)
    n, v, k, T = 16, 2000, 32, 2.0
    t = torch.randn(n, v, generator=g) * 2
    t[torch.arange(n), torch.randint(0, v, (n,), generator=g)] += 30.0  # peaked teacher
    s = torch.randn(n, v, generator=g) * 2 + 0.5 * t
    lp, ids, tail = topk_teacher(t, k, temperature=T)
    assert tail.exp().max() < 1e-2  # tempered tail mass (at T=1 it is ~1e-8)
    lp16, ids32 = lp.half(), ids.int()  # stored as in the cache
    for kind in LOSSES:
        full = distill_loss(s, t, kind=kind, temperature=T)
        cached = topk_distill_loss(s, lp16, ids32, tail, kind=kind, temperature=T, teacher_tempered=True)
        assert cached <= full * (1 + 1e-3)  # binning never increases an f-divergence (up to fp16 rounding)
        if kind != "reverse_kl":  # reverse KL also weighs the student's own tail mass, which may be large
            assert abs(cached - full) <= 0.01 * full
    full = distill_loss(s, t, temperature=T)
    cached = topk_distill_loss(s, lp16, ids32, tail, temperature=T, teacher_tempered=True)
    lp1, ids1, tail1 = topk_teacher(t, k)  # legacy: T=1 cache tempered over bins, tail as one token
    legacy = topk_distill_loss(s, lp1, ids1, tail1, temperature=T)
    assert abs(legacy - full) > 5 * abs(cached - full)


@pytest.mark.parametrize("chunk_size", [3, 100])
@pytest.mark.parametrize("tempered", [False, True])
@pytest.mark.parametrize("frozen_head", [False, True])
def test_chunked_topk_matches_unchunked(chunk_size, tempered, frozen_head):
    sh, _, w, b = _hidden(seed=20, bias=True)
    _, th, _, _ = _hidden(seed=21)
    lp, ids, tail = topk_teacher(F.linear(th, w, b), 6, temperature=2.0 if tempered else 1.0)
    lp, ids, tail = lp.bfloat16(), ids.int(), tail.bfloat16()
    kw = dict(kind="jsd", temperature=2.0, ce_weight=0.5, targets=torch.randint(0, V, (N,), generator=_gen(22)),
              weights=_seq_weights(), teacher_tempered=tempered, kd_weight=0.8)

    def run(chunked):
        h, ww = sh.clone().requires_grad_(True), w.clone().requires_grad_(not frozen_head)
        if chunked:
            loss = chunked_topk_distill_loss(h, lp, ids, tail, ww, lm_head_bias=b, chunk_size=chunk_size, **kw)
        else:
            loss = topk_distill_loss(F.linear(h, ww, b), lp, ids, tail, **kw)
        loss.backward()
        return loss.detach(), h.grad, ww.grad

    got, want = run(True), run(False)
    assert want[1].abs().sum() > 0
    for a, e in zip(got, want):
        if e is None:
            assert a is None
        else:
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_chunked_without_grad():
    sh, th, w, _ = _hidden(seed=23)
    with torch.no_grad():
        got = chunked_distill_loss(sh, th, w, chunk_size=4, kind="jsd")
        want = distill_loss(sh @ w.T, th @ w.T, kind="jsd")
    assert not got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_kd_weight_scales_divergence_and_none_teacher_is_pure_ce():
    torch.manual_seed(0)
    s = torch.randn(6, 11, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 11, dtype=torch.float64)
    y = torch.randint(0, 11, (6,))
    full = distill_loss(s, t, ce_weight=0.0)
    half = distill_loss(s, t, kd_weight=0.5, ce_weight=0.0)
    torch.testing.assert_close(half, 0.5 * full)
    ce = distill_loss(s, None, kd_weight=0.0, ce_weight=1.0, targets=y)
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(s, y, reduction="sum"))
    with pytest.raises(ValueError):
        distill_loss(s, None, ce_weight=1.0, targets=y)
    h = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 4, dtype=torch.float64)
    chunked = chunked_distill_loss(h, None, w, kd_weight=0.0, ce_weight=1.0, targets=y, chunk_size=4)
    torch.testing.assert_close(chunked, torch.nn.functional.cross_entropy(h @ w.T, y, reduction="sum"))
