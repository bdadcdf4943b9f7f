"""The prompt audit's checks (pure: token id lists and a :class:`TokenInfo` in, :class:`Finding`\\ s out); what
each finding means: :mod:`ssb.audit`."""

from __future__ import annotations

from dataclasses import dataclass, field

ERROR, WARNING = "error", "warning"


@dataclass(frozen=True)
class Finding:
    name: str  # one of the names in ssb.audit's docstring
    severity: str  # "error" | "warning"
    message: str
    where: str = ""  # which prompt of which problem


@dataclass(frozen=True)
class TokenInfo:
    """What the checks need to know about a tokenizer, its chat template and the model (see
    :func:`ssb.audit.tokens.token_info`)."""

    special_ids: frozenset[int] = frozenset()  # special tokens: the template's markers, BOS, EOS, ...
    bos_id: int | None = None
    adds_bos: bool = False  # the tokenizer puts BOS in front of plain text: the model expects one
    stop_ids: frozenset[int] = frozenset()  # ids that end generation (ssb.models.stop_token_ids)
    end_of_turn_id: int | None = None  # the token the template closes an assistant turn with (None: none found)
    generation_prompt: tuple[int, ...] = ()  # what add_generation_prompt appends: the assistant header
    names: dict[int, str] = field(default_factory=dict)  # id -> token, for messages

    def name(self, i: int | None) -> str:
        return f"{self.names.get(i, '?')}={i}" if i is not None else "none"


# ----------------------------------------------------------------------------------------------- checks (pure)


def check_bos(prompt: list[int], info: TokenInfo, where: str, missing: str = ERROR) -> list[Finding]:
    """A doubled BOS at the start; or none where the tokenizer adds one (severity ``missing``).

    >>> info = TokenInfo(bos_id=1, adds_bos=True, names={1: "<s>"})
    >>> [f.name for f in check_bos([1, 1, 5], info, "p")], [f.name for f in check_bos([5, 6], info, "p")]
    (['double-bos'], ['missing-bos'])
    >>> check_bos([1, 5, 1], info, "p")  # a BOS id further on (e.g. a template opening every turn with it) is fine
    []
    """
    if info.bos_id is None or not prompt:
        return []
    lead = next((i for i, t in enumerate(prompt) if t != info.bos_id), len(prompt))
    if lead >= 2:
        return [Finding("double-bos", ERROR, f"starts with {lead} BOS tokens ({info.name(info.bos_id)}): the chat "
                        f"template writes more than one; the model was trained on one", where)]
    if lead == 0 and info.adds_bos:
        return [Finding("missing-bos", missing, f"does not start with BOS ({info.name(info.bos_id)}), which this "
                        f"tokenizer puts in front of text: the model expects it", where)]
    return []


def check_context(prompt_len: int, new_tokens: int, context: int | None, where: str, new_what: str,
                  context_what: str = "the context") -> list[Finding]:
    """A prompt that fills the context (error), or one that leaves less room than ``new_tokens`` (warning).
    ``new_what`` names the reply budget (``teach.max_new_tokens=8192``, ``the reply``)."""
    if not context:
        return []
    if prompt_len >= context:
        return [Finding("prompt-past-context", ERROR, f"{prompt_len} tokens, {context_what} is {context}: the prompt "
                        f"would be cut or refused, with no room for a reply", where)]
    if prompt_len + new_tokens > context:
        return [Finding("reply-past-context", WARNING, f"{prompt_len} prompt tokens + {new_what} ({new_tokens}) = "
                        f"{prompt_len + new_tokens} > {context_what} ({context}): replies longer than "
                        f"{context - prompt_len} tokens run past it", where)]
    return []


