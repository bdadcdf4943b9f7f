"""The LoRA training loop shared by distill and its ablations (SFT, RFT): data parallel, checkpointed, resumable.

Invariance to the number of processes: every optimizer step consumes one *global* batch of ``batch_size`` example
indices (a seeded shuffle per epoch). Rank ``r`` of ``w`` takes ``batch[r::w]``, computes the *sum* of its
per-token losses, divides by the global normaliser (tokens or sequences of the whole global batch, known locally),
and the LoRA gradients are summed across ranks. That is exactly the single-process gradient, so 1 and N
processes follow the same loss curve up to floating-point summation order.

With FSDP (``distill.fsdp``, :func:`ssb.dist.fsdp_shard`) the parameters are DTensor shards: FSDP's reduce-scatter
sums the gradients (no manual all-reduce), a rank with no example in a global batch still runs forward and backward
on one example with weight 0 (FSDP's collectives must match across ranks), and checkpoints gather every shard into
the same whole-tensor files as without FSDP (and scatter them back on resume), so either can resume the other.

Checkpoints (every ``save_every`` steps, rank 0, atomically in ``<stage>/checkpoint/``): trainable weights and
AdamW state as safetensors, step, torch RNG states (CPU, and CUDA when used: dropout on a GPU draws from it), and
the data position (which is the step: the order of every epoch is a function of the seed), and the tokens trained
and seconds spent training up to that step. Resuming
loads them, replays the learning-rate schedule to that step, drops log rows after it and continues; the end weights
equal an uninterrupted run's, and so do ``trained_tokens`` (``train_seconds`` adds every process's time up to its
last checkpoint).

Non-finite gradients: a step whose gradient norm is NaN or infinite is skipped (no optimizer update; the schedule
moves on) and logged with ``"skipped": true``, as loss scalers do; more than 10% of steps (and at least 3) is
divergence and an error, and weights that are not finite at the end are never saved. (On the testbed GPU run a
bf16 distill met one such batch at step 60 and, before this guard, every weight became NaN.)
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from ssb import dist
from ssb.atomic import publishing
from ssb.errors import SsbError
from ssb.progress import progress
from ssb.rows import append_rows, read_rows, write_rows

CKPT = "checkpoint"


@dataclass(kw_only=True)
class TrainSpec:
    n_examples: int
    batch_size: int
    epochs: int
    max_steps: int | None
    lr: float
    weight_decay: float
    warmup_steps: int
    schedule: str
    max_grad_norm: float
    save_every: int
    seed: int


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return order


def train(model, spec: TrainSpec, stage_dir: Path, step_loss: Callable[[list[int]], tuple[torch.Tensor, int]],
          norm_of: Callable[[list[int]], float], before_step: Callable[[int, list[int]], dict] | None = None,
          on_log: Callable[[dict], None] | None = None) -> dict:
    """Train ``model``'s trainable parameters. ``step_loss(indices)`` returns (sum of per-token losses over those
    examples, their token count); ``norm_of(indices)`` the normaliser of a global batch. ``before_step(step,
    indices)``, if given, runs first in every step, on every rank, with the global batch (0-based ``step``) and
    returns extra fields for the step's log row: on-policy distillation samples the step's replies there.
    Appends ``train_log.jsonl`` rows (rank 0) and passes each to ``on_log`` (a tracker). Returns {steps,
    trained_tokens, train_seconds, skipped_steps}."""
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    per_epoch = math.ceil(spec.n_examples / spec.batch_size)
    total = spec.max_steps or spec.epochs * per_epoch
    opt, sched = _optimizer(params, spec, total)
    log_path = stage_dir / "train_log.jsonl"
    resumed = _resume(stage_dir, model, opt, sched, log_path)
    step = resumed.get("step", 0)
    tokens_before, seconds_before = resumed.get("trained_tokens", 0), resumed.get("train_seconds", 0.0)
    sharded = any(isinstance(p, DTensor) for p in params)

    model.train()
    t_start, trained, skipped = time.time(), 0, list(resumed.get("skipped_steps", []))
    bar = progress(total, "distill", "step") if dist.is_main() else None
    if bar is not None:
        bar.update(step)
    while step < total:
        epoch, b = divmod(step, per_epoch)
        t0 = time.time()
        idx = epoch_order(spec.n_examples, spec.seed, epoch)[b * spec.batch_size:(b + 1) * spec.batch_size]
        extra = before_step(step, idx) if before_step is not None else {}
        norm = norm_of(idx)
        stats = _backward(idx, step_loss, norm, sharded)
        if not sharded:
            _sync_grads(params)
        stats = dist.all_reduce_sum(stats)
        lr = sched.get_last_lr()[0]  # the rate this step updates with (the scheduler then moves to the next)
        norm_val, finite = _update(params, opt, sched, spec.max_grad_norm, skipped, step + 1)
        step += 1
        trained += int(stats[1])
        if dist.is_main():
            _log(log_path, bar, {"step": step, "epoch": epoch, "loss": float(stats[0]) / norm,
                                 "grad_norm": float(norm_val), "lr": lr},
                 int(stats[1]), time.time() - t0, finite, extra, on_log)
        if spec.save_every and step % spec.save_every == 0 and step < total:
            save_checkpoint(stage_dir, model, opt, step, trained_tokens=tokens_before + trained,
                            train_seconds=seconds_before + time.time() - t_start,
                            skipped_steps=skipped)  # every rank: collective
        dist.barrier()
    if bar is not None:
        bar.close()
    bad = [n for n, p in zip(names, params) if not bool(torch.isfinite(full_tensor(p.detach())).all())]
    if bad:
        raise SsbError(f"training produced non-finite weights ({bad[0]} and {len(bad) - 1} more); not saving them")
    return {"steps": step, "trained_tokens": tokens_before + trained,
            "train_seconds": round(seconds_before + time.time() - t_start, 3), "skipped_steps": skipped}


def _optimizer(params: list[torch.Tensor], spec: TrainSpec, total: int):
    """AdamW over ``params`` and its learning-rate schedule over ``total`` steps."""
    from transformers import get_scheduler

    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return opt, get_scheduler(spec.schedule, opt, num_warmup_steps=spec.warmup_steps, num_training_steps=total)


def _backward(idx: list[int], step_loss, norm: float, sharded: bool) -> torch.Tensor:
    """This rank's share of the global batch ``idx``: forward, backward of (loss sum / global normaliser);
    returns (loss sum, tokens) as float64 for the all-reduce."""
    mine = idx[dist.rank()::dist.world()]
    if mine:
        loss_sum, n_tok = step_loss(mine)
        (loss_sum / norm).backward()
        return torch.tensor([loss_sum.item(), float(n_tok)], dtype=torch.float64)
    if sharded:  # fewer examples than ranks: zero gradient, but take part in FSDP's collectives like every rank
        (step_loss(idx[:1])[0] * 0.0).backward()
    return torch.zeros(2, dtype=torch.float64)


def _log(log_path: Path, bar, row: dict, n_tok: int, seconds: float, finite: bool, extra: dict, on_log) -> None:
    row.update(tokens=n_tok, tokens_per_s=round(n_tok / max(seconds, 1e-9), 1), seconds=round(seconds, 4), **extra,
               **({} if finite else {"skipped": True}))
    append_rows(log_path, [row])
    if on_log is not None:
        on_log(row)
    bar.update(1)
    bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")


MAX_SKIPPED = 0.1  # fraction of steps with non-finite gradients after which training counts as diverged


def _check_divergence(skipped: list[int], step: int) -> None:
    """Occasional non-finite gradients (a bf16 kernel on an unlucky batch) are skipped, as loss scalers do; many
    mean the run has diverged, which is an error rather than a silently useless adapter."""
    if len(skipped) >= 3 and len(skipped) > MAX_SKIPPED * step:
        raise SsbError(f"training diverged: {len(skipped)} of the first {step} steps had non-finite gradients "
                       f"(steps {skipped[:5]}...); lower distill.lr, or try model.dtype=float32")


def _sync_grads(params: list[torch.Tensor]) -> None:
    if dist.world() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = dist.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor: an FSDP shard (DTensor) is all-gathered (collective: every rank must call), others pass."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _placed_like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``full`` on ``ref``'s device, or sharded like ``ref`` if that is a DTensor (collective then)."""
    if isinstance(ref, DTensor):
        return distribute_tensor(full.to(ref.device_mesh.device_type), ref.device_mesh, ref.placements)
    return full.to(ref.device)


