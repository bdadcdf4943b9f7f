r"""Answer extraction and grading for GSM8K, MATH500 and AIME, built on math-verify: the rules, in one place.

The parts: :mod:`ssb.grading.extract` (the final answer of a reply), :mod:`ssb.grading.normalise` (text to a
canonical form, numbers), :mod:`ssb.grading.units` (compound units, multiple choice), :mod:`ssb.grading.keys` (one
key per answer value), :mod:`ssb.grading.grader` (the layered comparison), :mod:`ssb.grading.verify` (the math-verify
call) and :mod:`ssb.grading.worker` (its killable worker processes). This module exports the public API.

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

Normalisation before comparing (:func:`clean`, also used by :func:`answer_key`): ``$``, ``\text{}``, spacing,
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
  * fast path: exact string match, then match after :func:`clean`, then exact rational comparison when both
    sides are plain numbers (ints, decimals, ``a/b``, ``\frac{a}{b}``, repeating decimals);
  * slow path: math-verify ``parse``/``verify`` on the original and the cleaned pair (``$...$``-wrapped), in a
    pool of worker subprocesses with a hard deadline per call that includes any wait for a free worker (see
    :mod:`ssb.grading.worker`: SIGKILL + restart on timeout, works from any thread or worker process;
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

from ssb.grading.extract import extract_answer, has_box
from ssb.grading.grader import DATASETS, grade, grade_answer
from ssb.grading.keys import answer_key
from ssb.grading.normalise import MAX_ANSWER_CHARS
from ssb.grading.verify import TIMEOUT_S, WORKERS

__all__ = ["extract_answer", "has_box", "answer_key", "grade", "grade_answer", "DATASETS", "MAX_ANSWER_CHARS",
           "TIMEOUT_S", "WORKERS"]
