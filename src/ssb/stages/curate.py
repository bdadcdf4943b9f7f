"""Stage 2, curate: grade every rollout and pick, per problem, one correct response and one incorrect one.

The incorrect response is one whose answer is the *most common* wrong answer among the problem's samples (the
model's most tempting mistake); ties between equally common wrong answers, and the choice among several
responses, are broken by an RNG seeded with ``(seed, problem id)``, so curation is reproducible and independent
of row order. A problem is kept only with at least one correct and one incorrect *answered* response; every
other problem is counted under exactly one drop reason, checked in this order:

- ``no_answer``: no sample has an extractable final answer;
- ``no_correct``: answers, but none correct;
- ``no_incorrect``: every answered sample is correct (unanswered ones are not evidence of a mistake).

Outputs (written whole, atomically):

- ``curate/graded.jsonl``: per problem ``{"id", "answers": [str|null]*K, "correct": [bool]*K}``;
- ``curate/pairs.jsonl``: per kept problem ``{"id", "question", "answer", "grader", "correct", "incorrect",
  "correct_index", "incorrect_index", "correct_answer", "incorrect_answer", "n_correct", "n_incorrect", "n_unanswered"}``;
- ``curate/stats.json``: problem counts kept and dropped by reason.
"""

from __future__ import annotations

import random
from collections import Counter

from tqdm.auto import tqdm

from ssb.config import Config
from ssb.reads import Reads
from ssb.grading import answer_key, extract_answer, grade, grade_answer
from ssb.rows import write_json, write_rows
from ssb.stages import entry
from ssb.rundir import Stage, read_upstream

DROP_REASONS = ("no_answer", "no_correct", "no_incorrect")
READS = Reads("curate", result=("seed", "curate"))  # the config fields this stage reads (ssb.reads.Reads)


def choose_pair(answers: list[str | None], correct: list[bool], rng: random.Random, grader: str = "math"):
    """Indices ``(correct_index, incorrect_index)`` or a drop reason string.

    >>> choose_pair(["4", "5", "5", "6"], [True, False, False, False], random.Random(0))
    (0, 1)
    >>> choose_pair([None, "4"], [False, True], random.Random(0))
    'no_incorrect'
    """
    answered = [i for i, a in enumerate(answers) if a is not None]
    if not answered:
        return "no_answer"
    right = [i for i in answered if correct[i]]
    wrong = [i for i in answered if not correct[i]]
    if not right:
        return "no_correct"
    if not wrong:
        return "no_incorrect"
    keys = {i: answer_key(answers[i], grader) for i in wrong}
    counts = Counter(keys.values())
    top = max(counts.values())
    commonest = sorted(k for k, c in counts.items() if c == top)
    key = rng.choice(commonest)
    return rng.choice(right), rng.choice([i for i in wrong if keys[i] == key])


@entry("curate")
def run(cfg: Config, stage: Stage) -> dict:
    rows = read_upstream(stage.run_dir, "rollout", "rollouts.jsonl")
    stage.begin()
    return write(stage, *select(rows, cfg, bar=True))


def grade_row(row: dict, cfg: Config) -> tuple[dict, dict | str]:
    """One rollout row -> its graded row and its pair (or drop reason)."""
    texts = [s["text"] for s in row["samples"]]
    answers = [extract_answer(t) for t in texts]
    if cfg.curate.strict:
        correct = [grade(t, row["answer"], row["grader"], strict=True) for t in texts]
    else:
        correct = [grade_answer(a, row["answer"], row["grader"]) for a in answers]
    graded = {"id": row["id"], "answers": answers, "correct": correct}
    choice = choose_pair(answers, correct, random.Random(f"{cfg.seed}:{row['id']}"), row["grader"])
    if isinstance(choice, str):
        return graded, choice
    ci, wi = choice
    n_answered = sum(a is not None for a in answers)
    return graded, {
        "id": row["id"], "question": row["question"], "answer": row["answer"], "grader": row["grader"],
        "correct": texts[ci], "incorrect": texts[wi], "correct_index": ci, "incorrect_index": wi,
        "correct_answer": answers[ci], "incorrect_answer": answers[wi], "n_correct": sum(correct),
        "n_incorrect": n_answered - sum(correct), "n_unanswered": len(answers) - n_answered,
    }


def select(rows: list[dict], cfg: Config, bar: bool = False, cache: dict | None = None):
    """Grade ``rows`` and pick the pairs: ``(graded, pairs, stats)``. ``cache`` (id -> result of
    :func:`grade_row`) lets the budgeted waves grade each rollout row once."""
    graded, pairs = [], []
    dropped = Counter({r: 0 for r in DROP_REASONS})
    for row in tqdm(rows, desc="curate", unit="problem", dynamic_ncols=True, disable=not bar):
        if cache is not None and row["id"] in cache:
            g, choice = cache[row["id"]]
        else:
            g, choice = grade_row(row, cfg)
            if cache is not None:
                cache[row["id"]] = (g, choice)
        graded.append(g)
        if isinstance(choice, str):
            dropped[choice] += 1
        else:
            pairs.append(choice)
    capped = 0
    if cfg.curate.max_pairs is not None:
        capped, pairs = max(len(pairs) - cfg.curate.max_pairs, 0), pairs[: cfg.curate.max_pairs]
    samples = [c for g in graded for c in g["correct"]]
    stats = {
        "problems": len(rows),
        "with_answer": len(rows) - dropped["no_answer"],
        "kept": len(pairs),
        "dropped": dict(dropped),
        "over_max_pairs": capped,
        "sample_accuracy": round(sum(samples) / max(len(samples), 1), 4),
        "answered_fraction": round(sum(a is not None for g in graded for a in g["answers"]) / max(len(samples), 1), 4),
    }
    return graded, pairs, stats


def write_files(stage: Stage, graded: list[dict], pairs: list[dict], stats: dict) -> None:
    write_rows(stage.path("graded.jsonl"), graded)
    write_rows(stage.path("pairs.jsonl"), pairs)
    write_json(stage.path("stats.json"), stats)


def write(stage: Stage, graded: list[dict], pairs: list[dict], stats: dict) -> dict:
    write_files(stage, graded, pairs, stats)
    return stage.finish({"problems": stats["problems"], "pairs": len(pairs)}, stats=stats)
