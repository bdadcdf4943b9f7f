"""Evaluation metrics from per-problem sample rows (pure functions, no I/O)."""

from __future__ import annotations

import statistics


def summarize(rows: list[dict]) -> dict:
    """Metrics of evaluation rows ``{"samples": [{"correct", "strict_correct", "answer", "n_tokens",
    "finish_reason"}]}``: accuracy is the mean over all samples (pass@1 as avg@n)."""
    samples = [s for r in rows for s in r["samples"]]
    n = max(len(samples), 1)
    tokens = [s["n_tokens"] for s in samples] or [0]
    return {
        "problems": len(rows),
        "samples": len(samples),
        "accuracy": sum(s["correct"] for s in samples) / n,
        "strict_accuracy": sum(s["strict_correct"] for s in samples) / n,
        "mean_response_tokens": statistics.fmean(tokens),
        "median_response_tokens": statistics.median(tokens),
        "truncated_fraction": sum(s["finish_reason"] == "length" for s in samples) / n,
        "no_answer_fraction": sum(s["answer"] is None for s in samples) / n,
    }
