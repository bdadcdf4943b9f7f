"""The slow path: math-verify on the answer and the gold, in killable worker processes with a hard deadline
(:mod:`ssb.grading.worker`), skipped for hostile input; verdicts cached."""

from __future__ import annotations

import re


from ssb.grading.normalise import MAX_ANSWER_CHARS
from ssb.grading.worker import MathVerifyWorker

TIMEOUT_S = 5.0  # hard deadline per math-verify call, waiting for a worker included (worker killed after it)
WORKERS = 4  # math-verify worker processes at most (started on demand)
VERIFIER = MathVerifyWorker(timeout_s=TIMEOUT_S, size=WORKERS)

def risky(s: str) -> bool:
    """Inputs that could make sympy hang or explode: math-verify is skipped for them."""
    if len(s) > MAX_ANSWER_CHARS or "\x00" in s:
        return True
    if re.search(r"\^[\s{(]*\d[\d.]*[\s})]*\^", s):  # numeric power tower: 9^{9^{9^{9}}}, 2^2^100
        return True
    if re.search(r"\^[\s{(]*[+-]?\d{5,}|\d{4,}\s*!", s):  # 2^{100000}, 10000!
        return True
    return re.search(r"\\(?:def|newcommand|input|include)(?![A-Za-z])", s) is not None


VERDICTS: dict[tuple[str, str, str, str], bool] = {}  # math-verify verdicts, timeouts included (as False)


def math_verified(answer: str, gold: str, answer_clean: str, gold_clean: str) -> bool:
    key = (answer, gold, answer_clean, gold_clean)
    if key in VERDICTS:
        return VERDICTS[key]
    pairs = [(gold, answer)]
    if (gold_clean, answer_clean) != (gold, answer) and gold_clean and answer_clean:
        pairs.append((gold_clean, answer_clean))
    # None (this call's deadline hit while verifying) -> False, cached; RuntimeError (no worker could be started,
    # or WorkerBusy: none free in time) propagates and is not cached: grade() says False for this call only
    result = bool(VERIFIER.verify(pairs))
    if len(VERDICTS) >= 100_000:
        VERDICTS.clear()
    VERDICTS[key] = result
    return result
