"""One canonical string per answer value: what curate's commonest wrong answer and the metrics' majority vote count."""

from __future__ import annotations

from fractions import Fraction


from ssb.grading.normalise import MAX_ANSWER_CHARS, as_number, clean
from ssb.grading.units import choice_with_text, parse_compound

def number_key(n: Fraction) -> str:
    return str(n.numerator) if n.denominator == 1 else f"{n.numerator}/{n.denominator}"


def answer_key(answer: str, dataset: str = "math") -> str:
    r"""Canonical string for counting equal answers: '1,000', '1000.0', '$1000', '1000 dollars' -> '1000';
    '\frac{1}{2}', '0.5', '1/2' -> '1/2'; a compound-unit answer -> its value in its smallest unit; a choice with
    its text -> the letter. Deterministic; never raises.

    >>> [answer_key(a) for a in ("1,000", "1000.0", "$1000", "1000 dollars", "0.5", r"\dfrac12", "x = 5")]
    ['1000', '1000', '1000', '1000', '1/2', '1/2', '5']
    >>> [answer_key(a) for a in ("eighteen", "1.45 million", "2 hours 40 minutes", r"0.\overline{3}", "(C) Plane")]
    ['18', '1450000', '160', '1/3', 'c']
    """
    try:
        if answer is None:
            return ""
        s = str(answer)
        if len(s) > MAX_ANSWER_CHARS:
            return s.strip()
        compound = parse_compound(s)
        if compound is not None:
            return number_key(compound[1] / compound[2][-1])
        letter = choice_with_text(s)
        if letter is not None:
            return letter.lower()
        s = clean(s)
        n = as_number(s)
        return number_key(n) if n is not None else s
    except Exception:
        return str(answer).strip() if isinstance(answer, str) else ""