def check_teacher_worst_case(prompt_len: int, attempts_len: int, n_attempts: int, attempt_budget: int,
                             reply_budget: int, context: int | None,
                             context_what: str = "the context") -> list[Finding]:
    """:func:`check_context` for the longest teacher prompt the config allows: ``prompt_len`` tokens of which
    ``attempts_len`` are its ``n_attempts`` attempts, each of which may be as long as ``attempt_budget``
    (``rollout.max_new_tokens``). A warning, whatever the overflow: most attempts are far shorter.

    >>> [f.name for f in check_teacher_worst_case(300, 100, 2, 8192, 8192, 32768)]
    []
    >>> [(f.name, f.severity) for f in check_teacher_worst_case(300, 100, 2, 8192, 8192, 20000)]
    [('reply-past-context', 'warning')]
    >>> [(f.name, f.severity) for f in check_teacher_worst_case(300, 100, 2, 8192, 8192, 4096)]
    [('prompt-past-context', 'warning')]
    """
    worst = prompt_len - attempts_len + n_attempts * attempt_budget
    why = f"at worst (its {n_attempts} attempt(s) as long as rollout.max_new_tokens={attempt_budget}): "
    return [Finding(f.name, WARNING, why + f.message, "teacher prompt")
            for f in check_context(worst, reply_budget, context, "teacher prompt", "teach.max_new_tokens",
                                   context_what)]


def check_generation_prompt(prompt: list[int], info: TokenInfo, where: str) -> list[Finding]:
    """The prompt must end with the assistant header, as ``add_generation_prompt`` renders it.

    >>> info = TokenInfo(generation_prompt=(7, 8))
    >>> check_generation_prompt([1, 5, 7, 8], info, "p")
    []
    >>> [f.name for f in check_generation_prompt([1, 5, 7], info, "p")]
    ['prompt-cut']
    """
    gp = list(info.generation_prompt)
    if not gp or prompt[-len(gp):] == gp:
        return []
    return [Finding("prompt-cut", ERROR, f"does not end with the assistant header {gp}: cut mid-template or rendered "
                    f"without the generation prompt, so the model would continue the user's turn", where)]


def check_template(info: TokenInfo) -> list[Finding]:
    """The chat template itself: it opens an assistant turn for ``add_generation_prompt``, and the token it closes
    one with is a stop token of generation.

    >>> [f.name for f in check_template(TokenInfo(stop_ids=frozenset({2}), end_of_turn_id=3, generation_prompt=(1,)))]
    ['end-of-turn-not-stop']
    """
    out = []
    if not info.generation_prompt:
        out.append(Finding("no-generation-prompt", ERROR, "the chat template adds nothing for add_generation_prompt: "
                           "every prompt ends after the user's turn instead of opening the assistant's",
                           "chat template"))
    if info.end_of_turn_id is not None and info.end_of_turn_id not in info.stop_ids:
        stops = ", ".join(info.name(i) for i in sorted(info.stop_ids)) or "none"
        out.append(Finding("end-of-turn-not-stop", ERROR, f"the template ends an assistant turn with "
                           f"{info.name(info.end_of_turn_id)}, which is not a stop token ({stops}): generation would "
                           f"not stop at the end of a reply", "chat template"))
    return out


def check_reply_targets(targets: list[int], info: TokenInfo, where: str, paper_format: bool = False) -> list[Finding]:
    """The reply tokens distill trains on must end with end-of-turn (a stop token), or the student never learns to
    stop; ``paper_format`` (the authors drop it on purpose) makes this a warning.

    >>> info = TokenInfo(stop_ids=frozenset({2}), names={2: "<|im_end|>"})
    >>> check_reply_targets([5, 6, 2], info, "r"), [f.severity for f in check_reply_targets([5, 6], info, "r", True)]
    ([], ['warning'])
    """
    if targets and targets[-1] in info.stop_ids:
        return []
    end = info.name(info.end_of_turn_id if info.end_of_turn_id is not None else min(info.stop_ids, default=None))
    if paper_format:
        return [Finding("missing-end-of-turn", WARNING, f"do not end with end-of-turn ({end}): "
                        f"distill.paper_student_format=true drops it (the authors' choice), so the student is "
                        f"never trained to stop", where)]
    return [Finding("missing-end-of-turn", ERROR, f"do not end with end-of-turn ({end}): the "
                    f"student is never trained to stop", where)]


