r"""Answer extraction and grading for GSM8K, MATH500 and AIME, built on math-verify.

Extraction (:func:`extract_answer`), in order:
  1. boxes: the content of the LAST complete ``\boxed{...}`` / ``\fbox{...}`` (nested braces matched; ``\boxed 5``
     also works). Empty boxes and unbalanced/truncated boxes are skipped, so an earlier complete box can win,
     with these refinements:

     * unclosed final box: if the last box command's closing brace is missing, its content up to the end of the
       math (``$``, ``\]``, ``\)``), the end of the line or the end of the reply counts as a box, if that content
       is non-empty, at most 200 characters, has balanced braces of its own and does not end in an operator
       (``$\boxed{18$.`` -> 18; ``\boxed{280`` at the very end -> 280). A box cut off inside an expression
       (``\boxed{\frac{1``) is still skipped;
     * a list written as several boxes: boxes joined only by ``,``, ``;`` or ``and`` (``$\boxed{3}$, $\boxed{5}$``,
       ``\boxed{1} and \boxed{-2}``) are read as one answer ``3, 5`` (repeats of the same value count once);
     * hedge: when the box before the final one holds a different value (by :func:`answer_key`; a mixed number
       such as ``15\frac{39}{40}`` also counts as its value, 639/40) and the text
       between them hedges, the reply has no answer (None, so it grades wrong). The text hedges when it, or one of
       its sentences or lines, starts with "or", "either", "alternatively" or "otherwise", or when it is at most
       80 characters and contains one of "or", "either", "maybe", "perhaps", "possibly", "might", "otherwise",
       "depending", "not sure"; unless it corrects instead ("rather", "actually", "wait", "recheck", "correct",
       "mistake", "error", "instead", "oops", "sorry", "redo", "fix", ...):
       ``\boxed{16} or \boxed{18}`` -> None, ``\boxed{16}, or rather \boxed{18}`` -> 18, and a plain revision
       ``first \boxed{26}, but ... \boxed{18}`` -> 18 (last box wins, as before);
  2. the text after the last ``#### `` (GSM8K style);
  3. the last ``The (final) answer is X`` / ``Final answer: X`` (rest of that line, cut at a sentence end,
     markdown ``**`` and ``$`` stripped);
  4. the last sentence, only for a reply with no box command and no ``####`` at all that ends with ``.`` or ``!``
     (not ``?``; a reply cut off mid-sentence has no answer): the number (integer, decimal, ``1,000``, ``a/b``,
     ``\frac{a}{b}``, ``%``, ``$`` and a Unicode minus allowed) that is alone after the sentence's last ``=``, else
     alone after its last "so / therefore / thus / hence / in total / altogether / total / overall", else alone
     after its last "is / are / was / were / equals / comes to / amounts to", else alone in the sentence ("She
     makes $18 a day." -> 18; "... so she makes $18 every day." -> 18; "Dividing by 3, the average is -10
     degrees." -> -10; "It is 18 or 26." -> None). Numbers in words are not read here;
  5. otherwise None.

Normalisation before comparing (:func:`_clean`, also used by :func:`answer_key`): ``$``, ``\text{}``, spacing,
``\dfrac``, ``\frac12``, degrees (also ``°F``/``°C``), ``\%``, thousands commas, trailing unit words, a leading
``x =``, and:
  * a Unicode minus (U+2212, also U+FE63 and U+FF0D) is ``-``;
  * integers written in English words, alone or followed by at most 3 unit words ("eighteen dollars" -> 18,
    "sixty-four", "two hundred (and) four", "a hundred", "two dozen", "negative three"); fractions in words are
    not read, and anything else after the number words leaves the answer as it was ("eighteen or twenty-six");
  * a number followed by a scale word hundred / thousand / million / billion / trillion (then at most unit words)
    is multiplied out exactly: "$1.45 million" -> 1450000. A scale word is never dropped as a unit word, so
    "1.45 million" no longer equals 1.45, and a bare "1.45" never equals 1450000;
  * repeating decimals are exact fractions: ``0.\overline{5}``, ``0.\bar{5}``, ``0.\dot{5}`` (= 5/9),
    ``4.\overline{6}``, ``0.5\overline{6}``; and ``0.555\ldots`` / ``0.555...`` / ``0.4545…`` when the digits end
    in a block repeated at least 3 times (one digit) or twice (2-6 digits). A repeating decimal is compared
    exactly, never by math-verify's rounding.

Grading (:func:`grade_answer`) is layered so the common case never reaches sympy:
  * compound units (decided here, never by math-verify): an answer made only of two or more "number unit" parts
    of one kind, largest unit first, joined by spaces, commas or "and", with only the last number a decimal
    ("2 hours 40 minutes", "3 hours and 35 minutes", "5 ft 3 in", "5 dollars and 25 cents") is converted with
    exact factors. Kinds: time (s, min, h, day, week), imperial length (in, ft, yd, mi), metric length (mm, cm,
    m, km), imperial mass (oz, lb), metric mass (g, kg), money (cent, dollar); singular, plural and the usual
    abbreviations ("m" is metres, never minutes). Against a gold that names a unit ("160 \text{ minutes}") it is
    converted to that unit (a unit of another kind or an unknown one: wrong); against a bare gold (GSM8K, AIME)
    it matches if the gold is its value in one of the units the answer itself uses (2 h 40 min = 160 minutes =
    2.666... hours: gold 160 matches, 240 or 2.4 do not). A single "number unit" answer is not converted
    ("4.4 hours" vs 280 stays wrong);
  * multiple choice: when the gold is a choice letter A-J (``\text{(C)}``, ``(C)``, ``C``), an answer that is a
    letter in parentheses, or a letter followed by ``)``, ``:`` or ``.``, then its option text (``(C) Plane``,
    ``\textbf{(B)}\ 3(1 + r/10)^x = 7``, ``C: Plane``) is graded by the letter alone, unless the text names
    another choice or says "or" (a hedge: falls through to the generic comparison, which fails);
  * fast path: exact string match, then match after :func:`_clean`, then exact rational comparison when both
    sides are plain numbers (ints, decimals, ``a/b``, ``\frac{a}{b}``, repeating decimals);
  * slow path: math-verify ``parse``/``verify`` on the original and the cleaned pair (``$...$``-wrapped), in a
    pool of worker subprocesses with a hard deadline per call that includes any wait for a free worker (see
    ``ssb._answer_timeout``: SIGKILL + restart on timeout, works from any thread or worker process;
    math-verify's signal-based timeout never runs in the caller). Results are cached; a call that finds no free
    worker in time (``WorkerBusy``: load, not a verdict) grades False and is not cached. ``WORKERS`` workers at
    most; more concurrent grading threads than that wait, within their deadline.
  * hostile input: answers longer than ``MAX_ANSWER_CHARS``, numeric power towers (``9^{9^{9^{9}}}``), exponents with
    5+ digits and big factorials skip math-verify (exact string match only). Any exception -> False.

Deviations from plain math-verify (each has a case in tests/data/grading_cases.jsonl or a test):
  * unit words without ``\text`` ("18 dollars", "5.4 cents") are dropped; math-verify reads them as a product of
    symbols (``18*a*do*l*l*r*s``) and says False. Number words, scale words, compound units, choice texts and
    repeating decimals (above) are read by ssb; math-verify gets them wrong (symbols, or 0.\overline{5} = 0).
  * the answer is extracted by ssb (rules above), not by math-verify's own anchors, and both sides are then
    wrapped in ``$...$``; a GSM8K gold may be a full solution (``#### N``).
  * GSM8K: exact rational comparison of plain numbers ("18.00" == "\$18" == "18"; "1,000" == "1000"), no
    symbolic or rounded matching when both sides are numbers.
  * AIME: the answer must be an integer in [0, 999] ("025" == "25"; "25.5", "1025", "-902" are wrong).
  * a set/interval may be compared with an inequality (``allow_set_relation_comp=True``): "-2 \le x \le 7" equals
    "x \in [-2,7]".
  * strict=True reproduces the paper: last ``\boxed{}`` content ``.strip()`` == gold ``.strip()``; no fallbacks and
    none of the rules above.

Known leniencies (kept on purpose): a single-letter left-hand side is dropped on both sides ("y = 5" == "x = 5");
math-verify ignores base subscripts ("2516" == "2516_8") and strips glued unit letters ("540m" == "540").
"""

