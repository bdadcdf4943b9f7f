"""Grading an answer against a gold: compound units, choices, the fast exact paths, then math-verify (the rules:
:mod:`ssb.grading`); ``strict`` reproduces the paper's exact-string scoring."""

from __future__ import annotations

import re


from ssb.choices import GRADERS
from ssb.grading.extract import BOX_RE, box_content, extract_answer
from ssb.grading.normalise import MAX_ANSWER_CHARS, as_number, clean, repeating_value
from ssb.grading.units import choice_letter, choice_with_text, compound_matches, parse_compound
from ssb.grading.verify import math_verified, risky

DATASETS = {**{g: g for g in GRADERS},  # a grader's name, or a data set's that uses it -> the grader
            "math-500": "math500", "aime24": "aime", "aime25": "aime", "aime2024": "aime", "aime2025": "aime"}

def _gold_string(gold, dataset: str) -> str:
    gold = str(gold).strip()
    if dataset == "gsm8k" and "####" in gold:
        gold = gold.rsplit("####", 1)[1].strip()
    return gold


def _grade(answer: str, gold: str, ds: str) -> bool:
    answer, gold = answer.strip(), gold.strip()
    if not answer or not gold:
        return False
    if answer == gold and ds != "aime":  # AIME still needs the integer/range check
        return True
    if len(answer) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    compound = parse_compound(answer)
    if compound is not None:
        return compound_matches(compound, gold)
    letter = choice_letter(gold)
    if letter is not None:
        chosen = choice_with_text(answer)
        if chosen is not None:
            return chosen == letter
    a, g = clean(answer), clean(gold)
    na, ng = as_number(a), as_number(g)
    if ds == "aime":
        if na is None and ng is not None and ng.denominator == 1 and not risky(answer):
            return math_verified(answer, gold, a, g)  # e.g. "5^2": math-verify decides, gold is an integer
        return na is not None and na.denominator == 1 and 0 <= na <= 999 and na == ng
    if a == g and a:
        return True
    if na is not None and ng is not None:
        if na == ng:
            return True
        if ds == "gsm8k" or ("." not in a and "." not in g) or repeating_value(a) is not None \
                or repeating_value(g) is not None:
            return False
    elif ds == "gsm8k" and ng is not None and na is None and re.search(r"\d", a) is None:
        return False  # gsm8k gold is a number; an answer without digits cannot match
    if risky(answer) or risky(gold):
        return False
    return math_verified(answer, gold, a, g)


def grade_answer(answer: str | None, gold: str, dataset: str = "math") -> bool:
    """Same as :func:`grade` on an already-extracted answer (None -> False)."""
    ds = DATASETS.get(str(dataset).lower())
    if ds is None:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(GRADERS)}")
    try:
        if not isinstance(answer, str):
            return False
        return _grade(answer, _gold_string(gold, ds), ds)
    except Exception:
        return False


def grade(response: str, gold: str, dataset: str = "math", strict: bool = False) -> bool:
    r"""True iff the response's final answer equals ``gold``. Never raises on any response.

    ``dataset`` is one of 'gsm8k', 'math500', 'aime', 'math' (unknown -> ValueError). ``strict=True`` reproduces
    the paper: the last ``\boxed{}`` content equals the gold string exactly (after ``.strip()``).

    >>> grade(r"... so the total is \boxed{1,000}.", "1000", "gsm8k")
    True
    >>> grade(r"Each costs \boxed{\$18.00}", "18", "gsm8k"), grade(r"\boxed{18}", "18", "gsm8k", strict=True)
    (True, True)
    >>> grade(r"\boxed{025}", "25", "aime"), grade(r"\boxed{25.5}", "025", "aime")
    (True, False)
    >>> grade(r"\boxed{\dfrac12}", r"\frac{1}{2}"), grade(r"\boxed{0.5}", r"\frac{1}{2}", strict=True)
    (True, False)
    >>> grade(r"The angle is \boxed{30^\circ}", "30", "math500"), grade("no answer here", "30")
    (True, False)
    >>> grade(r"\boxed{2 \text{ hours } 40 \text{ minutes}}", "160", "gsm8k"), grade(r"\boxed{1.45}", "1450000", "gsm8k")
    (True, False)
    """
    ds = DATASETS.get(str(dataset).lower())
    if ds is None:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(GRADERS)}")
    try:
        if strict:
            if not isinstance(response, str):
                return False
            boxes = list(BOX_RE.finditer(response))
            content = box_content(response, boxes[-1].end()) if boxes else None
            return content is not None and content.strip() == _gold_string(gold, ds)
        return grade_answer(extract_answer(response), gold, ds)
    except Exception:
        return False
