"""Prompts: the fixed system prompt, the student's view of a problem, and the teacher's hinted view.

Pure functions that return chat messages (lists of ``{"role", "content"}`` dicts). Tokenisation is the caller's
business: every stage renders messages through the model's own chat template, so student and teacher see the
same template and differ only in the user turn.

The teacher sees the problem together with one correct and one incorrect earlier attempt, labelled as such, and is
asked for a fresh, self-contained solution. The request not to mention the hints matters: the teacher's reply is
the student's training target, and the student never sees the hints.
"""

from __future__ import annotations

SYSTEM_PROMPT = (
    "You are an expert math tutor. Solve the problem step by step, explaining your reasoning clearly and "
    "checking your work. Put your final answer within \\boxed{}."
)

TEACHER_CONTEXTS = ("both", "correct_only", "none")

_TEACHER_INTRO = "Solve the following math problem.\n\nProblem:\n{question}\n"
_HINT_CORRECT = "\nHere is an earlier attempt at this problem that reached the CORRECT final answer:\n<correct_attempt>\n{correct}\n</correct_attempt>\n"
_HINT_INCORRECT = "\nHere is an earlier attempt at this problem that reached an INCORRECT final answer:\n<incorrect_attempt>\n{incorrect}\n</incorrect_attempt>\n"
_TEACHER_ASK_HINTED = (
    "\nStudy the attempt{s} above and work out where the reasoning goes right{and_wrong}. Then write your own complete, "
    "careful, step-by-step solution to the problem, as if you were solving it for the first time. Your solution must "
    "stand on its own: do not mention, quote or refer to the earlier attempt{s}. End with the final answer within "
    "\\boxed{{}}."
)
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
) -> list[dict[str, str]]:
    """The teacher's hinted view of a problem.

    ``context`` selects the hints: ``both`` (the paper: one correct and one incorrect attempt), ``correct_only``,
    or ``none`` (the bare problem with a request for a careful solution; an ablation).

    >>> m = teacher_messages("What is 2+2?", "2+2=4, \\\\boxed{4}", "2+2=5, \\\\boxed{5}")
    >>> "CORRECT" in m[1]["content"] and "INCORRECT" in m[1]["content"]
    True
    """
    if context not in TEACHER_CONTEXTS:
        raise ValueError(f"teacher context must be one of {TEACHER_CONTEXTS}, got {context!r}")
    text = _TEACHER_INTRO.format(question=question.strip())
    if context == "none":
        text += _TEACHER_ASK_PLAIN
    else:
        if correct is None:
            raise ValueError("a hinted teacher prompt needs the correct attempt")
        text += _HINT_CORRECT.format(correct=correct.strip())
        both = context == "both"
        if both:
            if incorrect is None:
                raise ValueError("teacher context 'both' needs the incorrect attempt")
            text += _HINT_INCORRECT.format(incorrect=incorrect.strip())
        text += _TEACHER_ASK_HINTED.format(
            s="s" if both else "", and_wrong=" and where it goes wrong" if both else ""
        )
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": text}]
