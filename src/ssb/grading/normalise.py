"""Normalisation before comparing: ``$``, ``\\text{}``, spacing, fractions, degrees, thousands commas, unit words,
numbers in words, scale words, repeating decimals (the rules: :mod:`ssb.grading`)."""

from __future__ import annotations

import re
from decimal import Decimal
from fractions import Fraction


MAX_ANSWER_CHARS = 1000  # longer extracted answers / golds are compared as exact strings only
MINUS = str.maketrans({"\u2212": "-", "\ufe63": "-", "\uff0d": "-"})
TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")

def plain(s: str) -> str:
    """Text of an answer or connector for word-level rules: math delimiters, ``$``, LaTeX spacing and ``\\text{}``
    wrappers removed, whitespace collapsed (bounded regex work; never parses)."""
    s = s.translate(MINUS)
    for old, new in (("\\$", ""), ("$", ""), ("\\(", " "), ("\\)", " "), ("\\[", " "), ("\\]", " "), ("\\ ", " "),
                     ("~", " "), ("\\,", " "), ("\\;", " "), ("\\:", " "), ("\\!", ""), ("\\qquad", " "),
                     ("\\quad", " ")):
        s = s.replace(old, new)
    for _ in range(3):
        s = TEXT_CMD_RE.sub(r" \1 ", s)
    return " ".join(s.split())


_FRAC_RE = re.compile(r"\\frac\s*(\d|\{[^{}]*\})\s*(\d|\{[^{}]*\}|[A-Za-z])")
_UNIT_RE = re.compile(r"^(.*[\d}])\s+([A-Za-z]{2,}(?:\.?\s+[A-Za-z]{2,})*\.?)\s*(?:\^\{?[23]\}?)?$")
_MATH_WORDS = {"pi", "sqrt", "infty", "inf", "and", "or", "to", "cdot", "times", "div", "pm", "mp", "sin", "cos",
               "tan", "cot", "sec", "csc", "log", "ln", "exp", "mod", "pmod", "bmod", "in", "cup", "cap", "le", "ge"}
_SCALE = {"hundred": 10**2, "thousand": 10**3, "million": 10**6, "billion": 10**9, "trillion": 10**12}
_NUM_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")
_FRACNUM_RE = re.compile(r"([+-]?)\\frac\{([+-]?\d+)\}\{([+-]?\d+)\}")
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_DEG_CF_RE = re.compile(r"(°|\\circ\s*\}?)\s*(?:\\(?:text|mathrm)\s*\{\s*[CF]\s*\}|[CF](?![A-Za-z]))")
_SCALE_RE = re.compile(r"(?i)^([+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+)\s*"
                       r"(hundred|thousand|million|billion|trillion)(?![A-Za-z])\s*([A-Za-z][A-Za-z\s.]*)?$")

_ONES = {w: i for i, w in enumerate("zero one two three four five six seven eight nine".split())}
_TEENS = {w: i + 10 for i, w in enumerate("ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen "
                                           "nineteen".split())}
_TENS = {w: 10 * (i + 2) for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())}
_NUMBER_WORDS = set(_ONES) | set(_TEENS) | set(_TENS) | set(_SCALE) | {"dozen", "a", "and", "negative", "minus"}


def _words_value(words: list[str]) -> int | None:
    """Integer value of English number words ('two hundred and four', 'sixty four', 'a dozen'); None if invalid."""
    sign = 1
    if words and words[0] in ("negative", "minus"):
        sign, words = -1, words[1:]
    if not words or (words[0] == "zero" and len(words) > 1):
        return None
    total, cur, prev, last_scale = 0, 0, None, float("inf")
    for k, w in enumerate(words):
        if w == "a":
            if k != 0 or len(words) < 2 or words[1] not in ("hundred", "thousand", "million", "billion",
                                                             "trillion", "dozen"):
                return None
            cur, prev = 1, "a"
        elif w == "and":
            if prev not in ("hundred", "scale") or k == len(words) - 1:
                return None
            prev = "and"
        elif w in _ONES or w in _TEENS or w in _TENS:
            kind = "ones" if w in _ONES else "teen" if w in _TEENS else "tens"
            if not (prev in (None, "hundred", "scale", "and") or (prev == "tens" and kind == "ones" and w != "zero")):
                return None
            cur += _ONES.get(w, 0) + _TEENS.get(w, 0) + _TENS.get(w, 0)
            prev = kind
        elif w == "hundred":
            if prev not in ("ones", "teen", "tens", "a") or not 0 < cur < 100:
                return None
            cur, prev = cur * 100, "hundred"
        elif w in _SCALE:
            scale = _SCALE[w]
            if prev not in ("ones", "teen", "tens", "hundred", "a") or cur == 0 or scale >= last_scale:
                return None
            total, cur, prev, last_scale = total + cur * scale, 0, "scale", scale
        elif w == "dozen":
            if prev not in ("ones", "teen", "tens", "a") or total or k != len(words) - 1:
                return None
            cur, prev = cur * 12, "dozen"
        else:
            return None
    return sign * (total + cur)