from __future__ import annotations

import re
from decimal import Decimal
from fractions import Fraction

from ssb._answer_timeout import MathVerifyWorker
from ssb.choices import GRADERS

__all__ = ["extract_answer", "answer_key", "grade", "grade_answer", "DATASETS", "MAX_ANSWER_CHARS", "TIMEOUT_S",
           "WORKERS"]

DATASETS = {**{g: g for g in GRADERS},  # a grader's name, or a data set's that uses it -> the grader
            "math-500": "math500", "aime24": "aime", "aime25": "aime", "aime2024": "aime", "aime2025": "aime"}
MAX_ANSWER_CHARS = 1000  # longer extracted answers / golds are compared as exact strings only
MAX_BOX_CHARS = 20_000  # a \boxed{ whose closing brace is further away than this counts as unbalanced
MAX_UNCLOSED_CHARS = 200  # longest content read from an unclosed final \boxed{
HEDGE_WINDOW = 80  # text between two boxes this short that contains a hedge word makes the reply hedged
TIMEOUT_S = 5.0  # hard deadline per math-verify call, waiting for a worker included (worker killed after it)
WORKERS = 4  # math-verify worker processes at most (started on demand)
VERIFIER = MathVerifyWorker(timeout_s=TIMEOUT_S, size=WORKERS)

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_HASH_RE = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS_RE = re.compile(r"(?i)\b(?:the\s+)?(?:final\s+)?answer\s*(?:is\b|:)[ \t:]*([^\n]*)")
_MINUS = str.maketrans({"\u2212": "-", "\ufe63": "-", "\uff0d": "-"})
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")


