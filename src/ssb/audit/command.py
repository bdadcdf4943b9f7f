"""``ssb prompts``: render what each stage renders for the first problems, print it, run the checks
(:mod:`ssb.audit.checks`) and return the exit status (:mod:`ssb.audit`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from ssb.audit.checks import (ERROR, WARNING, Finding, check_bos, check_context, check_generation_prompt,
                              check_reply_targets, check_same_prompt, check_same_template, check_teacher_worst_case,
                              check_template, exit_status, skeleton)

from ssb.audit.tokens import model_limits, token_info
from ssb.stages import STAGES, rendering

if TYPE_CHECKING:
    from ssb.config import Config

PLACEHOLDER_CORRECT = "[PLACEHOLDER: a sampled attempt that reached the gold answer] ... \\boxed{{{answer}}}"
PLACEHOLDER_INCORRECT = "[PLACEHOLDER: a sampled attempt that reached the most common wrong answer] ... \\boxed{{?}}"
PLACEHOLDER_REPLY = "[PLACEHOLDER: the teacher's verified solution] ... \\boxed{{{answer}}}"
def _rows(path: Path) -> list[dict]:
    from ssb.rows import read_rows

    return read_rows(path) if path.is_file() else []  # never repairs: the audit writes nothing


def _training_items(cfg: "Config", run: Path | None, n: int) -> tuple[list[dict], str]:
    """(the first ``n`` problems to render, where they come from): the run's teacher
    examples (real attempts and replies), else its curated pairs (real attempts), else the training problems with
    labelled placeholder attempts."""
    from ssb.data import load_problems

    examples = _rows(run / "teach" / "examples.jsonl") if run else []
    pairs = {p["id"]: p for p in _rows(run / "curate" / "pairs.jsonl")} if run else {}
    if examples:
        return [dict(e, **_attempts(pairs.get(e["id"]))) for e in examples[:n]], f"{run}/teach/examples.jsonl"
    if pairs:
        return [dict(p) for p in list(pairs.values())[:n]], f"{run}/curate/pairs.jsonl"
    items = [{"id": p.id, "question": p.question, "answer": p.answer, "placeholder": True,
              "correct": PLACEHOLDER_CORRECT.format(answer=p.answer), "incorrect": PLACEHOLDER_INCORRECT.format(),
              "correct_answer": p.answer} for p in load_problems(cfg.rollout.data, cfg.data_dir)[:n]]
    missing = run / "curate" / "pairs.jsonl" if run else "--run-dir with curate/pairs.jsonl"
    return items, f"PLACEHOLDERS (no {missing})"


def _attempts(pair: dict | None) -> dict:
    return {} if pair is None else {k: pair[k] for k in ("correct", "incorrect", "correct_answer") if k in pair}


def audit_prompts(cfg: "Config", run_dir: str | Path | None = None, n: int = 2, full: bool = False, out=None) -> int:
    """Render and check the prompts of ``cfg`` for the first ``n`` problems (real attempts and replies from
    ``run_dir`` when it has them), print them and the findings to ``out`` (stdout); returns the exit status."""
    import sys

    from ssb.errors import SsbError

    if n < 1:
        raise SsbError(f"--n: must be >= 1; got {n}")
    audit = _Audit(cfg, full, out or sys.stdout)
    items, source = _training_items(cfg, Path(run_dir) if run_dir else None, n)
    if not items:
        raise SsbError("no problems to render (rollout.data is empty)")
    problems = [audit.render(it) for it in items]  # first: what distill would refuse fails before any output
    audit.header(source)
    for k, (it, p) in enumerate(zip(items, problems)):
        audit.training_problem(k, len(items), it, p)
    audit.evaluation(items[0]["question"])
    return audit.summary()


@dataclass
class _Problem:
    """One training problem as the stages render it (token ids)."""

    where: str  # "problem <id>", the start of its findings' where
    student: list[int]  # the student's prompt, as distill renders it
    teacher: list[int]  # the teacher's prompt distill reads
    sampled: list[int]  # what rollout (and evaluate) prompt with
    targets: list[int]  # the reply tokens distill trains on
    student_seq: list[int]  # student prompt + reply targets, as distill feeds them
    teacher_seq: list[int]  # teacher prompt + reply targets
    stored: list[int] | None  # the teacher prompt recorded in teach/examples.jsonl
    rendered: list[int] | None  # the teacher prompt as teach renders it from the attempts
    teacher_from: str  # how the teacher prompt is rendered and from what (its title)
    targets_from: str  # what distill trains on and where the reply shown comes from (its title)
    teacher_is_stored: bool  # whether distill's teacher prompt is the stored one (or would be: teach renders it)


class _Audit:
    """One ``ssb prompts``: the tokenizer and what is known of the model (config files only, no weights), where to
    print, and the findings so far. :func:`audit_prompts` renders every training problem, then calls the header,
    each training problem, the evaluation prompts and the summary in that order."""

    def __init__(self, cfg: "Config", full: bool, out):
        from ssb.models import load_tokenizer, metadata_source, stop_token_ids

        self.cfg, self.full, self.out = cfg, full, out
        path, kw = metadata_source(cfg.model)  # a GGUF model's metadata, or its converted directory: no weights
        self.tok = load_tokenizer(cfg.model, (path, kw))
        self.context, holder = model_limits(path, kw)
        self.stops = stop_token_ids(self.tok, holder)
        self.info = info = token_info(self.tok, self.stops)
        self.positions = "the context (max_position_embeddings)"
        self.gen_context, self.gen_what = self.context, self.positions  # what generation may fill: vLLM's own limit
        if cfg.engine.backend == "vllm" and cfg.engine.max_model_len:
            self.gen_context, self.gen_what = cfg.engine.max_model_len, "engine.max_model_len"
        self.paper = cfg.distill.paper_student_format
        self.authors = "distill.paper_student_format=true: the authors' choice" if self.paper else None
        # a finished reply, as the engine records it, ends with the stop token that ended it
        stops = self.stops
        self.stop = info.end_of_turn_id if info.end_of_turn_id in stops else (stops[0] if stops else None)
        self.findings = check_template(info)

    @property
    def _on_policy_hint(self) -> str | None:
        """``distill.hint`` where it picks the teacher's prompt (``distill.targets=on_policy``), else None."""
        return self.cfg.distill.hint if self.cfg.distill.targets == "on_policy" else None

    @property
    def _hint_setting(self) -> str:
        return f", distill.hint={self._on_policy_hint}" if self._on_policy_hint else ""

    def line(self, text: str) -> None:
        print(text, file=self.out)

    def show(self, title: str, ids: list[int]) -> None:
        self.line(f"--- {title} · {len(ids)} tokens")
        text = self.tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        self.line(_visible(text, self.full))
        self.line(f"ids: {_ids(ids, self.full)}")

    def ntok(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"])

    def header(self, source: str) -> None:
        """The model, its special tokens, stop ids and template, its context and the settings that shape prompts."""
        cfg, info, tc, dc = self.cfg, self.info, self.cfg.teach, self.cfg.distill
        gguf = f" / {cfg.model.gguf_file}" if cfg.model.gguf_file else ""
        self.line(f"ssb prompts: {cfg.model.name_or_path}{gguf} (tokenizer and config only, no weights)")
        self.line(f"  special tokens: {skeleton(sorted(info.special_ids), info, 6)}; BOS: {info.name(info.bos_id)}"
                  f"{' (the tokenizer adds it to text)' if info.adds_bos else ''}")
        header = self.tok.decode(list(info.generation_prompt), skip_special_tokens=False)
        self.line(f"  stop ids: {', '.join(info.name(i) for i in sorted(info.stop_ids)) or 'none'}; end of an "
                  f"assistant turn: {info.name(info.end_of_turn_id)}; assistant header (generation prompt): "
                  f"{header!r} = {list(info.generation_prompt)}")
        vllm = f", engine.max_model_len {self.gen_context}" if self.gen_context != self.context else ""
        self.line(f"  context: {self.context or 'unknown'} positions{vllm}; teach.prompt={tc.prompt}, "
                  f"teach.context={tc.context}, distill.paper_student_format={str(self.paper).lower()}, "
                  f"distill.targets={dc.targets}{self._hint_setting}")
        self.line(f"  attempts and replies: {source}")
        self.line("  what each stage renders: " + "; ".join(f"{name}: {', '.join(spec.renders)}"
                                                          for name, spec in STAGES.items() if spec.renders))

    def training_problem(self, k: int, total: int, it: dict, p: _Problem) -> None:
        """Show and check the ``k``-th training problem ``it`` (a row of :func:`_training_items`), rendered ``p``."""
        self.line(f"\n=== training problem {k + 1} of {total}: {it['id']} ===")
        student, (first, *rest) = rendering("student"), rendering("sampled")
        if self.paper:
            self.show(f"student prompt ({_listed(student)}; distill.paper_student_format: plain text, no chat "
                      f"template)", p.student)
            self.show(f"{first} prompt (the base model is sampled on this; {_listed(rest)} "
                      f"render{'s' * (len(rest) == 1)} the same way)", p.sampled)
        else:
            self.show(f"student prompt ({_listed(student)}; {_listed((first, *rest))} render the same ids)",
                      p.student)
        self.show(f"teacher prompt ({p.teacher_from})", p.teacher)
        self.show(f"reply targets ({p.targets_from})", p.targets)
        self._check_problem(p)
        tc = self.cfg.teach
        if k == 0 and p.rendered is not None and tc.context != "none":
            hints = ("correct", "incorrect")[: 2 if tc.context == "both" else 1]
            self.findings += check_teacher_worst_case(
                len(p.rendered), sum(self.ntok(it[h].strip()) for h in hints), len(hints),
                self.cfg.rollout.max_new_tokens, tc.max_new_tokens, self.gen_context, self.gen_what)

    def _reply(self, it: dict) -> tuple[list[int], str]:
        """(the reply shown as distill's targets, its label): the teacher's, else a labelled placeholder."""
        if "reply_ids" in it:
            reply, reply_from = list(it["reply_ids"]), "teach/examples.jsonl"
        else:
            reply = self.tok(PLACEHOLDER_REPLY.format(answer=it["answer"]), add_special_tokens=False)["input_ids"]
            reply += [self.stop] if self.stop is not None else []
            reply_from = "PLACEHOLDER, ending with the stop token as the engine records a finished reply"
        dc = self.cfg.distill
        if dc.targets == "rollouts":
            reply_from += "; distill.targets=rollouts trains on the student's own rollouts, which end the same way"
        if dc.targets == "on_policy":
            shown = "the teacher's reply from teach/examples.jsonl" if "reply_ids" in it else "a " + reply_from
            mix = f"; a fraction distill.mix={dc.mix} of them are the teacher's replies" if dc.mix else ""
            return reply, (f"distill.targets=on_policy trains on the student's own sampled replies, which end with "
                           f"the stop token when finished{mix}; shown: {shown}")
        return reply, "distill trains on these; " + reply_from

    def render(self, it: dict) -> _Problem:
        """What the stages render for ``it``: the student's prompt and the reply targets as distill builds them
        (:func:`ssb.stages.distill.build_examples`), the teacher's prompt as teach renders it (:mod:`ssb.stages.teach`), as
        stored or now."""
        from ssb.stages.distill import build_examples
        from ssb.models import render_chat
        from ssb.prompts import pair_messages, student_messages

        tc = self.cfg.teach
        reply, targets_from = self._reply(it)
        rendered = None  # the teacher prompt as teach renders it from the attempts (ssb.stages.teach.Teacher.prompt)
        if "correct" in it:
            rendered = render_chat(self.tok, pair_messages(it["question"], it, tc.context, tc.prompt))
        stored = it.get("teacher_prompt_ids")
        teacher = stored if stored is not None else rendered
        origin = ("as stored in teach/examples.jsonl" if stored is not None else
                  "attempts: " + ("PLACEHOLDERS" if it.get("placeholder") else "curate/pairs.jsonl"))
        teacher_from = f"teach.prompt={tc.prompt}, context={tc.context}; {origin}"
        hint = self._on_policy_hint
        if hint in ("correct", "reference"):
            teacher, teacher_from = self._hinted_prompt(it, hint)
        (ex,) = build_examples([{"question": it["question"], "reply_ids": reply, "teacher_prompt_ids": teacher}],
                               self.tok, self.stops, self.paper)
        n_t = len(ex.targets)
        return _Problem(f"problem {it['id']}", ex.student_ids[:-n_t], ex.teacher_ids[:-n_t],
                        render_chat(self.tok, student_messages(it["question"])), ex.targets, ex.student_ids,
                        ex.teacher_ids, stored, rendered, teacher_from, targets_from,
                        hint not in ("correct", "reference"))

    def _hinted_prompt(self, it: dict, hint: str) -> tuple[list[int], str]:
        """On-policy, ``distill.hint`` correct or reference: (the teacher's prompt as distill renders it with
        :func:`ssb.stages.on_policy.teacher_prompt`, its title). Raises :class:`ssb.errors.SsbError` where distill would:
        no correct attempt, no reference solution."""
        from ssb.stages.on_policy import teacher_prompt

        row = {"id": it["id"], "question": it["question"], "answer": it["answer"]}
        if hint == "correct":
            pair = it if "correct" in it else None  # the run's pair (or placeholder attempts) merged into the item
            attempts = "PLACEHOLDERS" if it.get("placeholder") else "curate/pairs.jsonl"
            return (teacher_prompt(row, hint, self.tok, self.cfg.teach.prompt, pair=pair),
                    f"distill.hint=correct: the correct attempt only, teach.prompt={self.cfg.teach.prompt}; "
                    f"attempts: {attempts}")
        solution = self.solutions.get(it["id"])
        return (teacher_prompt(row, hint, self.tok, self.cfg.teach.prompt, solution=solution),
                f"distill.hint=reference: the training set's reference solution, rollout.data "
                f"{self.cfg.rollout.data.name}")

    @cached_property
    def solutions(self) -> dict[str, str | None]:
        """The training set's reference solutions by problem id, as distill reads them."""
        from ssb.data import load_problems

        return {p.id: p.solution for p in load_problems(self.cfg.rollout.data, self.cfg.data_dir)}

    def _check_problem(self, p: _Problem) -> None:
        """The checks of one training problem's prompts and reply targets."""
        rc, tc, dc, info, where = self.cfg.rollout, self.cfg.teach, self.cfg.distill, self.info, p.where
        paper, f = self.paper, self.findings
        f += check_bos(p.student, info, f"{where}: student prompt", WARNING if paper else ERROR)
        f += check_bos(p.sampled, info, f"{where}: rollout prompt") if paper else []
        f += check_bos(p.teacher, info, f"{where}: teacher prompt")
        for name, ids, budget, what in (("rollout prompt", p.sampled, rc.max_new_tokens, "rollout.max_new_tokens"),
                                        ("teacher prompt", p.teacher, tc.max_new_tokens, "teach.max_new_tokens")):
            f += check_context(len(ids), budget, self.gen_context, f"{where}: {name}", what, self.gen_what)
            f += check_generation_prompt(ids, info, f"{where}: {name}")
        f += [] if paper else check_generation_prompt(p.student, info, f"{where}: student prompt")
        n_t = len(p.targets)
        for name, ids in (("student", p.student_seq), ("teacher", p.teacher_seq)):
            f += check_context(len(ids) - n_t, n_t, self.context, f"{where}: distill {name} sequence", "the reply",
                               self.positions)
        f += check_reply_targets(p.targets, info, f"{where}: reply targets", paper)
        if dc.targets in ("teacher", "on_policy"):  # the student and the teacher meet over the same reply tokens
            f += check_same_template(p.student, p.teacher, info, f"{where}: student vs teacher prompt",
                                     ("student", "teacher"), self.authors)
        f += check_same_prompt(p.student, p.sampled, f"{where}: student training vs rollout/evaluate prompt",
                               ("student's training", "rollout/evaluate"), self.authors)
        if p.teacher_is_stored and p.stored is not None and p.rendered is not None:
            f += check_same_prompt(
                p.teacher, p.rendered, f"{where}: teacher prompt", ("stored (teach/examples.jsonl)", "re-rendered"),
                why=": the teacher replied to another prompt than this config and tokenizer render (a changed "
                    "template or teach setting, or a template that renders today's date)")

    def evaluation(self, question: str) -> None:
        """Show and check the first problem of each benchmark as evaluate renders it; ``question``: the first
        training problem's, whose rollout prompt the evaluation prompts should share a template with."""
        from ssb.data import load_problems
        from ssb.stages.evaluate import label
        from ssb.models import render_chat
        from ssb.prompts import student_messages

        self.line("\n=== evaluation prompts (the first problem of each benchmark) ===")
        first = render_chat(self.tok, student_messages(question))
        for ds in self.cfg.evaluate.benchmarks:
            where = f"evaluate {label(ds)}"
            try:
                problems = load_problems(ds, self.cfg.data_dir)
            except Exception as e:  # the evaluate stage would fail the same way, after the training
                self.findings.append(Finding("benchmark-unavailable", ERROR,
                                             f"cannot load it: {str(e).splitlines()[0]}", where))
                continue
            if not problems:
                self.findings.append(Finding("benchmark-unavailable", ERROR, "it has no problems", where))
                continue
            ids = render_chat(self.tok, student_messages(problems[0].question))
            where += f" ({problems[0].id})"
            self.show(where, ids)
            self.findings += check_bos(ids, self.info, where)
            self.findings += check_generation_prompt(ids, self.info, where)
            self.findings += check_context(len(ids), self.cfg.evaluate.max_new_tokens, self.gen_context, where,
                                           "evaluate.max_new_tokens", self.gen_what)
            self.findings += check_same_template(first, ids, self.info, where, ("rollout", "evaluation"))

    def summary(self) -> int:
        """Print the findings, grouped, and their count; returns the exit status."""
        self.line("\n=== findings ===")
        for line in _summarise(self.findings):
            self.line(line)
        errors, warnings = (sum(f.severity == s for f in self.findings) for s in (ERROR, WARNING))
        self.line(f"ssb prompts: {errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}")
        return exit_status(self.findings)


def _listed(names) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    names = list(names)
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else "".join(names)


def _summarise(findings: list[Finding]) -> list[str]:
    """One line per (severity, name, kind of prompt): the first message, and on how many problems it recurs."""
    groups: dict[tuple, list[Finding]] = {}
    for f in findings:
        kind = f.where.split(": ", 1)[-1]
        groups.setdefault((f.severity != ERROR, f.name, kind), []).append(f)
    if not groups:
        return ["none"]
    lines = []
    for (_, name, _), fs in sorted(groups.items(), key=lambda kv: kv[0][0]):
        more = f" (and {len(fs) - 1} more)" if len(fs) > 1 else ""
        lines.append(f"{fs[0].severity.upper():7} {name} [{fs[0].where}{more}] {fs[0].message}")
    return lines


def _visible(text: str, full: bool, most: int = 4000) -> str:
    """Text with each newline shown as ⏎ and every line indented; the middle of a long text cut unless ``full``."""
    if not full and len(text) > most:
        cut = len(text) - most
        text = text[: most // 2] + f"[… {cut} characters not shown; --full shows them …]" + text[-most // 2:]
    lines = text.replace("\n", "⏎\n").split("\n")
    if len(lines) > 1 and not lines[-1]:
        lines.pop()  # the ⏎ before it shows the newline
    return "\n".join("  │ " + line for line in lines)


def _ids(ids: list[int], full: bool, most: int = 64) -> str:
    if full or len(ids) <= most + 16:
        return json.dumps(ids)
    half = most // 2
    return f"{json.dumps(ids[:half])[:-1]}, … {len(ids) - most} more …, {json.dumps(ids[-half:])[1:]}"