def _update(params, opt, sched, max_grad_norm: float, skipped: list[int], step: int) -> tuple[torch.Tensor, bool]:
    """Clip and apply the summed gradients of (1-based) ``step``; returns (their norm, whether it was finite). A
    non-finite gradient would turn every weight into NaN: that update is skipped (``skipped``), the schedule kept."""
    norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf))
    finite = bool(torch.isfinite(norm))  # the same on every rank: gradients are summed first
    if finite:
        opt.step()
    else:
        skipped.append(step)
        _check_divergence(skipped, step)
    sched.step()
    opt.zero_grad(set_to_none=True)
    return norm, finite


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Name → whole CPU tensor of every trainable parameter (the LoRA weights), gathered if sharded. Every rank
    must call it; every rank gets the result."""
    return {n: full_tensor(p.detach()).cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(stage_dir: Path, model, opt, step: int, trained_tokens: int = 0,
                    train_seconds: float = 0.0, skipped_steps: list[int] | None = None) -> None:
    """Called on every rank (shards are gathered); rank 0 writes."""
    from safetensors.torch import save_file

    state = trainable_state(model)
    osd = opt.state_dict()
    tensors = {f"{i}.{k}": full_tensor(v).cpu().contiguous() for i, s in osd["state"].items() for k, v in s.items()}
    if not dist.is_main():
        return
    tensors["rng"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # dropout on a GPU draws from its own generator
        tensors["cuda_rng"] = torch.cuda.get_rng_state()
    groups = [{k: v for k, v in g.items()} for g in osd["param_groups"]]
    with publishing(stage_dir / CKPT) as tmp:
        save_file(state, str(tmp / "weights.safetensors"))
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "param_groups": groups,
                                                    "trained_tokens": trained_tokens,
                                                    "train_seconds": round(train_seconds, 3),
                                                    "skipped_steps": list(skipped_steps or [])}))


def _resume(stage_dir: Path, model, opt, sched, log_path: Path) -> dict:
    """Load ``<stage>/checkpoint`` if present; returns its state (``step``, ``trained_tokens``, ``train_seconds``,
    ``skipped_steps`` so far), or {} for a fresh start."""
    ckpt = stage_dir / CKPT
    if not (ckpt / "state.json").exists():
        if dist.is_main():
            log_path.unlink(missing_ok=True)  # a fresh start begins its log afresh
        dist.barrier()
        return {}
    from safetensors.torch import load_file

    meta = json.loads((ckpt / "state.json").read_text())
    weights = load_file(str(ckpt / "weights.safetensors"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in weights:
                p.copy_(_placed_like(weights[n], p))
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    state: dict = {}
    for key, v in tensors.items():
        if key in ("rng", "cuda_rng"):
            continue
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    params = [p for p in model.parameters() if p.requires_grad]
    state = {i: {k: (v if k == "step" else _placed_like(v, params[i])) for k, v in sorted(s.items())}
             for i, s in sorted(state.items())}
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    with warnings.catch_warnings():  # replaying the schedule without optimizer steps is the point here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(meta["step"]):
            sched.step()
    torch.set_rng_state(tensors["rng"])
    if "cuda_rng" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda_rng"])
    if dist.is_main():
        write_rows(log_path, [r for r in read_rows(log_path, repair=True) if r["step"] <= meta["step"]])
    dist.barrier()
    return meta
