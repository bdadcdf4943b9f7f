"""ssb.metrics: pass@k against brute force, maj@k voting and ties, bootstrap CIs, strict vs lenient, empty input."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from ssb.metrics import (bootstrap_ci, default_ks, majority_correct, paired_bootstrap, pass_at_k,
                         per_problem_scores, summarize)


def sample(answer, correct, strict=None, n_tokens=10, finish="stop"):
    return {"text": f"\\boxed{{{answer}}}", "answer": answer, "correct": correct,
            "strict_correct": correct if strict is None else strict, "n_tokens": n_tokens, "finish_reason": finish}


def row(samples, grader="gsm8k"):
    return {"id": "p", "question": "q", "answer": "1", "grader": grader, "samples": samples}


def brute_pass_at_k(flags: list[bool], k: int) -> float:
    """Fraction of all k-subsets of the samples that contain a correct one."""
    subsets = list(itertools.combinations(flags, k))
    return sum(any(s) for s in subsets) / len(subsets)


def finite(obj) -> bool:
    if isinstance(obj, dict):
        return all(finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(finite(v) for v in obj)
    return not isinstance(obj, float) or math.isfinite(obj)


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_brute_force(n):
    for c in range(n + 1):
        flags = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(flags, k), abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_is_stable():
    assert 0.0 <= pass_at_k(1000, 3, 500) <= 1.0
    assert pass_at_k(1000, 0, 500) == 0.0
    assert pass_at_k(1000, 600, 500) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_summarize_pass_at_k_is_mean_of_per_problem_brute_force():
    patterns = [[1, 0, 0, 0], [1, 1, 0, 1], [0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1, 1]]
    rows = [row([sample(str(i), bool(f)) for i, f in enumerate(p)]) for p in patterns]
    m = summarize(rows)
    assert m["samples_per_problem"] == 4
    assert list(m["pass_at_k"]) == ["1", "2", "4"]
    for k in (1, 2, 4):
        want = sum(brute_pass_at_k([bool(f) for f in p], k) for p in patterns) / len(patterns)
        assert m["pass_at_k"][str(k)] == pytest.approx(want)
    assert m["pass_at_k"]["1"] == pytest.approx(m["accuracy"])  # pass@1 estimate == avg@n
    json.dumps(m)


def test_ks_default_and_explicit():
    assert default_ks(8) == [1, 2, 4, 8]
    assert default_ks(6) == [1, 2, 4]
    assert default_ks(0) == []
    rows = [row([sample("1", True)] * 6), row([sample("2", False)] * 3)]  # k limited by the smallest n (3)
    assert list(summarize(rows)["pass_at_k"]) == ["1", "2"]
    assert list(summarize(rows, ks=[3, 1, 100])["maj_at_k"]) == ["1", "3"]


def test_majority_vote_groups_by_answer_key_and_ignores_unanswered():
    same = [sample("5", False), sample("1,000", True), sample("1000.0", False)]  # 1,000 == 1000.0: 2 votes
    assert majority_correct(same, "gsm8k") is True  # the group wins and one of its samples is correct
    assert majority_correct(same[:1], "gsm8k") is False
    assert majority_correct([sample(None, False), sample(None, False), sample("4", True)]) is True
    assert majority_correct([sample(None, False), sample(None, False), sample("4", False)]) is False
    assert majority_correct([sample(None, False)]) is False
    assert majority_correct([]) is False


def test_majority_vote_ties_go_to_the_answer_seen_first():
    wrong_first = [sample("2", False), sample("3", True)]
    assert majority_correct(wrong_first) is False
    assert majority_correct(wrong_first[::-1]) is True
    tie3 = [sample("7", False), sample("8", True), sample("8", True), sample("7", False)]
    assert majority_correct(tie3) is False
    assert majority_correct(tie3[1:] + tie3[:1]) is True
    rows = [row(tie3), row(tie3[1:] + tie3[:1])]  # 7 8 8 7 and 8 8 7 7
    m = summarize(rows, ks=[1, 2, 3, 4])
    assert m["maj_at_k"] == {"1": 0.5, "2": 0.5, "3": 1.0, "4": 0.5}
    assert summarize(rows, ks=[4]) == summarize(rows, ks=[4])  # deterministic


def test_maj_at_k_uses_first_k_samples_only():
    r = row([sample("1", True), sample("9", False), sample("9", False), sample("9", False)])
    assert summarize([r])["maj_at_k"] == {"1": 1.0, "2": 1.0, "4": 0.0}


def test_strict_and_lenient_are_scored_separately():
    rows = [row([sample("1", True, strict=False), sample("1", True, strict=True)]),
            row([sample("2", True, strict=False), sample("3", False, strict=False)])]
    m = summarize(rows)
    assert m["accuracy"] == 0.75 and m["strict_accuracy"] == 0.25
    assert m["pass_at_k"] == {"1": 0.75, "2": 1.0}
    assert m["strict_pass_at_k"] == {"1": 0.25, "2": 0.5}
    assert m["maj_at_k"] == {"1": 1.0, "2": 1.0}
    assert m["strict_maj_at_k"] == {"1": 0.0, "2": 0.5}  # problem 1: the "1" group has a strict-correct sample
    assert m["strict_accuracy_ci95"][1] <= m["accuracy_ci95"][1]


def test_bootstrap_ci_is_deterministic_and_contains_the_estimate():
    flags = [True, False, True, True, False, False, True, False, True, True, False, True] * 3
    rows = [row([sample("1", f), sample("1", not f or i % 3 == 0)]) for i, f in enumerate(flags)]
    a, b = summarize(rows, seed=0), summarize(rows, seed=0)
    assert a["accuracy_ci95"] == b["accuracy_ci95"]
    assert summarize(rows, seed=1)["accuracy_ci95"] != a["accuracy_ci95"]
    for prefix in ("", "strict_"):
        lo, hi = a[f"{prefix}accuracy_ci95"]
        assert 0.0 <= lo <= a[f"{prefix}accuracy"] <= hi <= 1.0
        assert hi - lo > 0.05
    import numpy as np

    assert bootstrap_ci(np.array([2.0] * 5), np.array([2.0] * 5)) == [1.0, 1.0]
    assert bootstrap_ci(np.array([0.0] * 5), np.array([2.0] * 5)) == [0.0, 0.0]


def test_more_problems_narrow_the_interval():
    few = [row([sample("1", i % 2 == 0)]) for i in range(10)]
    many = [row([sample("1", i % 2 == 0)]) for i in range(1000)]
    w_few = summarize(few)["accuracy_ci95"]
    w_many = summarize(many)["accuracy_ci95"]
    assert w_many[1] - w_many[0] < w_few[1] - w_few[0]


@pytest.mark.parametrize("rows", [[], [row([])], [row([]), row([])]])
def test_empty_input_gives_zeros_not_nan(rows):
    m = summarize(rows)
    assert finite(m)
    assert m["accuracy"] == 0.0 and m["accuracy_ci95"] == [0.0, 0.0] and m["strict_accuracy_ci95"] == [0.0, 0.0]
    assert m["pass_at_k"] == {} and m["maj_at_k"] == {}
    assert m["problems"] == len(rows) and m["samples"] == 0
    json.dumps(m)


def test_problem_without_samples_is_ignored_by_per_problem_metrics():
    m = summarize([row([]), row([sample("1", True), sample("2", False)])])
    assert m["samples_per_problem"] == 2
    assert m["pass_at_k"] == {"1": 0.5, "2": 1.0}
    assert finite(m)


def test_keeps_the_original_keys():
    rows = [row([sample("1", True, n_tokens=10), sample(None, False, n_tokens=30, finish="length")])]
    m = summarize(rows)
    assert {"problems", "samples", "accuracy", "strict_accuracy", "mean_response_tokens", "median_response_tokens",
            "truncated_fraction", "no_answer_fraction"} <= set(m)
    assert m["mean_response_tokens"] == 20 and m["truncated_fraction"] == 0.5 and m["no_answer_fraction"] == 0.5


def reference_paired(a: dict, b: dict, n_boot: int, seed: int) -> tuple[float, list[float]]:
    """Plain loops over the same RNG draws (problems in sorted-id order); numpy only for the draws and percentiles."""
    import numpy as np

    ids = sorted(set(a) & set(b))
    diffs = [b[i] - a[i] for i in ids]
    draws = np.random.default_rng(seed).integers(0, len(ids), size=(n_boot, len(ids)))
    means = []
    for row_ in draws:
        total = 0.0
        for j in row_:
            total += diffs[j]
        means.append(total / len(ids))
    lo, hi = np.percentile(means, [2.5, 97.5])
    return sum(diffs) / len(diffs), [float(lo), float(hi)]


def test_paired_bootstrap_matches_a_plain_loop():
    import random

    rnd = random.Random(7)
    a = {f"p{i}": rnd.choice([0.0, 0.25, 0.5, 1.0]) for i in range(40)}
    b = {f"p{i}": min(1.0, v + rnd.choice([0.0, 0.0, 0.25, 0.5, -0.25])) for i, v in enumerate(a.values())}
    b = {k: max(v, 0.0) for k, v in b.items()}
    a["only_a"], b["only_b"] = 1.0, 0.0  # unpaired: ignored
    r = paired_bootstrap(a, b, n_boot=300, seed=3)
    diff, ci = reference_paired(a, b, 300, 3)
    assert r["n"] == 40
    assert r["diff"] == pytest.approx(diff, abs=1e-6)
    assert r["ci95"] == pytest.approx(ci, abs=1e-6)
    assert r["ci95"][0] <= r["diff"] <= r["ci95"][1]
    shared = [k for k in a if k in b]
    assert r["wins"] == sum(b[k] > a[k] for k in shared) and r["losses"] == sum(b[k] < a[k] for k in shared)
    assert r["wins"] + r["losses"] + r["ties"] == 40
    assert r["mean_b"] - r["mean_a"] == pytest.approx(r["diff"], abs=1e-5)
    assert paired_bootstrap(a, b, n_boot=300, seed=3) == r  # deterministic
    assert paired_bootstrap(dict(reversed(list(a.items()))), b, n_boot=300, seed=3) == r  # dict order irrelevant
    json.dumps(r)


def test_paired_bootstrap_obvious_cases():
    a = {str(i): i % 3 / 2 for i in range(12)}
    same = paired_bootstrap(a, dict(a))
    assert same["diff"] == 0.0 and same["ci95"] == [0.0, 0.0] and same["wins"] == same["losses"] == 0
    right, wrong = {str(i): 1.0 for i in range(10)}, {str(i): 0.0 for i in range(10)}
    up = paired_bootstrap(wrong, right)
    assert up["diff"] == 1.0 and up["ci95"] == [1.0, 1.0] and (up["wins"], up["losses"], up["n"]) == (10, 0, 10)
    down = paired_bootstrap(right, wrong)
    assert down["diff"] == -1.0 and down["ci95"] == [-1.0, -1.0] and down["losses"] == 10
    # only the shared ids count: b is wrong on the unpaired ones, which must not drag it down
    part = paired_bootstrap({**wrong, "x": 1.0}, {"0": 1.0, "1": 1.0, "y": 0.0})
    assert part["n"] == 2 and part["diff"] == 1.0
    empty = paired_bootstrap({"a": 1.0}, {"b": 1.0})
    assert empty["n"] == 0 and empty["diff"] == 0.0 and empty["ci95"] == [0.0, 0.0] and finite(empty)
    assert paired_bootstrap(a, {k: 1 - v for k, v in a.items()}, seed=1) != paired_bootstrap(
        a, {k: 1 - v for k, v in a.items()}, seed=2)


def test_per_problem_scores():
    rows = [{**row([sample("1", True), sample("2", False), sample("1", True, strict=False)]), "id": "a"},
            {**row([sample("3", False)]), "id": "b"}, {**row([]), "id": "empty"}]
    assert per_problem_scores(rows) == {"a": pytest.approx(2 / 3), "b": 0.0}
    assert per_problem_scores(rows, "strict_correct") == {"a": pytest.approx(1 / 3), "b": 0.0}
    assert per_problem_scores([]) == {}
