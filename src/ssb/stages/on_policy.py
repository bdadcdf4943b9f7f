"""On-policy targets for distill (``distill.targets=on_policy``): the student samples, the hinted teacher scores.

SSB trains the student on the *teacher's* sampled reply (off-policy). Here, at every optimizer step, the current
student - the base model plus the adapter being trained, in this process, sampled through ssb's engine
(:class:`ssb.engine.transformers_engine.TransformersEngine`, eval mode, no dropout, eager steps) - samples ``distill.samples`` replies
per question of the step's batch from the bare student prompt. The teacher, the same model with the adapter disabled,
reads the hinted prompt followed by the *student's* reply, and the loss is the distill stage's chunked divergence
(``distill.loss``: forward KL, reverse KL or JSD(β), full vocabulary through the lm_head) over the student's tokens,
aligned exactly as for SSB (:func:`ssb.stages.distill.align`). The sampler is the model being trained, as it is at
that step: by default a copy of it with the adapter merged, its weights rewritten from the adapter before every
step's sampling (``distill.sample_merged``, :class:`ssb.engine.merged.MergedCopy`), else the peft model itself.

The questions are those of ``teach/examples.jsonl`` (the problems SSB trains on, in the same order and epochs), so
the two modes differ only in whose reply is trained on. ``distill.hint`` picks the teacher's context:

- ``pair`` (default): the hinted prompt the teach stage used for the problem (SSB's correct attempt and most common
  incorrect attempt, under ``teach.prompt``), as recorded token for token in ``examples.jsonl``;
- ``correct``: the correct attempt only (``curate/pairs.jsonl``), under ``teach.prompt``;
- ``reference``: the training set's reference solution (GSM8K's worked solution), as in OPSD.

``distill.mix`` (λ): each reply slot (question, sample j, step) is, with probability λ drawn from its own seed, the
teacher's verified reply from ``examples.jsonl`` instead of a fresh student sample (GKD's mixing of fixed and
on-policy data). Every student sample is seeded by (seed, step, question id, j): the replies of a step do not
depend on how the batch is split across processes, and a resumed run samples what the uninterrupted one did.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from ssb import dist
from ssb.choices import HINTS
from ssb.stages.generate import batch_seed
from ssb.engine import SamplingParams
from ssb.engine.merged import MergedCopy
from ssb.engine.transformers_engine import TransformersEngine
from ssb.errors import SsbError
from ssb.data import load_problems
from ssb.models import render_chat
from ssb.prompts import pair_messages, reference_messages, student_messages
from ssb.rundir import read_upstream


@dataclass
class Question:
    id: str
    student_prompt: list[int]
    teacher_prompt: list[int]
    teacher_reply: list[int]  # the teacher's verified reply (``mix``)


def teacher_prompt(row: dict, hint: str, tokenizer, teach_prompt: str, pair: dict | None = None,
                   solution: str | None = None) -> list[int]:
    """The hinted prompt (token ids) the teacher reads before the student's reply, for one ``examples.jsonl`` row."""
    if hint == "pair":
        return list(row["teacher_prompt_ids"])
    if hint == "correct":
        if pair is None:
            raise SsbError(f"distill.hint=correct: curate/pairs.jsonl has no pair for example {row['id']!r}")
        msgs = pair_messages(row["question"], pair, "correct_only", teach_prompt)
    elif hint == "reference":
        if not solution:
            raise SsbError(f"distill.hint=reference: the training set has no reference solution for {row['id']!r} "
                           f"(GSM8K's worked answers and a 'solution' column are used)")
        msgs = reference_messages(row["question"], solution, row["answer"])
    else:
        raise SsbError(f"distill.hint must be one of {', '.join(HINTS)}; got {hint!r}")
    return render_chat(tokenizer, msgs)


def questions(rows: list[dict], student_prompts: list[list[int]], teacher_prompts: list[list[int]]) -> list[Question]:
    return [Question(str(r["id"]), s, t, list(r["reply_ids"])) for r, s, t in zip(rows, student_prompts,
                                                                                   teacher_prompts)]


def off_policy(seed: int, step: int, qid: str, j: int, mix: float) -> bool:
    """Whether reply slot ``j`` of question ``qid`` at ``step`` is the teacher's reply (probability ``mix``).

    >>> off_policy(0, 3, "q1", 0, 0.0), off_policy(0, 3, "q1", 0, 1.0)
    (False, True)
    """
    return mix > 0 and random.Random(f"{seed}:on_policy_mix:{step}:{qid}:{j}").random() < mix