# --- extraction --------------------------------------------------------------------------------------------------


def _box_span(text: str, start: int) -> tuple[str, int] | None:
    """(content, end) of the box whose command ends at ``start``; None if unbalanced or not a box."""
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
                    return text[i + 1:j], j + 1
        return None
    m = re.match(r"[^\s$]+", text[i:i + 200]) if i > start else None  # "\boxed 5"
    return (m.group(0), i + m.end()) if m else None


def has_box(text: str) -> bool:
    r"""True if ``text`` has a complete, non-empty ``\boxed{...}`` (balanced braces).

    >>> has_box(r"so \boxed{4}"), has_box(r"so \boxed{}"), has_box(r"so \boxed{4")
    (True, False, False)
    """
    return any((_box_content(text, m.end()) or "").strip() for m in _BOX_RE.finditer(text))


def _box_content(text: str, start: int) -> str | None:
    """Content of the box whose command ends at ``start`` (None if unbalanced or not a box)."""
    span = _box_span(text, start)
    return span[0] if span else None


_UNCLOSED_STOP_RE = re.compile(r"\$|\n|\\\]|\\\)")


def _unclosed_box(text: str, start: int) -> tuple[str, int] | None:
    """(content, end) of an unclosed final box: up to the end of the math, line or reply (see the module doc)."""
    i = start
    while i < len(text) and text[i] in " \t":
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    window = text[i + 1:i + 2 + MAX_UNCLOSED_CHARS]
    m = _UNCLOSED_STOP_RE.search(window)
    if m is None and i + 1 + len(window) < len(text):
        return None  # no stop within reach: not a short answer
    stop = m.start() if m else len(window)
    content = window[:stop].strip().rstrip(".,;").strip()
    if not content or len(content) > MAX_UNCLOSED_CHARS or _BOX_RE.search(content):
        return None
    depth = 0
    for c in content:
        depth += (c == "{") - (c == "}")
        if depth < 0:
            return None
    if depth != 0 or content[-1] in "+-*/=^_\\({[,<>&|":
        return None  # cut off inside an expression
    return content, i + 1 + stop