def segments(ids: list[int], special_ids: frozenset[int]) -> tuple[list[int], list[list[int]]]:
    """(the special tokens in order, the runs of ordinary tokens around them: one more than specials).

    >>> segments([1, 5, 6, 2, 7, 1, 8], frozenset({1, 2}))
    ([1, 2, 1], [[], [5, 6], [7], [8]])
    """
    skeleton, runs = [], [[]]
    for t in ids:
        if t in special_ids:
            skeleton.append(t)
            runs.append([])
        else:
            runs[-1].append(t)
    return skeleton, runs


def check_same_template(a: list[int], b: list[int], info: TokenInfo, where: str, names: tuple[str, str],
                        expected: str | None = None) -> list[Finding]:
    """Prompts ``a`` and ``b`` (e.g. student and teacher) must be the same chat around different user turns: the
    same special tokens in the same order, and the same ordinary tokens between them except in one run (the user's
    message). ``expected`` (a reason, e.g. the paper's student format) turns the error into a warning.

    >>> info = TokenInfo(special_ids=frozenset({1, 2}))
    >>> student, teacher = [1, 10, 2, 1, 20, 2, 1, 30], [1, 10, 2, 1, 21, 22, 2, 1, 30]
    >>> check_same_template(student, teacher, info, "p", ("student", "teacher"))
    []
    >>> [f.name for f in check_same_template([1, 11, 2, 1, 20, 2, 1, 30], teacher, info, "p", ("student", "teacher"))]
    ['template-mismatch']
    """
    sa, ra = segments(a, info.special_ids)
    sb, rb = segments(b, info.special_ids)
    severity, why = (WARNING, f" ({expected})") if expected else (ERROR, "")
    if sa != sb:
        text = (f"the {names[0]} prompt has {len(sa)} special tokens ({skeleton(sa, info)}), the {names[1]} prompt "
                f"{len(sb)} ({skeleton(sb, info)}): they are not under the same chat template{why}")
        return [Finding("template-mismatch", severity, text, where)]
    differ = [k for k, (x, y) in enumerate(zip(ra, rb)) if x != y]
    if len(differ) <= 1:
        return []
    k = differ[0]
    after = f"after {info.name(sa[k - 1])} (special token {k})" if k else "before the first special token"
    return [Finding("template-mismatch", severity, f"the {names[0]} and {names[1]} prompts differ outside the user's "
                    f"turn, in {len(differ)} places, first {after}: another system prompt or chat wrapper{why}",
                    where)]


def check_same_prompt(a: list[int], b: list[int], where: str, names: tuple[str, str], expected: str | None = None,
                      why: str = "") -> list[Finding]:
    """Two prompts that should be the same ids.

    >>> [f.message for f in check_same_prompt([1, 2, 3], [1, 2, 4], "p", ("training", "evaluation"))]
    ['the training and evaluation prompts differ (first at token 2; 3 and 3 tokens)']
    """
    if a == b:
        return []
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    text = f"the {names[0]} and {names[1]} prompts differ (first at token {first}; {len(a)} and {len(b)} tokens)"
    if expected:
        return [Finding("prompt-mismatch", WARNING, f"{text} ({expected})", where)]
    return [Finding("prompt-mismatch", ERROR, text + why, where)]


def exit_status(findings: list[Finding]) -> int:
    """1 if any finding is an error, else 0."""
    return int(any(f.severity == ERROR for f in findings))


def skeleton(ids: list[int], info: TokenInfo, most: int = 4) -> str:
    if not ids:
        return "none"
    shown = " ".join(info.names.get(i, str(i)) for i in ids[:most])
    return shown + (" …" if len(ids) > most else "")