class OnPolicySampler:
    """Samples a step's replies from the model being trained and turns them into distill examples.

    ``model``: the peft model (base + adapter) in training; it is put in eval mode while sampling. ``make_example``
    builds a training example from (student prompt, teacher prompt, reply): :func:`ssb.stages.distill.align`.
    """

    def __init__(self, model, tokenizer, stop_ids: list[int], qs: list[Question], dc, seed: int, max_new_tokens: int,
                 make_example, engine_kw: dict | None = None, on_sampled=None):
        self.model, self.qs, self.dc, self.seed, self.make_example = model, qs, dc, seed, make_example
        self.merged = MergedCopy(model) if dc.sample_merged else None
        self.tokenizer, self.stop_ids = tokenizer, stop_ids
        self.engine_kw = {**(engine_kw or {}), "cuda_graphs": False}
        self.params = SamplingParams(1, dc.sample_temperature, 0, 1.0, max_new_tokens)
        self.on_sampled = on_sampled  # called with the number of tokens sampled (the stage's cost ledger)
        self.examples: dict[int, list] = {}  # question index -> this step's examples (this rank's share)

    def before_step(self, step: int, idx: list[int]) -> dict:
        """Sample this rank's share of the step's questions (``idx[rank::world]``, as :mod:`ssb.train` splits the
        batch); returns the step's log fields, summed over ranks (collective)."""
        t0 = time.time()
        mine = idx[dist.rank()::dist.world()]
        slots = [(i, j) for i in mine for j in range(self.dc.samples)]
        live = [(i, j) for i, j in slots if not off_policy(self.seed, step, self.qs[i].id, j, self.dc.mix)]
        replies = dict(zip(live, self._sample(step, live)))
        self.examples = {}
        for i, j in slots:
            q = self.qs[i]
            reply = replies.get((i, j), q.teacher_reply)
            self.examples.setdefault(i, []).append(self.make_example(q.student_prompt, q.teacher_prompt, reply))
        sampled = sum(len(r) for r in replies.values())
        tokens = sum(len(e.targets) for es in self.examples.values() for e in es)
        if self.on_sampled is not None:
            self.on_sampled(sampled)
        glob = dist.all_reduce_sum(torch.tensor([float(sampled), float(tokens), float(len(live))],
                                                dtype=torch.float64))
        self.global_tokens = float(glob[1])
        return {"sampled_tokens": int(glob[0]), "student_replies": int(glob[2]),
                "sample_seconds": round(time.time() - t0, 4)}

    def batch(self, idx: list[int]) -> list:
        """This step's examples of the questions ``idx`` (sampled by :meth:`before_step`)."""
        return [e for i in idx for e in self.examples[i]]

    def _sample(self, step: int, slots: list[tuple[int, int]]) -> list[list[int]]:
        if not slots:
            return []
        was_training = self.model.training
        self.model.eval()  # no dropout while sampling; the engine runs under inference_mode
        try:
            # an engine holds no weights of its own: one per step, over the policy as it is now (a merged copy
            # refreshed in place, or a fresh one where the adapter is not plain LoRA)
            policy = self.merged.refresh() if self.merged is not None else self.model
            engine = TransformersEngine(policy, self.tokenizer, self.stop_ids, **self.engine_kw)
            seeds = [batch_seed(self.seed, "on_policy", step, self.qs[i].id, j) for i, j in slots]
            outs = engine.generate([self.qs[i].student_prompt for i, _ in slots], self.params, seeds)
        finally:
            self.model.train(was_training)
        return [s.token_ids for (s,) in outs]


def student_prompts(rows: list[dict], tokenizer, chat_template: bool = True) -> list[list[int]]:
    return [render_chat(tokenizer, student_messages(r["question"]), chat_template=chat_template) for r in rows]


def hinted_prompts(cfg, run_dir, rows: list[dict], tokenizer) -> list[list[int]]:
    """The teacher's prompt per training row (``teach/examples.jsonl``), by ``distill.hint``: the stored one (pair),
    or rendered from ``curate/pairs.jsonl`` (correct) or the training set's reference solutions (reference)."""
    hint = cfg.distill.hint
    pairs = {p["id"]: p for p in read_upstream(run_dir, "curate", "pairs.jsonl")} if hint == "correct" else {}
    solutions = {}
    if hint == "reference":
        solutions = {p.id: p.solution for p in load_problems(cfg.rollout.data, cfg.data_dir)}
    return [teacher_prompt(r, hint, tokenizer, cfg.teach.prompt, pairs.get(r["id"]), solutions.get(r["id"]))
            for r in rows]


def make_sampler(cfg, model, tokenizer, *, stop_ids: list[int], rows: list[dict], examples,
                 teacher_prompts: list[list[int]], stage, make_example) -> OnPolicySampler:
    """The distill stage's sampler over ``rows`` (``teach/examples.jsonl``); ``examples``, its training examples in
    the same order, give the student prompts as distill renders them; sampled tokens go to ``stage``'s cost ledger."""
    dc = cfg.distill
    qs = questions(rows, [e.student_ids[:e.student_pos[0] + 1] for e in examples], teacher_prompts)
    engine_kw = dict(max_batch_size=cfg.engine.max_batch_size, prefill_tokens=cfg.engine.prefill_tokens)
    return OnPolicySampler(model, tokenizer, stop_ids, qs, dc, cfg.seed,
                           dc.sample_max_new_tokens or cfg.teach.max_new_tokens, make_example, engine_kw,
                           on_sampled=lambda n: stage.add(generated_tokens=n))
