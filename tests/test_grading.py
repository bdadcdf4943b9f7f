"""Tests for ssb.grading: a case table from real GSM8K / MATH500 / AIME24 gold answers, extraction, answer keys,
hostile inputs (also from threads and forked processes) and the worker's hard deadline."""

from __future__ import annotations

import doctest
import json
import multiprocessing
import threading
import time
from pathlib import Path

import pytest

import ssb.grading
import ssb.grading.extract
import ssb.grading.keys
import ssb.grading.grader
import ssb.grading.verify
import ssb.grading.worker
from ssb.grading.worker import MathVerifyWorker
from ssb.grading import answer_key, extract_answer, grade, grade_answer

CASES_PATH = Path(__file__).parent / "data" / "grading_cases.jsonl"
CASES = [json.loads(line) for line in CASES_PATH.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize("module", [ssb.grading.extract, ssb.grading.grader, ssb.grading.keys])
def test_doctests(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


# --- case table -------------------------------------------------------------------------------------------------


def test_case_table_shape():
    assert len(CASES) >= 100
    assert {c["dataset"] for c in CASES} == {"gsm8k", "math500", "aime"}
    assert sum(c["expected"] for c in CASES) >= 40 and sum(not c["expected"] for c in CASES) >= 40
    # strict cases where strict and lenient grading disagree
    differ = [c for c in CASES if c["strict"] and grade(c["response"], c["gold"], c["dataset"]) != c["expected"]]
    assert len(differ) >= 5


@pytest.mark.parametrize("case", CASES, ids=[f"{i}-{c['ref']}" for i, c in enumerate(CASES)])
def test_case_table(case):
    got = grade(case["response"], case["gold"], case["dataset"], strict=case["strict"])
    assert got is case["expected"], case["note"]


def _real_gold(data: Path, ref: str) -> str:
    name, idx = ref.split("#")
    path = data / name / "test.jsonl"
    row = json.loads(path.read_text(encoding="utf-8").splitlines()[int(idx)])
    return row["answer"].split("####")[-1].strip() if name == "gsm8k" else row["answer"]


@pytest.mark.full_data
def test_case_table_golds_are_real(full_data_dir):
    for c in CASES:
        assert _real_gold(full_data_dir, c["ref"]) == c["gold"], c["ref"]


# Gold solutions the grader gets wrong, each with why: known grading bugs, listed so the test still catches every
# new one, and fails when one is fixed (then delete it here).
KNOWN_MISGRADED_GOLD: dict[str, str] = {}  # problem id -> why its gold solution grades wrong (none today)


@pytest.mark.full_data
@pytest.mark.parametrize("name, split, solution_field", [
    ("gsm8k", "train", "answer"), ("gsm8k", "test", "answer"), ("math500", "test", "solution")])
def test_every_gold_solution_grades_correct_against_its_own_answer(name, split, solution_field, full_data_dir):
    from ssb.config import DatasetConfig
    from ssb.data import load_problems

    rows = [json.loads(line) for line in (full_data_dir / name / f"{split}.jsonl").read_text("utf-8").splitlines()]
    problems = load_problems(DatasetConfig(name, split=split), data_dir=full_data_dir)
    assert len(rows) == len(problems) > 0
    wrong = {p.id for row, p in zip(rows, problems) if not grade(row[solution_field], p.answer, p.grader)}
    known = {p.id for p in problems} & KNOWN_MISGRADED_GOLD.keys()
    assert not wrong - known, f"{len(wrong - known)} gold solutions grade wrong: {sorted(wrong - known)[:10]}"
    assert not known - wrong, f"graded right now, remove from KNOWN_MISGRADED_GOLD: {sorted(known - wrong)}"


# --- extraction --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, expected",
    [
        (r"\boxed{5}", "5"),
        (r"first \boxed{3} then \boxed{4}", "4"),
        (r"\boxed{\frac{a^{2}}{\sqrt{b_{1}}}}", r"\frac{a^{2}}{\sqrt{b_{1}}}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"so $\boxed 5$.", "5"),
        (r"\fbox{7}", "7"),
        (r"\boxed{ 12 }", "12"),
        (r"\boxed{8} ... \boxed{}", "8"),  # empty last box is skipped
        (r"\boxed{8} ... \boxed{9", "9"),  # unclosed final box: read to the end of the reply
        (r"\boxed{8} ... \boxed{\frac{1", "8"),  # cut off inside an expression: skipped
        (r"So $\boxed{18$.", "18"),  # unclosed final box: read to the end of the math
        (r"\boxed{18} or \boxed{26}", None),  # hedge
        ("\\boxed{18}.\n\nAlternatively, counting twice, it is \\boxed{26}.", None),  # hedge in a later sentence
        (r"\boxed{26}, or rather \boxed{18}", "18"),  # a correction, not a hedge
        (r"\boxed{18} or \boxed{18.00}", "18.00"),  # same value twice: not a hedge
        (r"\boxed{1} and \boxed{-2}", "1, -2"),  # a list
        (r"$\boxed{3}$, $\boxed{3}$", "3"),
        ("She makes $18 a day.", "18"),  # no box: the last sentence states the number
        ("She has 9 eggs left, so she makes 9 * 2 = 18 dollars.", "18"),
        ("Done. The temperature was \u22123 degrees!", "-3"),
        ("So does she make 18 dollars?", None),  # a question states nothing
        ("It is 18 or 26.", None),  # two numbers
        ("She sells 9 eggs, so she makes", None),  # cut off mid-sentence
        (r"\boxed{} She makes 18 dollars.", None),  # a box command that cannot be read: no guessing
        (r"\boxed{", None),
        ("no answer at all", None),
        ("", None),
        ("work\n#### 1,000\n", "1,000"),
        ("#### 5\nmore\n#### 6", "6"),
        ("So the answer is 42.", "42"),
        ("The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
        ("**Final Answer:** 17", "17"),
        ("The answer is 3.5 meters.", "3.5 meters"),
        ("#### 7\nThe answer is 8", "7"),  # '####' comes before 'the answer is'
        (r"The answer is 8, i.e. \boxed{9}", "9"),  # a box beats the fallbacks
        (r"\boxedx{3}", None),
    ],
)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def test_extract_answer_non_string():
    assert extract_answer(None) is None  # type: ignore[arg-type]
    assert extract_answer(b"\\boxed{1}") is None  # type: ignore[arg-type]


# --- answer keys -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answers, key",
    [
        (["1,000", "1000.0", "$1000", "1000 dollars", r"\$1{,}000", r"1,\!000", "1000.00", r"1000 \text{ dollars}"], "1000"),
        ([r"\frac{1}{2}", r"\dfrac12", "0.5", "1/2", ".5", r"\frac 12"], "1/2"),
        (["x = 5", "k=5", "5", r"5^\circ", r"5\%", "5 cm", r"5 \text{ cm}^2"], "5"),
        (["-3", "-3.0", r"-\frac{3}{1}"], "-3"),
        ([r"\text{(C)}", "(C)", "C", r"\textbf{(C)}"], "c"),
        ([r"\text{East}", "east"], "east"),
        ([r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"], r"(3,\frac{\pi}{2})"),
        (["\u22123", "-3", "\u22123.0", "negative three"], "-3"),
        (["eighteen", "18", "eighteen dollars", r"\text{eighteen}"], "18"),
        (["two hundred four", "two hundred and four", "204"], "204"),
        (["1.45 million", "1,450,000", r"\$1.45 \text{ million}", "1450000", "1.45 million dollars"], "1450000"),
        (["2 hours 40 minutes", "160", "160 minutes", r"2 \text{ hours and } 40 \text{ minutes}"], "160"),
        ([r"0.\overline{3}", r"\frac13", "0.333...", r"0.\dot{3}"], "1/3"),
        ([r"\text{(C) Plane}", r"\text{(C)}", "C: Plane", "(C)"], "c"),
    ],
)
def test_answer_key_groups(answers, key):
    assert {answer_key(a) for a in answers} == {key}


def test_answer_key_distinguishes_and_is_total():
    assert answer_key("025", "aime") == answer_key("25", "aime") == "25"
    assert answer_key("18") != answer_key("81")
    assert answer_key(r"\frac{1}{3}") != answer_key("0.333")
    assert answer_key(r"2\sqrt{2}") == answer_key(r"2 \sqrt{2}")
    assert answer_key("1.45") != answer_key("1.45 million") != answer_key("1.45 billion")
    assert answer_key("sixty") != answer_key("64") and answer_key("eighteen or twenty") != answer_key("18")
    assert answer_key("1 hour 45 minutes") != answer_key("145") and answer_key("0.33...") != answer_key(r"\frac13")
    for junk in ["", "   ", "{{{", "\x00\xff", "x" * 2_000_000, r"9^{9^{9^{9}}}", None]:
        k1, k2 = answer_key(junk), answer_key(junk)  # type: ignore[arg-type]
        assert isinstance(k1, str) and k1 == k2


# --- grade_answer / arguments ------------------------------------------------------------------------------------


def test_grade_answer_basics():
    assert grade_answer(None, "5") is False
    assert grade_answer("", "5") is False
    assert grade_answer("5", "") is False
    assert grade_answer("18.00", 18, "gsm8k") is True  # type: ignore[arg-type]  # integer gold
    assert grade_answer("1000", "1,000", "gsm8k") is True
    full_solution = "She has 10 - 2 = <<10-2=8>>8 apples.\n#### 8"
    assert grade_answer("8", full_solution, "gsm8k") is True
    assert grade(r"\boxed{8}", full_solution, "gsm8k", strict=True) is True
    assert grade_answer("025", "25", "AIME24") is True  # case-insensitive alias
    with pytest.raises(ValueError):
        grade_answer("5", "5", "mmlu")
    with pytest.raises(ValueError):
        grade(r"\boxed{5}", "5", dataset="unknown")


def test_plain_math_verify_gets_unit_words_wrong():
    """The deviation fixed for bare unit words: math-verify alone says False (run here in the main thread)."""
    from math_verify import parse, verify

    assert verify(parse("$18$"), parse("$18 dollars$")) is False
    assert grade_answer("18 dollars", "18", "math") is True


# --- hostile input and time limits -------------------------------------------------------------------------------

HOSTILE = [
    "x" * 1_000_000,
    r"\boxed{" + "7" * 1_000_000 + "}",
    r"\boxed{9^{9^{9^{9}}}}",
    r"\boxed{2^{2^{2^{2^{2^{2}}}}}}",
    r"\boxed{9^{999999999}}",
    r"\boxed{100000!}",
    r"\boxed{" * 50_000,
    r"\boxed{{{{{{{{{{1}",
    "}}}}{{{{\\boxed}}}}{",
    "\x00\x01\x02\xff\ufffd\\boxed{\x00\x07}\udcff",
    r"The answer is " + "(" * 10_000,
    "#### " + "1," * 200_000,
    r"\boxed{\frac{\frac{\frac{\frac{\frac{1}{2}}{3}}{4}}{5}}{6}" * 100 + "}",
]


def _timed(fn, *args):
    start = time.monotonic()
    result = fn(*args)
    return result, time.monotonic() - start


@pytest.mark.parametrize("text", HOSTILE, ids=[f"hostile{i}" for i in range(len(HOSTILE))])
def test_hostile_main_thread(text):
    for dataset in ("math", "gsm8k", "aime"):
        result, elapsed = _timed(grade, text, "5", dataset)
        assert result is False and elapsed < 10
    result, elapsed = _timed(answer_key, text)
    assert isinstance(result, str) and elapsed < 10


def test_hostile_from_threads():
    results: list = []

    def work(text):
        start = time.monotonic()
        results.append((grade(text, "5"), grade_answer(text, r"\frac{1}{2}"), time.monotonic() - start))

    threads = [threading.Thread(target=work, args=(t,)) for t in HOSTILE[:6]]
    # slow-path (math-verify) calls from threads too
    threads += [threading.Thread(target=lambda: results.append((grade(r"\boxed{\sqrt{8}}", r"2\sqrt{2}"), None, 0)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == len(threads)
    assert all(isinstance(r[0], bool) and r[2] < 10 for r in results)
    assert (True, None, 0) in results


def test_worker_deadline_kills_and_restarts():
    """math-verify's inner signal timeout (2 s) is longer than this deadline, so the parent must SIGKILL."""
    worker = MathVerifyWorker(timeout_s=0.5)
    try:
        assert worker.verify([("5", "5")]) is True  # warm up (startup is not counted against the deadline)
        start = time.monotonic()
        assert worker.verify([("5", r"9^{9^{9^{9}}}")]) is None
        assert time.monotonic() - start < 3 and worker.restarts == 1
        # the replacement starts at once in the background; a call's deadline counts the wait for it, so wait here
        assert worker.wait_ready(60)
        out: list = []
        t = threading.Thread(target=lambda: out.append(worker.verify([(r"\frac{1}{2}", "0.5")])))
        t.start()
        t.join(timeout=60)
        assert out == [True]  # a fresh worker, called from a thread
    finally:
        worker.close()


# A stand-in worker program (no math-verify): answers 1 at once, except that a request containing SLOW never
# finishes, as a pathological input does. Deterministic, and fast to start, so the timings below are the pool's.
_FAKE_BOOT = (
    "import sys, time\n"
    "sys.stdout.write('ready\\n'); sys.stdout.flush()\n"
    "for line in sys.stdin:\n"
    "    if 'SLOW' in line: time.sleep(600)\n"
    "    sys.stdout.write('1\\n'); sys.stdout.flush()\n"
)


def _verify_from_threads(worker, requests):
    """Run worker.verify on each request from its own thread, all released at once: [(result, seconds)]."""
    barrier = threading.Barrier(len(requests))
    out: list = [None] * len(requests)

    def work(i):
        barrier.wait()
        start = time.monotonic()
        try:
            result = worker.verify(requests[i])
        except RuntimeError as e:  # WorkerBusy: no worker was free in time
            result = type(e).__name__
        out[i] = (result, time.monotonic() - start)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(o is not None for o in out), out
    return out


def test_deadline_holds_per_call_under_threads(monkeypatch):
    """8 threads grading inputs that hit the deadline at once: every call returns within its own deadline (plus a
    small margin), waiting for a worker included. With one worker behind one lock, call k took k deadlines."""
    monkeypatch.setattr(ssb.grading.worker, "BOOT", _FAKE_BOOT)
    timeout = 1.0
    worker = MathVerifyWorker(timeout_s=timeout)
    try:
        assert worker.verify([("5", "5")]) is True  # cold start: not charged to a call's deadline
        out = _verify_from_threads(worker, [[("SLOW", str(i))] for i in range(8)])
        assert all(seconds < timeout + 1.0 for _, seconds in out), out
        assert {result for result, _ in out} <= {None, "WorkerBusy"}, out  # never a False/True verdict
        assert any(result is None for result, _ in out), out  # those that ran hit the deadline and were killed
        assert worker.restarts >= 1
        assert worker.wait_ready(60) and worker.verify([("5", "5")]) is True  # replacements work
    finally:
        worker.close()


def test_pool_serves_fast_calls_beside_slow_ones(monkeypatch):
    """Two hopeless inputs do not hold up six ordinary ones: those are answered by the other workers at once."""
    monkeypatch.setattr(ssb.grading.worker, "BOOT", _FAKE_BOOT)
    timeout = 2.0
    worker = MathVerifyWorker(timeout_s=timeout)  # default pool: 4 workers
    try:
        assert worker.verify([("5", "5")]) is True
        out = _verify_from_threads(worker, [[("SLOW", "a")], [("SLOW", "b")]] + [[("5", "5")]] * 6)
        assert all(seconds < timeout + 1.0 for _, seconds in out), out
        assert [result for result, _ in out[2:]] == [True] * 6, out
    finally:
        worker.close()


def test_worker_busy_is_false_and_not_cached(monkeypatch):
    def busy(pairs):
        raise ssb.grading.worker.WorkerBusy("no math-verify worker free")

    monkeypatch.setattr(ssb.grading.verify, "VERDICTS", {})
    monkeypatch.setattr(ssb.grading.verify.VERIFIER, "verify", busy)
    assert grade(r"\boxed{\sqrt{8}}", r"2\sqrt{2}") is False
    assert ssb.grading.verify.VERDICTS == {}  # load is not a verdict: the next call asks again
    monkeypatch.undo()
    assert grade(r"\boxed{\sqrt{8}}", r"2\sqrt{2}") is True


def _grade_in_child(_):
    return grade(r"\boxed{\sqrt{8}}", r"2\sqrt{2}"), grade(r"\boxed{9^{9^{9^{9}}}}", "5")


def test_grade_in_forked_worker_process():
    assert grade(r"\boxed{\sqrt{8}}", r"2\sqrt{2}") is True  # parent's worker is running before the fork
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:  # pool workers are daemonic: they cannot use multiprocessing children themselves
        assert pool.map(_grade_in_child, [0]) == [(True, False)]
    assert grade(r"\boxed{\sqrt{8}}", r"\sqrt{8}") is True


def test_fast_path_skips_math_verify_and_worker_failure_is_false(monkeypatch):
    calls: list = []

    def fake_verify(pairs):
        calls.append(pairs)
        raise RuntimeError("math-verify worker could not be started")

    monkeypatch.setattr(ssb.grading.verify.VERIFIER, "verify", fake_verify)
    monkeypatch.setattr(ssb.grading.verify, "VERDICTS", {})
    for response, gold, dataset in [(r"\boxed{1,000}", "1000", "gsm8k"), (r"\boxed{\$18.00}", "18", "gsm8k"),
                                    (r"\boxed{\dfrac12}", "0.5", "math"), (r"\boxed{x = 5}", "5", "math"),
                                    (r"\boxed{025}", "25", "aime"), (r"\boxed{90^\circ}", "90", "math500")]:
        assert grade(response, gold, dataset) is True
    assert grade(r"\boxed{18}", "81", "gsm8k") is False
    assert calls == []  # all decided without math-verify
    assert grade(r"\boxed{\sqrt{8}}", r"2\sqrt{2}") is False  # needs math-verify, which is unavailable: False
    assert len(calls) == 1 and ssb.grading.verify.VERDICTS == {}  # ... and the failure is not cached


def test_a_mixed_number_and_its_improper_fraction_are_one_answer_not_a_hedge():
    same = r"So the sum is $\boxed{15\frac{39}{40}}$, or $\boxed{\frac{639}{40}}$."
    assert extract_answer(same) == r"\frac{639}{40}" and grade(same, r"\frac{639}{40}", "math500")
    other = r"So the sum is $\boxed{15\frac{39}{40}}$, or maybe $\boxed{\frac{641}{40}}$."
    assert extract_answer(other) is None