def _boxes(response: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of the non-empty boxes among the last 50 box commands, in text order; the very last
    command may be an unclosed box."""
    commands = list(_BOX_RE.finditer(response))[-50:]
    out = []
    for k, m in enumerate(commands):
        span = _box_span(response, m.end())
        if span is None and k == len(commands) - 1:
            span = _unclosed_box(response, m.end())
        if span is not None and span[0].strip():
            out.append((m.start(), span[1], span[0].strip()))
    return out


_LIST_SEP_RE = re.compile(r"(?i)(?:[,;]|(?:,\s*)?and)?")
_HEDGE_OPENER_RE = re.compile(r"(?i)(?:^[\s.,;:!?()*$\-]*|[.!?;:]\s+[(*$\-]*|\n[\s(*$\-]*)"
                              r"(?:or|either|alternatively|otherwise)\b")
_HEDGE_RE = re.compile(r"(?i)\b(?:or|either|maybe|perhaps|possibly|might|otherwise|depending|not sure)\b")
_CORRECTION_RE = re.compile(r"(?i)\b(?:rather|actually|wait|re-?check\w*|recalculat\w*|recomput\w*|correct\w*|"
                            r"mistake\w*|error|instead|oops|sorry|on second thought|redo|fix\w*)\b")


def _plain(s: str) -> str:
    """Text of an answer or connector for word-level rules: math delimiters, ``$``, LaTeX spacing and ``\\text{}``
    wrappers removed, whitespace collapsed (bounded regex work; never parses)."""
    s = s.translate(_MINUS)
    for old, new in (("\\$", ""), ("$", ""), ("\\(", " "), ("\\)", " "), ("\\[", " "), ("\\]", " "), ("\\ ", " "),
                     ("~", " "), ("\\,", " "), ("\\;", " "), ("\\:", " "), ("\\!", ""), ("\\qquad", " "),
                     ("\\quad", " ")):
        s = s.replace(old, new)
    for _ in range(3):
        s = _TEXT_CMD_RE.sub(r" \1 ", s)
    return " ".join(s.split())


def _is_hedge(between: str) -> bool:
    between = between[:2000]
    text = _plain(between)
    if _CORRECTION_RE.search(text):
        return False
    if _HEDGE_OPENER_RE.search(between):
        return True
    return len(between) <= HEDGE_WINDOW and _HEDGE_RE.search(text) is not None


_MIXED_RE = re.compile(r"^\s*(-?)(\d+)\s*\\[dt]?frac\{(\d+)\}\{(\d+)\}\s*$")


def _same_value_keys(content: str) -> set[str]:
    r"""The keys a box's value may have: :func:`answer_key`, and for a mixed number (``15\frac{39}{40}``) also
    its value as one (639/40): two boxes that agree on either are the same answer written twice, not a hedge."""
    keys = {answer_key(content)}
    m = _MIXED_RE.match(content)
    if m and int(m.group(4)):
        value = int(m.group(2)) + Fraction(int(m.group(3)), int(m.group(4)))
        keys.add(_number_key(-value if m.group(1) else value))
    return keys


def _boxed_answer(response: str, boxes: list[tuple[int, int, str]]) -> tuple[str | None, bool]:
    """(answer, hedged) from the boxes of a response: the final box, or a list of boxes (see the module doc)."""
    k = len(boxes) - 1
    while k > 0:  # a list: boxes joined by ',' ';' 'and'
        prev, cur = boxes[k - 1], boxes[k]
        if prev[1] > cur[0] or not _LIST_SEP_RE.fullmatch(_plain(response[prev[1]:cur[0]])):
            break
        k -= 1
    group = boxes[k:]
    keys: list[str] = []
    contents: list[str] = []
    for _, _, content in group:
        key = answer_key(content)
        if key not in keys:
            keys.append(key)
            contents.append(content)
    if k > 0:
        prev = boxes[k - 1]
        if (prev[1] <= group[0][0] and not _same_value_keys(prev[2]) & set(keys)
                and _is_hedge(response[prev[1]:group[0][0]])):
            return None, True
    return ", ".join(contents), False


_SENT_NUM_RE = re.compile(r"(?<![\w.\\])-?(?:\\frac\{-?\d+\}\{\d+\}|\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
                          r"(?:/\d+)?)(?:\s*\\?%)?(?![\w{])")
_CONCLUSION_RE = re.compile(r"(?i)\b(?:so|therefore|thus|hence|in total|altogether|total|overall)\b")
_COPULA_RE = re.compile(r"(?i)\b(?:is|are|was|were|equals|comes to|amounts to)\b")


def _last_sentence_answer(response: str) -> str | None:
    """The number the last sentence states (module doc, extraction step 4); None if it states none or several."""
    if _BOX_RE.search(response) or "####" in response:
        return None  # the model meant to mark an answer and we could not read it: don't guess
    text = re.sub(r"(?:\s|\*|\$|\\\)|\\\])+$", "", response[-2000:].translate(_MINUS))
    if not text or text[-1] not in ".!":
        return None
    body = text[:-1]
    last = None
    for last in re.finditer(r"[.!?](?=\s)|\n", body):
        pass
    sentence = body[last.end():] if last else body
    if len(sentence) > 500:
        return None
    for old, new in (("\\$", ""), ("$", ""), ("**", ""), ("\\(", ""), ("\\)", ""), ("\\dfrac", "\\frac"),
                     ("\\tfrac", "\\frac"), ("{,}", ","), ("\\!", ""), ("\\,", " ")):
        sentence = sentence.replace(old, new)
    tails = []
    if "=" in sentence:
        tails.append(sentence.rsplit("=", 1)[1])
    for marker in (_CONCLUSION_RE, _COPULA_RE):
        found = list(marker.finditer(sentence))
        if found:
            tails.append(sentence[found[-1].end():])
    tails.append(sentence)
    for tail in tails:
        numbers = _SENT_NUM_RE.findall(tail)
        if len(numbers) == 1:
            return numbers[0].strip()
    return None


def extract_answer(response: str) -> str | None:
    r"""Final answer of a model response (see the module docstring for the order of fallbacks).

    >>> extract_answer(r"so \boxed{\frac{1}{2}} or rather \boxed{\frac{\sqrt{3}}{2}}.")
    '\\frac{\\sqrt{3}}{2}'
    >>> extract_answer("She earns 18 dollars.\n#### 18"), extract_answer("The final answer is $42$."), extract_answer("hm")
    ('18', '42', None)
    >>> extract_answer(r"It is \boxed{16} or \boxed{18}."), extract_answer(r"So $\boxed{18$."), extract_answer("She makes $18.")
    (None, '18', '18')
    """
    try:
        if not isinstance(response, str):
            return None
        boxes = _boxes(response)
        if boxes:
            answer, hedged = _boxed_answer(response, boxes)
            return None if hedged else answer
        for regex in (_HASH_RE, _ANSWER_IS_RE):
            for m in reversed(list(regex.finditer(response))[-50:]):
                ans = re.split(r"\.(?:\s|$)", m.group(1).strip(), maxsplit=1)[0]
                ans = ans.replace("**", "").strip().strip("$").strip()
                ans = re.sub(r"^\\\(|\\\)$", "", ans).strip().rstrip(".").strip()
                if ans:
                    return ans
        return _last_sentence_answer(response)
    except Exception:
        return None


# --- normalisation -----------------------------------------------------------------------------------------------

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


def _clean(s: str) -> str:
    """Normalise an answer string for cheap comparison (bounded regex work; never parses)."""
    s = s.strip().translate(_MINUS).replace("...", "\\ldots").replace("…", "\\ldots")
    s = _DEG_CF_RE.sub(r"\1", s)  # 30°F -> 30°, 30^\circ\text{C} -> 30^\circ
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


def _repeating_value(s: str) -> Fraction | None:
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


def _as_number(s: str) -> Fraction | None:
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
        return _repeating_value(s)
    except (ValueError, ZeroDivisionError):
        return None


# --- compound units and multiple choice --------------------------------------------------------------------------

_UNITS: dict[str, tuple[str, int]] = {}
for _kind, _factor, _names in (
    ("time", 1, "s sec secs second seconds"), ("time", 60, "min mins minute minutes"),
    ("time", 3600, "h hr hrs hour hours"), ("time", 86400, "day days"), ("time", 604800, "week weeks"),
    ("imperial length", 1, "in inch inches"), ("imperial length", 12, "ft foot feet"),
    ("imperial length", 36, "yd yard yards"), ("imperial length", 63360, "mi mile miles"),
    ("metric length", 1, "mm millimeter millimeters millimetre millimetres"),
    ("metric length", 10, "cm centimeter centimeters centimetre centimetres"),
    ("metric length", 1000, "m meter meters metre metres"),
    ("metric length", 10**6, "km kilometer kilometers kilometre kilometres"),
    ("imperial mass", 1, "oz ounce ounces"), ("imperial mass", 16, "lb lbs pound pounds"),
    ("metric mass", 1, "g gram grams"), ("metric mass", 1000, "kg kilogram kilograms"),
    ("money", 1, "cent cents"), ("money", 100, "dollar dollars"),
):
    for _name in _names.split():
        _UNITS[_name] = (_kind, _factor)
_PART_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]+)\.?")
_PART_GAP_RE = re.compile(r"[\s,]*(?:and[\s,]*)?")
_GOLD_UNIT_RE = re.compile(r"([+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+)\s*(?:([a-z]+)\.?)?")


def _compound(s: str) -> tuple[str, Fraction, list[int]] | None:
    """(kind, total in the kind's smallest unit, unit factors) of a compound-unit answer ('2 hours 40 minutes');
    None unless the whole answer is 2+ 'number unit' parts of one kind, largest first (module doc)."""
    if len(s) > 200:
        return None
    p = _plain(s).lower()
    parts = list(_PART_RE.finditer(p))
    if len(parts) < 2:
        return None
    pos = 0
    for m in parts:
        if not _PART_GAP_RE.fullmatch(p[pos:m.start()]):
            return None
        pos = m.end()
    if p[pos:].strip(" ."):
        return None
    units = [_UNITS.get(m.group(2)) for m in parts]
    if any(u is None for u in units) or len({u[0] for u in units}) != 1:  # type: ignore[index]
        return None
    factors = [u[1] for u in units]  # type: ignore[index]
    if any(a <= b for a, b in zip(factors, factors[1:])) or any("." in m.group(1) for m in parts[:-1]):
        return None
    total = sum((Fraction(m.group(1)) * f for m, f in zip(parts, factors)), Fraction(0))
    return units[0][0], total, factors  # type: ignore[index]


def _compound_matches(compound: tuple[str, Fraction, list[int]], gold: str) -> bool:
    kind, total, factors = compound
    other = _compound(gold)
    if other is not None:
        return other[0] == kind and other[1] == total
    m = _GOLD_UNIT_RE.fullmatch(_plain(gold).lower())
    if m is None:
        return False
    value = Fraction(m.group(1).replace(",", ""))
    if m.group(2):
        unit = _UNITS.get(m.group(2))
        return unit is not None and unit[0] == kind and total == value * unit[1]
    return any(total == value * f for f in factors)


_CHOICE_GOLD_RE = re.compile(r"\(?\s*([A-J])\s*\)?")
_CHOICE_ANSWER_RE = re.compile(r"(?:\(\s*([A-J])\s*\)|([A-J])\s*[):.])\s*(\S.*)", re.S)
_OTHER_CHOICE_RE = re.compile(r"\(\s*[A-J]\s*\)|\b[A-J]\s*[):]|\bor\b")


def _choice_letter(gold: str) -> str | None:
    """'C' for a multiple-choice gold ('\\text{(C)}', '(C)', 'C'); None otherwise."""
    m = _CHOICE_GOLD_RE.fullmatch(_plain(gold)) if len(gold) < 40 else None
    return m.group(1) if m else None


def _choice_with_text(answer: str) -> str | None:
    """'C' for a choice letter followed by its option text ('(C) Plane', 'C: Plane'); None otherwise."""
    m = _CHOICE_ANSWER_RE.fullmatch(_plain(answer)) if len(answer) < 300 else None
    if m is None or _OTHER_CHOICE_RE.search(m.group(3)):
        return None
    return m.group(1) or m.group(2)


def _number_key(n: Fraction) -> str:
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
        compound = _compound(s)
        if compound is not None:
            return _number_key(compound[1] / compound[2][-1])
        letter = _choice_with_text(s)
        if letter is not None:
            return letter.lower()
        s = _clean(s)
        n = _as_number(s)
        return _number_key(n) if n is not None else s
    except Exception:
        return str(answer).strip() if isinstance(answer, str) else ""


# --- grading -----------------------------------------------------------------------------------------------------


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


VERDICTS: dict[tuple[str, str, str, str], bool] = {}  # math-verify verdicts, timeouts included (as False)


def _math_verify(answer: str, gold: str, answer_clean: str, gold_clean: str) -> bool:
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


def _grade(answer: str, gold: str, ds: str) -> bool:
    answer, gold = answer.strip(), gold.strip()
    if not answer or not gold:
        return False
    if answer == gold and ds != "aime":  # AIME still needs the integer/range check
        return True
    if len(answer) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    compound = _compound(answer)
    if compound is not None:
        return _compound_matches(compound, gold)
    letter = _choice_letter(gold)
    if letter is not None:
        chosen = _choice_with_text(answer)
        if chosen is not None:
            return chosen == letter
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
        if ds == "gsm8k" or ("." not in a and "." not in g) or _repeating_value(a) is not None \
                or _repeating_value(g) is not None:
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
            boxes = list(_BOX_RE.finditer(response))
            content = _box_content(response, boxes[-1].end()) if boxes else None
            return content is not None and content.strip() == _gold_string(gold, ds)
        return grade_answer(extract_answer(response), gold, ds)
    except Exception:
        return False
