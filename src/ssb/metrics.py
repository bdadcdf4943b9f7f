"""Evaluation metrics from per-problem sample rows (pure functions, no I/O).

A row is ``{"grader": str, "samples": [{"correct", "strict_correct", "answer", "n_tokens", "finish_reason"}]}``
(the schema of ``evaluate/<bench>/samples.jsonl``). Every correctness metric comes twice: lenient (``correct``,
ssb's grader) and strict (``strict_correct``, the paper's exact boxed match), the strict one prefixed ``strict_``.

- ``accuracy``: mean over all samples (pass@1 estimated as avg@n).
- ``accuracy_ci95``: 95% percentile-bootstrap interval of ``accuracy``, resampling *problems* with replacement
  (``n_boot`` resamples, numpy RNG seeded with ``seed``: deterministic). The interval is widened, if needed, to
  contain the point estimate (only matters for degenerate resamples).
- ``pass_at_k``: unbiased pass@k of Chen et al. (2021), ``1 - C(n-c, k) / C(n, k)`` per problem, computed as the
  numerically stable product ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``, averaged over problems.
- ``maj_at_k``: majority vote over each problem's *first* k samples. Answers are grouped by
  :func:`ssb.grading.answer_key` under the row's grader; samples without an answer do not vote (a problem with no
  answered sample counts as wrong). Ties go to the answer that appears first among the k samples. The vote is
  correct if any sample in the winning group is correct.

k runs over 1, 2, 4, 8, ... up to the smallest number of samples any problem has (``ks`` to choose others; those
above it are dropped). Keys of the k dicts are strings (``"1"``, ``"4"``) so the result is JSON-stable. Problems
with no samples are ignored by the per-problem metrics. Empty input gives zeros, never NaN.

Comparing two runs on the same problems: :func:`per_problem_scores` turns rows (which carry an ``"id"``) into
``{id: mean correctness}``, and :func:`paired_bootstrap` gives the mean paired difference of two such dicts with a
percentile-bootstrap CI that resamples the *shared* problems (the pairing removes the between-problem variance that
makes two independent CIs overlap even when one run is better on almost every problem).
:func:`per_problem_answers` and :func:`changed_answers` count the problems whose answer changed at all.
"""

from __future__ import annotations

import statistics

import numpy as np

from ssb.grading import answer_key

