r"""Answer extraction and grading for GSM8K, MATH500 and AIME, built on math-verify.

Extraction (:func:`extract_answer`), in order:
  1. the content of the LAST complete ``\boxed{...}`` / ``\fbox{...}`` (nested braces matched; ``\boxed 5`` also
     works). Empty boxes and unbalanced/truncated boxes are skipped, so an earlier complete box can win;
  2. the text after the last ``#### `` (GSM8K style);
  3. the last ``The (final) answer is X`` / ``Final answer: X`` (rest of that line, cut at a sentence end,
     markdown ``**`` and ``$`` stripped);
  4. otherwise None.

Grading (:func:`grade_answer`) is layered so the common case never reaches sympy:
  * fast path: exact string match, then match after :func:`_clean` (``$``, ``\text{}``, spacing, ``\dfrac``,
    ``\frac12``, degrees, ``\%``, thousands commas, trailing units/words, a leading ``x =``), then exact rational
    comparison when both sides are plain numbers (ints, decimals, ``a/b``, ``\frac{a}{b}``);
  * slow path: math-verify ``parse``/``verify`` on the original and the cleaned pair (``$...$``-wrapped), in a
    worker subprocess with a hard deadline (see ``ssb._answer_timeout``: SIGKILL + restart on timeout, works from
    any thread or worker process; math-verify's signal-based timeout never runs in the caller). Results are cached.
  * hostile input: answers longer than ``MAX_ANSWER_CHARS``, numeric power towers (``9^{9^{9^{9}}}``), exponents with
    5+ digits and big factorials skip math-verify (exact string match only). Any exception -> False.

Deviations from plain math-verify (each has a case in tests/data/grading_cases.jsonl or a test):
  * unit words without ``\text`` ("18 dollars", "5.4 cents") are dropped; math-verify reads them as a product of
    symbols (``18*a*do*l*l*r*s``) and says False.
  * the answer is extracted by ssb (last complete box, then ``####``, then "the answer is"), not by math-verify's
    own anchors, and both sides are then wrapped in ``$...$``; a GSM8K gold may be a full solution (``#### N``).
  * GSM8K: exact rational comparison of plain numbers ("18.00" == "\$18" == "18"; "1,000" == "1000"), no
    symbolic or rounded matching when both sides are numbers.
  * AIME: the answer must be an integer in [0, 999] ("025" == "25"; "25.5", "1025", "-902" are wrong).
  * a set/interval may be compared with an inequality (``allow_set_relation_comp=True``): "-2 \le x \le 7" equals
    "x \in [-2,7]".
  * strict=True reproduces the paper: last ``\boxed{}`` content ``.strip()`` == gold ``.strip()``; no fallbacks.

Known leniencies (kept on purpose): a single-letter left-hand side is dropped on both sides ("y = 5" == "x = 5");
math-verify ignores base subscripts ("2516" == "2516_8") and strips glued unit letters ("540m" == "540").
"""

from __future__ import annotations

import re
from fractions import Fraction

from ssb._answer_timeout import MathVerifyWorker

__all__ = ["extract_answer", "answer_key", "grade", "grade_answer", "DATASETS", "MAX_ANSWER_CHARS", "TIMEOUT_S"]

DATASETS = {"gsm8k": "gsm8k", "math500": "math500", "math-500": "math500", "math": "math", "aime": "aime",
            "aime24": "aime", "aime25": "aime", "aime2024": "aime", "aime2025": "aime"}
MAX_ANSWER_CHARS = 1000  # longer extracted answers / golds are compared as exact strings only
MAX_BOX_CHARS = 20_000  # a \boxed{ whose closing brace is further away than this counts as unbalanced
TIMEOUT_S = 5.0  # hard deadline per math-verify call (worker killed and restarted after it)
_WORKER = MathVerifyWorker(timeout_s=TIMEOUT_S)

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_HASH_RE = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS_RE = re.compile(r"(?i)\b(?:the\s+)?(?:final\s+)?answer\s*(?:is\b|:)[ \t:]*([^\n]*)")


def _box_content(text: str, start: int) -> str | None:
    """Content of the box whose command ends at ``start`` (None if unbalanced or not a box)."""
    i = start
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        depth = 0
        for j in range(i, min(len(text), i + MAX_BOX_CHARS)):
            c = text[j]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1:j]
        return None
    m = re.match(r"[^\s$]+", text[i:i + 200]) if i > start else None  # "\boxed 5"
    return m.group(0) if m else None


