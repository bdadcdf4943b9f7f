"""Prompts: the fixed system prompt, the student's view of a problem, and the teacher's hinted view.

Pure functions that return chat messages (lists of ``{"role", "content"}`` dicts). Tokenisation is the caller's
business: every stage renders messages through the model's own chat template, so student and teacher see the
same template and differ only in the user turn.

The teacher sees the problem together with one correct and one incorrect earlier attempt, labelled as such, and is
asked for a fresh, self-contained solution. The request not to mention the hints matters: the teacher's reply is
the student's training target, and the student never sees the hints.
"""

from __future__ import annotations

from ssb.choices import TEACHER_CONTEXTS, TEACHER_PROMPTS

SYSTEM_PROMPT = (
    "You are an expert math tutor. Solve the problem step by step, explaining your reasoning clearly and "
    "checking your work. Put your final answer within \\boxed{}."
)

_TEACHER_INTRO = "Solve the following math problem.\n\nProblem:\n{question}\n"
_HINT_CORRECT = "\nHere is an earlier attempt at this problem that reached the CORRECT final answer:\n<correct_attempt>\n{correct}\n</correct_attempt>\n"
_HINT_INCORRECT = "\nHere is an earlier attempt at this problem that reached an INCORRECT final answer:\n<incorrect_attempt>\n{incorrect}\n</incorrect_attempt>\n"
# resolve: ssb's first prompt: study the attempts, then solve from scratch.
_TEACHER_ASK_HINTED = (
    "\nStudy the attempt{s} above and work out where the reasoning goes right{and_wrong}. Then write your own complete, "
    "careful, step-by-step solution to the problem, as if you were solving it for the first time. Your solution must "
    "stand on its own: do not mention, quote or refer to the earlier attempt{s}. End with the final answer within "
    "\\boxed{{}}."
)
# paper: the authors' instructions, in our words: the answer must agree with the correct attempt, and the solution is
# made robust by steering clear of the mistaken reasoning, without ever mentioning the attempts.
_TEACHER_ASK_PAPER = (
    "\nWrite a careful, detailed, step-by-step solution to the problem. Your final answer must be the same as the "
    "final answer of the correct attempt.{caution} Write it as a fresh, self-contained solution: never mention, quote "
    "or allude to any earlier attempt. End with the final answer within \\boxed{{}}."
)
_PAPER_CAUTION = (" Make the solution robust: where the incorrect attempt went wrong, reason carefully so that "
                  "the same mistake cannot happen, and check that step.")
# guided: what the testbed trial pointed at: the incorrect attempt first, the correct one last (nearest the
# instruction), and the verified final answer stated outright.
_TEACHER_ASK_GUIDED = (
    "\nThe verified final answer to this problem is {answer}.{caution} Now write a careful, detailed, step-by-step "
    "solution that arrives at {answer}. Write it as a fresh, self-contained solution: never mention, quote or allude "
    "to any earlier attempt or to being given the answer. End with \\boxed{{{answer}}}."
)
_HINT_REFERENCE = "\nHere is a reference solution to this problem:\n<reference_solution>\n{reference}\n</reference_solution>\n"
_TEACHER_ASK_PLAIN = (
    "\nWrite a complete, careful, step-by-step solution. Check each step. End with the final answer within \\boxed{}."
)


