"""The final answer of a reply: boxes (with the unclosed, list and hedge rules), ``####``, "the answer is", the last
sentence (the rules: :mod:`ssb.grading`)."""

from __future__ import annotations

import re
from fractions import Fraction


from ssb.grading.keys import answer_key, number_key
from ssb.grading.normalise import MINUS, plain

MAX_BOX_CHARS = 20_000  # a \boxed{ whose closing brace is further away than this counts as unbalanced
MAX_UNCLOSED_CHARS = 200  # longest content read from an unclosed final \boxed{
HEDGE_WINDOW = 80  # text between two boxes this short that contains a hedge word makes the reply hedged

BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_HASH_RE = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS_RE = re.compile(r"(?i)\b(?:the\s+)?(?:final\s+)?answer\s*(?:is\b|:)[ \t:]*([^\n]*)")

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
    return any((box_content(text, m.end()) or "").strip() for m in BOX_RE.finditer(text))


def box_content(text: str, start: int) -> str | None:
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
    if not content or len(content) > MAX_UNCLOSED_CHARS or BOX_RE.search(content):
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
    commands = list(BOX_RE.finditer(response))[-50:]
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


def _is_hedge(between: str) -> bool:
    between = between[:2000]
    text = plain(between)
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
        keys.add(number_key(-value if m.group(1) else value))
    return keys


def _boxed_answer(response: str, boxes: list[tuple[int, int, str]]) -> tuple[str | None, bool]:
    """(answer, hedged) from the boxes of a response: the final box, or a list of boxes (see the module doc)."""
    k = len(boxes) - 1
    while k > 0:  # a list: boxes joined by ',' ';' 'and'
        prev, cur = boxes[k - 1], boxes[k]
        if prev[1] > cur[0] or not _LIST_SEP_RE.fullmatch(plain(response[prev[1]:cur[0]])):
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
    if BOX_RE.search(response) or "####" in response:
        return None  # the model meant to mark an answer and we could not read it: don't guess
    text = re.sub(r"(?:\s|\*|\$|\\\)|\\\])+$", "", response[-2000:].translate(MINUS))
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