def extract_answer(response: str) -> str | None:
    r"""Final answer of a model response (see the module docstring for the order of fallbacks).

    >>> extract_answer(r"so \boxed{\frac{1}{2}} or rather \boxed{\frac{\sqrt{3}}{2}}.")
    '\\frac{\\sqrt{3}}{2}'
    >>> extract_answer("She earns 18 dollars.\n#### 18"), extract_answer("The final answer is $42$."), extract_answer("hm")
    ('18', '42', None)
    """
    try:
        if not isinstance(response, str):
            return None
        for m in reversed(list(_BOX_RE.finditer(response))[-50:]):
            content = _box_content(response, m.end())
            if content is not None and content.strip():
                return content.strip()
        for regex in (_HASH_RE, _ANSWER_IS_RE):
            for m in reversed(list(regex.finditer(response))[-50:]):
                ans = re.split(r"\.(?:\s|$)", m.group(1).strip(), maxsplit=1)[0]
                ans = ans.replace("**", "").strip().strip("$").strip()
                ans = re.sub(r"^\\\(|\\\)$", "", ans).strip().rstrip(".").strip()
                if ans:
                    return ans
        return None
    except Exception:
        return None


_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_FRAC_RE = re.compile(r"\\frac\s*(\d|\{[^{}]*\})\s*(\d|\{[^{}]*\}|[A-Za-z])")
_UNIT_RE = re.compile(r"^(.*[\d}])\s+([A-Za-z]{2,}(?:\.?\s+[A-Za-z]{2,})*\.?)\s*(?:\^\{?[23]\}?)?$")
_MATH_WORDS = {"pi", "sqrt", "infty", "inf", "and", "or", "to", "cdot", "times", "div", "pm", "mp", "sin", "cos",
               "tan", "cot", "sec", "csc", "log", "ln", "exp", "mod", "pmod", "bmod", "in", "cup", "cap", "le", "ge"}
_NUM_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")
_FRACNUM_RE = re.compile(r"([+-]?)\\frac\{([+-]?\d+)\}\{([+-]?\d+)\}")
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")


def _clean(s: str) -> str:
    """Normalise an answer string for cheap comparison (bounded regex work; never parses)."""
    s = s.strip()
    for old, new in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", ""), ("{,}", ","),
                     ("\\displaystyle", ""), ("\\!", ""), ("\\,", " "), ("\\;", " "), ("\\:", " "), ("\\ ", " "),
                     ("~", " "), ("\\$", ""), ("$", ""), ("°", ""), ("\\degree", ""), ("\\%", ""), ("%", "")):
        s = s.replace(old, new)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s).replace("\\circ", "")
    for _ in range(3):
        s = _TEXT_CMD_RE.sub(r"\1", s)
    s = _FRAC_RE.sub(lambda m: "\\frac{%s}{%s}" % (m.group(1).strip("{}"), m.group(2).strip("{}")), s)
    s = re.sub(r"\\sqrt\s*(\d)", r"\\sqrt{\1}", s)
    s = s.strip().rstrip(".").strip()
    m = re.match(r"^[A-Za-z](?:_\{?\w+\}?)?\s*(?:=|\\in)\s*(.+)$", s)  # "x = 5", "k=5", "x \in [1,2]"
    if m and "=" not in m.group(1):
        s = m.group(1)
    m = _UNIT_RE.match(s)
    if m and not any(w.rstrip(".").lower() in _MATH_WORDS for w in m.group(2).split()):
        s = m.group(1)
    s = re.sub(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])|\s+", lambda m: m.group(1) + " " if m.group(1) else "", s)
    s = re.sub(r"^\(([A-Za-z])\)$", r"\1", s)  # multiple choice "(C)" -> "C"
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    if re.fullmatch(r"[A-Za-z ]+|\([A-Za-z]\)", s):
        s = s.lower()
    return s


def _as_number(s: str) -> Fraction | None:
    """Exact value of a cleaned plain number (int, decimal, a/b, \\frac{a}{b}); None otherwise."""
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
    except (ValueError, ZeroDivisionError):
        return None
    return None