CORRECTNESS = (("", "correct"), ("strict_", "strict_correct"))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``n`` samples of which ``c`` are correct (requires ``k <= n``).

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 4), round(pass_at_k(5, 2, 2), 4)
    (0.25, 1.0, 0.7)
    """
    if not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 < k <= n (k={k}, n={n})")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def majority_correct(samples: list[dict], grader: str = "math", field: str = "correct") -> bool:
    """Whether the majority answer of ``samples`` is correct (see the module docstring for the rules).

    >>> s = [{"answer": "2", "correct": False}, {"answer": "3", "correct": True}]
    >>> majority_correct(s), majority_correct(s[::-1])  # a tie: the first answer seen wins
    (False, True)
    """
    return _majority(_keys(samples, grader), [bool(s[field]) for s in samples])


def _keys(samples: list[dict], grader: str) -> list[str | None]:
    return [None if s.get("answer") is None else answer_key(s["answer"], grader) for s in samples]


def _majority(keys: list[str | None], flags: list[bool]) -> bool:
    votes: dict[str, list[bool]] = {}  # dicts keep insertion order: first appearance breaks ties
    for key, ok in zip(keys, flags):
        if key is not None:
            votes.setdefault(key, []).append(ok)
    if not votes:
        return False
    winner = max(votes.values(), key=len)  # max returns the first of equal maxima
    return any(winner)


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to ``n``."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    return ks


def bootstrap_ci(correct: np.ndarray, total: np.ndarray, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> list[float]:
    """Percentile-bootstrap interval of ``sum(correct) / sum(total)``, resampling problems (array entries)."""
    if len(total) == 0 or total.sum() == 0:
        return [0.0, 0.0]
    point = correct.sum() / total.sum()
    idx = np.random.default_rng(seed).integers(0, len(total), size=(n_boot, len(total)))
    stats = correct[idx].sum(axis=1) / np.maximum(total[idx].sum(axis=1), 1)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return [round(float(min(lo, point)), 6), round(float(max(hi, point)), 6)]


def summarize(rows: list[dict], ks: list[int] | None = None, n_boot: int = 1000, seed: int = 0) -> dict:
    """Metrics of evaluation rows (see the module docstring); a flat dict, JSON-serialisable."""
    samples = [s for r in rows for s in r["samples"]]
    n = max(len(samples), 1)
    tokens = [s["n_tokens"] for s in samples] or [0]
    nonempty = [r for r in rows if r["samples"]]
    sizes = np.array([len(r["samples"]) for r in nonempty], dtype=float)
    n_min = int(sizes.min()) if len(sizes) else 0
    ks = sorted({int(k) for k in ks if 0 < int(k) <= n_min}) if ks is not None else default_ks(n_min)
    out = {
        "problems": len(rows),
        "samples": len(samples),
        "samples_per_problem": n_min,
        "accuracy": sum(s["correct"] for s in samples) / n,
        "strict_accuracy": sum(s["strict_correct"] for s in samples) / n,
    }
    keys = [_keys(r["samples"], r.get("grader") or "math") for r in nonempty]
    for prefix, field in CORRECTNESS:
        flags = [[bool(s[field]) for s in r["samples"]] for r in nonempty]
        right = np.array([sum(f) for f in flags], dtype=float)
        out[f"{prefix}accuracy_ci95"] = bootstrap_ci(right, sizes, n_boot, seed)
        out[f"{prefix}pass_at_k"] = {
            str(k): float(np.mean([pass_at_k(int(m), int(c), k) for m, c in zip(sizes, right)])) for k in ks}
        out[f"{prefix}maj_at_k"] = {
            str(k): float(np.mean([_majority(kk[:k], f[:k]) for kk, f in zip(keys, flags)])) for k in ks}
    out.update({
        "mean_response_tokens": statistics.fmean(tokens),
        "median_response_tokens": statistics.median(tokens),
        "truncated_fraction": sum(s["finish_reason"] == "length" for s in samples) / n,
        "no_answer_fraction": sum(s["answer"] is None for s in samples) / n,
    })
    return out


def per_problem_scores(rows: list[dict], field: str = "correct") -> dict[str, float]:
    """``{row id: mean of field over its samples}``; rows without samples are left out (rows sharing an id are
    pooled).

    >>> rows = [{"id": "a", "samples": [{"correct": True}, {"correct": False}]}, {"id": "b", "samples": []}]
    >>> per_problem_scores(rows)
    {'a': 0.5}
    """
    sums: dict[str, list[float]] = {}
    for r in rows:
        if r["samples"]:
            acc = sums.setdefault(r["id"], [0.0, 0])
            acc[0] += sum(bool(s[field]) for s in r["samples"])
            acc[1] += len(r["samples"])
    return {i: right / n for i, (right, n) in sums.items()}


def per_problem_answers(rows: list[dict]) -> dict[str, tuple[str | None, ...]]:
    """``{row id: its samples' answers, as answer keys under the row's grader, in sample order}`` (None: no
    answer); rows without samples are left out. Two runs' dicts give :func:`changed_answers`.

    >>> per_problem_answers([{"id": "a", "grader": "gsm8k", "samples": [{"answer": "1,000"}, {"answer": None}]}])
    {'a': ('1000', None)}
    """
    return {r["id"]: tuple(_keys(r["samples"], r.get("grader", "math"))) for r in rows if r["samples"]}


def changed_answers(a: dict[str, tuple], b: dict[str, tuple]) -> int:
    """How many problems present in both give a different answer (any sample's; a different sample count counts
    as changed): what a trained model changed at all, right or wrong, next to the net effect on accuracy.

    >>> changed_answers({"p": ("1",), "q": ("2",), "r": ("3",)}, {"p": ("1",), "q": ("5",)})
    1
    """
    return sum(a[i] != b[i] for i in a.keys() & b.keys())


def paired_bootstrap(a: dict[str, float], b: dict[str, float], n_boot: int = 1000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """Mean paired difference ``b - a`` over the problems present in both (ids sorted, so the result does not
    depend on dict order), with a percentile-bootstrap interval resampling those problems with replacement
    (numpy RNG seeded with ``seed``; widened, if needed, to contain the point estimate).

    Returns ``n`` (shared problems), ``diff``, ``ci95``, ``mean_a`` / ``mean_b`` (over the shared problems),
    ``wins`` / ``losses`` / ``ties`` (problems where b > a, b < a, b == a). No shared problems: zeros.

    >>> paired_bootstrap({"p": 0.0, "q": 0.5, "x": 1.0}, {"p": 1.0, "q": 1.0, "y": 0.0})["diff"]
    0.75
    """
    ids = sorted(set(a) & set(b), key=str)
    if not ids:
        return {"n": 0, "diff": 0.0, "ci95": [0.0, 0.0], "mean_a": 0.0, "mean_b": 0.0, "wins": 0, "losses": 0,
                "ties": 0}
    x = np.array([a[i] for i in ids], dtype=float)
    y = np.array([b[i] for i in ids], dtype=float)
    d = y - x
    point = float(d.mean())
    idx = np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))
    lo, hi = np.quantile(d[idx].mean(axis=1), [(1 - level) / 2, (1 + level) / 2])
    return {"n": len(ids), "diff": round(point, 6), "ci95": [round(float(min(lo, point)), 6),
                                                             round(float(max(hi, point)), 6)],
            "mean_a": round(float(x.mean()), 6), "mean_b": round(float(y.mean()), 6),
            "wins": int((d > 0).sum()), "losses": int((d < 0).sum()), "ties": int((d == 0).sum())}