def student_messages(question: str, system_prompt: str = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """What the student (and every rollout and evaluation) sees: the system prompt and the bare question."""
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": question.strip()}]


def teacher_messages(
    question: str,
    correct: str | None,
    incorrect: str | None,
    context: str = "both",
    system_prompt: str = SYSTEM_PROMPT,
    prompt: str = "resolve",
    answer: str | None = None,
) -> list[dict[str, str]]:
    """The teacher's hinted view of a problem.

    ``context`` selects the hints: ``both`` (the paper: one correct and one incorrect attempt), ``correct_only``,
    or ``none`` (the bare problem with a request for a careful solution; an ablation). ``prompt`` selects the
    instructions (:data:`TEACHER_PROMPTS`):

    - ``resolve``: study the attempts, then solve from scratch (correct attempt first, incorrect last);
    - ``paper``: the authors' instructions in our words: the answer must match the correct attempt's, the solution
      guards against the mistaken reasoning, the attempts are never mentioned (same order as ``resolve``);
    - ``guided``: the same intent with the incorrect attempt first, the correct attempt last, and the verified
      final ``answer`` (the correct attempt's, which curation checked) stated in the instruction.

    >>> m = teacher_messages("What is 2+2?", "2+2=4, \\\\boxed{4}", "2+2=5, \\\\boxed{5}")
    >>> "CORRECT" in m[1]["content"] and "INCORRECT" in m[1]["content"]
    True
    >>> u = teacher_messages("What is 2+2?", "so 4", "so 5", prompt="guided", answer="4")[1]["content"]
    >>> u.index("INCORRECT") < u.index("CORRECT final") and "answer to this problem is 4" in u
    True
    """
    if context not in TEACHER_CONTEXTS:
        raise ValueError(f"teacher context must be one of {TEACHER_CONTEXTS}, got {context!r}")
    if prompt not in TEACHER_PROMPTS:
        raise ValueError(f"teacher prompt must be one of {TEACHER_PROMPTS}, got {prompt!r}")
    text = _TEACHER_INTRO.format(question=question.strip())
    if context == "none":
        return [{"role": "system", "content": system_prompt}, {"role": "user", "content": text + _TEACHER_ASK_PLAIN}]
    if correct is None:
        raise ValueError("a hinted teacher prompt needs the correct attempt")
    both = context == "both"
    if both and incorrect is None:
        raise ValueError("teacher context 'both' needs the incorrect attempt")
    hint_correct = _HINT_CORRECT.format(correct=correct.strip())
    hint_incorrect = _HINT_INCORRECT.format(incorrect=incorrect.strip()) if both else ""
    if prompt == "resolve":
        text += hint_correct + hint_incorrect + _TEACHER_ASK_HINTED.format(
            s="s" if both else "", and_wrong=" and where it goes wrong" if both else "")
    elif prompt == "paper":
        text += hint_correct + hint_incorrect + _TEACHER_ASK_PAPER.format(caution=_PAPER_CAUTION if both else "")
    else:
        if answer is None:
            raise ValueError("teacher prompt 'guided' needs the verified final answer")
        text += hint_incorrect + hint_correct + _TEACHER_ASK_GUIDED.format(
            answer=answer.strip(), caution=_PAPER_CAUTION if both else "")
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": text}]


def pair_messages(question: str, pair: dict, context: str = "both", prompt: str = "resolve") -> list[dict[str, str]]:
    """The teacher's messages for one curated pair (a ``curate/pairs.jsonl`` row, or any row carrying its
    ``correct`` / ``incorrect`` attempts), the one way teach, on-policy distillation and ``ssb prompts`` build them:
    the verified answer is the pair's ``correct_answer``, else the one extracted from its correct attempt.

    >>> pair = {"correct": "2+2=4, \\\\boxed{4}", "incorrect": "2+2=5, \\\\boxed{5}"}
    >>> "answer to this problem is 4" in pair_messages("What is 2+2?", pair, prompt="guided")[1]["content"]
    True
    """
    from ssb.grading import extract_answer  # only here: the prompts themselves import nothing heavy

    answer = pair.get("correct_answer") or extract_answer(pair["correct"])
    return teacher_messages(question, pair["correct"], pair.get("incorrect"), context, prompt=prompt, answer=answer)


def reference_messages(question: str, reference: str, answer: str,
                       system_prompt: str = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """The teacher's view with the data set's reference solution as the hint (OPSD-style on-policy distillation,
    ``distill.hint=reference``): the reference, then the ``guided`` instructions with the gold ``answer``.

    >>> u = reference_messages("What is 2+2?", "2 and 2 make 4.", "4")[1]["content"]
    >>> "reference solution" in u and "2 and 2 make 4." in u and "\\\\boxed{4}" in u
    True
    """
    text = (_TEACHER_INTRO.format(question=question.strip()) + _HINT_REFERENCE.format(reference=reference.strip())
            + _TEACHER_ASK_GUIDED.format(answer=answer.strip(), caution=""))
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": text}]