def answer_key(answer: str, dataset: str = "math") -> str:
    r"""Canonical string for counting equal answers: '1,000', '1000.0', '$1000', '1000 dollars' -> '1000';
    '\frac{1}{2}', '0.5', '1/2' -> '1/2'. Deterministic; never raises.

    >>> [answer_key(a) for a in ("1,000", "1000.0", "$1000", "1000 dollars", "0.5", r"\dfrac12", "x = 5")]
    ['1000', '1000', '1000', '1000', '1/2', '1/2', '5']
    """
    try:
        if answer is None:
            return ""
        s = str(answer)
        if len(s) > MAX_ANSWER_CHARS:
            return s.strip()
        s = _clean(s)
        n = _as_number(s)
        if n is not None:
            return str(n.numerator) if n.denominator == 1 else f"{n.numerator}/{n.denominator}"
        return s
    except Exception:
        return str(answer).strip() if isinstance(answer, str) else ""


def _gold_string(gold, dataset: str) -> str:
    gold = str(gold).strip()
    if dataset == "gsm8k" and "####" in gold:
        gold = gold.rsplit("####", 1)[1].strip()
    return gold


def _risky(s: str) -> bool:
    """Inputs that could make sympy hang or explode: math-verify is skipped for them."""
    if len(s) > MAX_ANSWER_CHARS or "\x00" in s:
        return True
    if re.search(r"\^[\s{(]*\d[\d.]*[\s})]*\^", s):  # numeric power tower: 9^{9^{9^{9}}}, 2^2^100
        return True
    if re.search(r"\^[\s{(]*[+-]?\d{5,}|\d{4,}\s*!", s):  # 2^{100000}, 10000!
        return True
    return re.search(r"\\(?:def|newcommand|input|include)(?![A-Za-z])", s) is not None


_CACHE: dict[tuple[str, str, str, str], bool] = {}  # math-verify verdicts, timeouts included (as False)


def _math_verify(answer: str, gold: str, answer_clean: str, gold_clean: str) -> bool:
    key = (answer, gold, answer_clean, gold_clean)
    if key in _CACHE:
        return _CACHE[key]
    pairs = [(gold, answer)]
    if (gold_clean, answer_clean) != (gold, answer) and gold_clean and answer_clean:
        pairs.append((gold_clean, answer_clean))
    result = bool(_WORKER.verify(pairs))  # None (deadline hit) -> False; RuntimeError (no worker) is not cached
    if len(_CACHE) >= 100_000:
        _CACHE.clear()
    _CACHE[key] = result
    return result


def _grade(answer: str, gold: str, ds: str) -> bool:
    answer, gold = answer.strip(), gold.strip()
    if not answer or not gold:
        return False
    if answer == gold and ds != "aime":  # AIME still needs the integer/range check
        return True
    if len(answer) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    a, g = _clean(answer), _clean(gold)
    na, ng = _as_number(a), _as_number(g)
    if ds == "aime":
        if na is None and ng is not None and ng.denominator == 1 and not _risky(answer):
            return _math_verify(answer, gold, a, g)  # e.g. "5^2": math-verify decides, gold is an integer
        return na is not None and na.denominator == 1 and 0 <= na <= 999 and na == ng
    if a == g and a:
        return True
    if na is not None and ng is not None:
        if na == ng:
            return True
        if ds == "gsm8k" or ("." not in a and "." not in g):
            return False
    elif ds == "gsm8k" and ng is not None and na is None and re.search(r"\d", a) is None:
        return False  # gsm8k gold is a number; an answer without digits cannot match
    if _risky(answer) or _risky(gold):
        return False
    return _math_verify(answer, gold, a, g)


def grade_answer(answer: str | None, gold: str, dataset: str = "math") -> bool:
    """Same as :func:`grade` on an already-extracted answer (None -> False)."""
    ds = DATASETS.get(str(dataset).lower())
    if ds is None:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(set(DATASETS.values()))}")
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
    """
    ds = DATASETS.get(str(dataset).lower())
    if ds is None:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(set(DATASETS.values()))}")
    try:
        if strict:
            if not isinstance(response, str):
                return False
            boxes = list(_BOX_RE.finditer(response))
            content = _box_content(response, boxes[-1].end()) if boxes else None
            return content is not None and content.strip() == _gold_string(gold, ds)
        return grade_answer(extract_answer(response), gold, ds)
    except Exception:
        return False