def _words_to_digits(s: str) -> str:
    """'eighteen dollars' -> '18 dollars'; unchanged unless number words lead and at most 3 unit words follow."""
    if len(s) > 200 or not re.fullmatch(r"[A-Za-z][A-Za-z\s,\-]*", s):
        return s
    words = [w for w in re.split(r"[\s,\-]+", s.lower()) if w]
    k = 0
    while k < len(words) and words[k] in _NUMBER_WORDS:
        k += 1
    while k > 0 and words[k - 1] in ("a", "and", "negative", "minus"):
        k -= 1
    rest = words[k:]
    if k == 0 or len(rest) > 3 or any(w in _NUMBER_WORDS or w in _MATH_WORDS for w in rest):
        return s
    value = _words_value(words[:k])
    return s if value is None else " ".join([str(value)] + rest)


def _apply_scale(s: str) -> str:
    """'1.45 million dollars' -> '1450000 dollars' (exact)."""
    m = _SCALE_RE.match(s)
    if m is None:
        return s
    value = Decimal(m.group(1).replace(",", "")) * _SCALE[m.group(2).lower()]
    number = format(value.normalize(), "f")
    return number + (" " + m.group(3).strip() if m.group(3) else "")


def clean(s: str) -> str:
    """Normalise an answer string for cheap comparison (bounded regex work; never parses)."""
    s = s.strip().translate(MINUS).replace("...", "\\ldots").replace("…", "\\ldots")
    s = _DEG_CF_RE.sub(r"\1", s)  # 30°F -> 30°, 30^\circ\text{C} -> 30^\circ
    for old, new in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", ""), ("{,}", ","),
                     ("\\displaystyle", ""), ("\\!", ""), ("\\,", " "), ("\\;", " "), ("\\:", " "), ("\\ ", " "),
                     ("~", " "), ("\\$", ""), ("$", ""), ("°", ""), ("\\degree", ""), ("\\%", ""), ("%", "")):
        s = s.replace(old, new)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s).replace("\\circ", "")
    for _ in range(3):
        s = TEXT_CMD_RE.sub(r"\1", s)
    s = _FRAC_RE.sub(lambda m: "\\frac{%s}{%s}" % (m.group(1).strip("{}"), m.group(2).strip("{}")), s)
    s = re.sub(r"\\sqrt\s*(\d)", r"\\sqrt{\1}", s)
    s = s.strip().rstrip(".").strip()
    m = re.match(r"^[A-Za-z](?:_\{?\w+\}?)?\s*(?:=|\\in)\s*(.+)$", s)  # "x = 5", "k=5", "x \in [1,2]"
    if m and "=" not in m.group(1):
        s = m.group(1)
    s = _apply_scale(_words_to_digits(s))
    m = _UNIT_RE.match(s)
    if m and not any(w.rstrip(".").lower() in _MATH_WORDS or w.rstrip(".").lower() in _SCALE
                     for w in m.group(2).split()):
        s = m.group(1)
    s = re.sub(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])|\s+", lambda m: m.group(1) + " " if m.group(1) else "", s)
    s = re.sub(r"^\(([A-Za-z])\)$", r"\1", s)  # multiple choice "(C)" -> "C"
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    if re.fullmatch(r"[A-Za-z ]+|\([A-Za-z]\)", s):
        s = s.lower()
    return s


_OVERLINE_RE = re.compile(r"([+-]?)(\d*)\.(\d{0,20})\\(?:overline|bar)\{(\d{1,20})\}")
_DOT_RE = re.compile(r"([+-]?)(\d*)\.(\d{0,20})\\dot\{?(\d)\}?")
_ELLIPSIS_RE = re.compile(r"([+-]?)(\d*)\.(\d{1,40})\\(?:ldots|dots|cdots)")


def repeating_value(s: str) -> Fraction | None:
    """Exact value of a cleaned repeating decimal (module doc); None if ``s`` is not one."""
    if len(s) > 100:
        return None
    m = _OVERLINE_RE.fullmatch(s) or _DOT_RE.fullmatch(s)
    if m:
        sign, whole, fixed, block = m.groups()
    else:
        m = _ELLIPSIS_RE.fullmatch(s)
        if m is None:
            return None
        sign, whole, digits = m.groups()
        for size in range(1, 7):
            block = digits[-size:]
            reps = 1
            while len(digits) >= (reps + 1) * size and digits[-(reps + 1) * size:-reps * size] == block:
                reps += 1
            if len(block) == size and reps >= (3 if size == 1 else 2):
                fixed = digits[:len(digits) - reps * size]
                break
        else:
            return None
    value = Fraction(int(whole or "0")) + Fraction(int(fixed or "0"), 10 ** len(fixed))
    value += Fraction(int(block), (10 ** len(block) - 1) * 10 ** len(fixed))
    return -value if sign == "-" else value


def as_number(s: str) -> Fraction | None:
    """Exact value of a cleaned plain number (int, decimal, a/b, \\frac{a}{b}, repeating decimal); None otherwise."""
    if len(s) > 100:
        return None
    try:
        if _NUM_RE.fullmatch(s):
            return Fraction(s)
        m = re.fullmatch(r"([+-]?\d+)/([+-]?\d+)", s)
        if m:
            return Fraction(int(m.group(1)), int(m.group(2)))
        m = _FRACNUM_RE.fullmatch(s)
        if m:
            value = Fraction(int(m.group(2)), int(m.group(3)))
            return -value if m.group(1) == "-" else value
        return repeating_value(s)
    except (ValueError, ZeroDivisionError):
        return None
