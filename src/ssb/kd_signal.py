"""Where the distillation signal is: per reply token, how far the hinted teacher's next-token distribution is from
the bare student's, over the replies distill trains on (``ssb signal``).

SSB teaches only through that gap. Teacher and student are the same base model; the teacher sees the question with
two attempts, the student the question alone. If the hint barely moves the model's distributions on the teacher's
own reply, forward KL has little to teach however low the loss goes; if a few tokens carry most of it (the first
number of the computation the correct attempt got right), the signal is there but thin. Measured before training
(the base model as student), or with ``--adapter`` for a trained student (what training removed).

Per token (``token_stats``, pure): forward KL(teacher || student) at distill's temperature times T² (the loss distill
minimises, as ``scale_t2`` sets it), the same at T = 1, whether both distributions have the same most likely token,
and each side's negative log-likelihood of the reply token. ``summarize`` (pure) gives their means, quantiles, the
share of the total KL carried by the top 1% and 10% of tokens, and the share of examples whose mean KL is under
0.01 (nothing to learn). ``measure`` runs it on a run directory's ``teach/examples.jsonl`` (or RFT's own rollouts:
the same rows distill reads) and writes ``RUN_DIR/signal/signal.json`` (the summary and how it was measured) and
``signal.jsonl`` (per example: id, tokens, its mean KL, max KL, argmax agreement).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ssb.config import Config
from ssb.stages.distill import build_examples, collate, training_rows
from ssb.errors import SsbError
from ssb.losses import LOG_FLOOR
from ssb.models import load_model, load_tokenizer, model_identity, resolve_device, stop_token_ids
from ssb.progress import progress
from ssb.rows import write_json, write_rows
from ssb.provenance import machine, versions

OUT_DIR = "signal"
CHUNK = 256  # reply tokens per lm_head chunk: a few fp32 (tokens x vocabulary) passes each


def token_stats(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float,
                scale_t2: bool = True) -> dict[str, Tensor]:
    """Per token: student/teacher logits (N, V) any float dtype, targets (N,) -> dict of (N,) fp32 tensors:
    ``kl`` (forward KL(teacher || student) at ``temperature``, × T² if ``scale_t2``), ``kl_t1`` (at T = 1),
    ``same_argmax`` (1.0 / 0.0), ``student_nll`` and ``teacher_nll`` of the target token at T = 1."""
    s, t = student_logits.float(), teacher_logits.float()

    def kl(temp: float) -> Tensor:
        log_ps, log_pt = F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1)
        return (log_pt.exp() * (log_pt - log_ps.clamp_min(LOG_FLOOR))).sum(-1).clamp_min(0.0)

    log_ps, log_pt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    idx = targets.long().unsqueeze(-1)
    return {"kl": kl(temperature) * (temperature ** 2 if scale_t2 else 1.0), "kl_t1": kl(1.0),
            "same_argmax": (s.argmax(-1) == t.argmax(-1)).float(),
            "student_nll": -log_ps.gather(-1, idx).squeeze(-1), "teacher_nll": -log_pt.gather(-1, idx).squeeze(-1)}


def _share_of_top(values: Tensor, fraction: float) -> float:
    """Share of sum(values) carried by the largest ceil(fraction * n) values (0 when the sum is 0)."""
    total = float(values.sum())
    if total <= 0:
        return 0.0
    k = max(1, math.ceil(fraction * values.numel()))
    return float(values.topk(k).values.sum()) / total


def summarize(stats: dict[str, Tensor], lengths: list[int]) -> dict:
    """Summary of per-token ``stats`` (all examples concatenated, ``lengths`` tokens each, in order)."""
    kl = stats["kl"].double()
    if kl.numel() == 0 or sum(lengths) != kl.numel():
        raise ValueError(f"{kl.numel()} tokens for lengths summing to {sum(lengths)}")
    per_example = torch.stack([part.mean() for part in kl.split(lengths)])
    q = torch.quantile(kl, torch.tensor([0.5, 0.9, 0.99], dtype=kl.dtype)).tolist()
    return {
        "examples": len(lengths), "tokens": kl.numel(),
        "kl_mean": float(kl.mean()), "kl_median": q[0], "kl_p90": q[1], "kl_p99": q[2], "kl_max": float(kl.max()),
        "kl_t1_mean": float(stats["kl_t1"].double().mean()),
        "top1pct_share": _share_of_top(kl, 0.01), "top10pct_share": _share_of_top(kl, 0.10),
        "tokens_kl_under_0.01": float((kl < 0.01).double().mean()),
        "examples_mean_kl_under_0.01": float((per_example < 0.01).double().mean()),
        "example_kl_mean_median": float(torch.quantile(per_example, 0.5)),
        "argmax_agreement": float(stats["same_argmax"].double().mean()),
        "student_nll_mean": float(stats["student_nll"].double().mean()),
        "teacher_nll_mean": float(stats["teacher_nll"].double().mean()),
    }


@torch.no_grad()
def _batch_stats(model, batch: dict, dc, chunk: int) -> dict[str, Tensor]:
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = causal.get_decoder(), causal.get_output_embeddings()
    student = decoder(input_ids=batch["s_ids"], attention_mask=batch["s_mask"]).last_hidden_state
    student = student[batch["rows"], batch["s_pos"]]
    with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
        teacher = decoder(input_ids=batch["t_ids"], attention_mask=batch["t_mask"]).last_hidden_state
    teacher = teacher[batch["rows"], batch["t_pos"]]
    parts = []
    for i in range(0, student.shape[0], chunk):
        sl = slice(i, i + chunk)
        parts.append(token_stats(head(student[sl]), head(teacher[sl]), batch["targets"][sl], dc.temperature,
                                 dc.scale_t2))
    return {k: torch.cat([p[k] for p in parts]).cpu() for k in parts[0]}


def measure(cfg: Config, run_dir, adapter: str | Path | None = None, limit: int | None = None,
            out: str | Path | None = None) -> dict:
    """Measure the signal on ``run_dir``'s training rows (the first ``limit``), write ``signal.json`` and
    ``signal.jsonl`` into ``out`` (default ``RUN_DIR/signal``, or ``signal-adapter`` with an adapter); returns the
    summary."""
    run_dir = Path(run_dir)
    rows = training_rows(cfg, run_dir)[:limit]
    if cfg.distill.targets == "rollouts" or any(r.get("teacher_prompt_ids") is None for r in rows):
        raise SsbError("these training rows have no teacher prompt (RFT: the student's own rollouts); the signal "
                       "is measured on teach/examples.jsonl")
    dc = cfg.distill
    tokenizer = load_tokenizer(cfg.model)
    device = resolve_device(cfg.model.device)
    model = load_model(cfg.model, adapter=adapter, device=device)
    examples = build_examples(rows, tokenizer, stop_token_ids(tokenizer, model), dc.paper_student_format)
    got: list[dict[str, Tensor]] = []
    t0, bar = time.time(), progress(len(examples), "signal", "example")
    for i in range(0, len(examples), dc.batch_size):
        part = examples[i : i + dc.batch_size]
        got.append(_batch_stats(model, collate(part, tokenizer.pad_token_id, device), dc, min(dc.chunk_size, CHUNK)))
        bar.update(len(part))
    bar.close()
    stats = {k: torch.cat([g[k] for g in got]) for k in got[0]}
    lengths = [len(e.targets) for e in examples]
    summary = summarize(stats, lengths)
    out = Path(out) if out else run_dir / (OUT_DIR + ("-adapter" if adapter else ""))
    out.mkdir(parents=True, exist_ok=True)
    per = [{"id": r.get("id", j), "tokens": n, "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "argmax_agreement": float(agree.mean())}
           for j, (r, n, kl, agree) in enumerate(zip(rows, lengths, stats["kl"].split(lengths),
                                                      stats["same_argmax"].split(lengths)))]
    write_rows(out / "signal.jsonl", per)
    record = {"summary": summary, "adapter": str(adapter) if adapter else None, "run_dir": str(run_dir),
              "loss": {"temperature": dc.temperature, "scale_t2": dc.scale_t2,
                       "paper_student_format": dc.paper_student_format},
              "model": model_identity(cfg.model), "seconds": round(time.time() - t0, 3), "machine": machine(),
              "versions": versions()}
    write_json(out / "signal.json", record)
    return summary


def describe(summary: dict) -> str:
    """A few lines for the terminal."""
    s = summary
    return (f"signal over {s['tokens']} reply tokens of {s['examples']} examples: KL mean {s['kl_mean']:.4f} "
            f"(median {s['kl_median']:.4f}, p99 {s['kl_p99']:.3f}); top 1% of tokens carry "
            f"{100 * s['top1pct_share']:.1f}% of it, top 10% {100 * s['top10pct_share']:.1f}%; "
            f"{100 * s['tokens_kl_under_0.01']:.1f}% of tokens under 0.01; same most likely token "
            f"{100 * s['argmax_agreement']:.1f}%; reply NLL student {s['student_nll_mean']:.3f} / teacher "
            f"{s['teacher_nll_mean']:.3f}")
