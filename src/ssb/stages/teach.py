"""Stage 3, teach: the same model, shown the problem with a correct and an incorrect attempt, writes a clean
solution; only teacher replies that finish (end-of-turn) and grade correct are kept.

The teacher's reply is stored as the token ids it sampled — never decoded and re-encoded — because those exact
tokens are the positions at which the student is trained to match the teacher's distribution. The hinted prompt's
token ids are stored too, so the distill stage conditions the teacher on exactly what it was sampled from.

Files:

- ``teach/attempts.jsonl`` (working log, appended per batch; what makes the stage resumable): one row per teacher
  sample ``{"id", "attempt", "accepted", "finish_reason", "answer", "reply_text", "reply_ids"}``;
- ``teach/examples.jsonl`` (the contract, written at the end): per accepted pair, in pair order, at most
  ``teach.max_examples`` rows ``{"id", "question", "answer", "grader", "teacher_prompt_ids", "reply_ids",
  "reply_text", "attempt"}``.

Pairs are processed in batches; a pair whose sample is rejected is retried (``teach.attempts``) with a new seed.
Processing stops once ``max_examples`` pairs are accepted. ``teach.prompt`` picks the teacher's instructions
(:func:`ssb.prompts.pair_messages`); the manifest records it with the acceptance rate and a rejection funnel
(truncated, no answer, gave the incorrect attempt's answer).
"""

from __future__ import annotations

import torch

from ssb import dist
from ssb.stages.generate import batch_seed
from ssb.config import Config
from ssb.reads import Reads
from ssb.engine import SamplingParams
from ssb.engine.factory import make_engine
from ssb.errors import SsbError
from ssb.grading import extract_answer, grade
from ssb.models import load_tokenizer, render_chat
from ssb.progress import GenerationBar
from ssb.prompts import pair_messages
from ssb.rows import append_rows, merge_parts, own_part, read_with_parts, write_rows
from ssb.stages import entry
from ssb.rundir import Stage, batches, read_upstream


# the config fields this stage reads (ssb.reads.Reads); curate.strict: the teacher's replies are graded as curated
READS = Reads("teach", result=("model", "seed", "teach", "curate.strict", "engine.backend"), how=("engine",))


@entry("teach")
def run(cfg: Config, stage: Stage) -> dict:
    pairs = read_upstream(stage.run_dir, "curate", "pairs.jsonl")
    if not pairs:
        raise SsbError("curation kept 0 pairs (see curate/stats.json): nothing for the teacher to work on; "
                       "roll out more problems or samples")
    teacher = Teacher(cfg, stage)
    teacher.work(pairs)
    return teacher.finish(pairs)


class Teacher:
    """The teach stage's state: every teacher sample so far (``attempts.jsonl``), the engine, the prompts.

    :meth:`work` can be called again with a longer list of pairs (the budgeted waves of ``ssb run``): pairs already
    decided are skipped, so the outcome is the same as one call with the whole list. Every pair's sample of attempt
    ``a`` is seeded by (seed, pair id, a) alone, so it does not depend on batching or waves either.
    """

    def __init__(self, cfg: Config, stage: Stage, engine_factory=None):
        self.cfg, self.stage, self.tc = cfg, stage, cfg.teach
        self.engine_factory = engine_factory or (lambda: make_engine(cfg.model, engine_cfg=cfg.engine))
        self.params = SamplingParams(1, self.tc.temperature, self.tc.top_k, self.tc.top_p, self.tc.max_new_tokens)
        self.log_path = stage.path("attempts.jsonl")
        self.own_log = own_part(self.log_path)
        self.tries = _read_tries(self.log_path)
        self.engine, self.tokenizer = None, None
        self.prompts: dict[str, list[int]] = {}

    def accepted(self) -> int:
        return sum(any(r["accepted"] for r in rs) for rs in self.tries.values())

    def prompt(self, p: dict) -> list[int]:
        if p["id"] not in self.prompts:
            if self.tokenizer is None:
                self.tokenizer = load_tokenizer(self.cfg.model)
            msgs = pair_messages(p["question"], p, self.tc.context, self.tc.prompt)
            self.prompts[p["id"]] = render_chat(self.tokenizer, msgs)
        return self.prompts[p["id"]]

    def _decided(self, p: dict) -> bool:
        rs = self.tries.get(p["id"], [])
        return any(r["accepted"] for r in rs) or len(rs) >= self.tc.attempts

    def work(self, pairs: list[dict]) -> int:
        """Sample the teacher on undecided ``pairs`` in order, in batches, until ``max_examples`` are accepted (or
        the pairs run out); returns the number of pairs accepted so far. Under data parallelism batch ``b`` is
        rank ``b % world``'s and all ranks agree when to stop."""
        todo = [p for p in pairs if not self._decided(p)]
        new_accepted, resumed = 0, self.accepted()
        mine = any(b % dist.world() == dist.rank() for b, _ in batches(todo, self.tc.batch_size))
        if mine and resumed < self.tc.max_examples:
            self._engine()  # before the progress bar: a model that does not load is one error line
        bar = GenerationBar(len(todo), "teach", "pair")
        for b, batch in batches(todo, self.tc.batch_size):
            if b % dist.world() == 0:  # a round of `world` batches, one per rank
                if resumed + int(dist.all_reduce_sum(torch.tensor(new_accepted))) >= self.tc.max_examples:
                    break
            if b % dist.world() != dist.rank():
                continue
            new_accepted += self._batch(batch, bar)
            bar.note(accepted=self.accepted())
            bar.advance(len(batch))
        bar.close()
        if dist.world() > 1:
            dist.barrier()  # every rank's part is complete
            self.tries = _read_tries(self.log_path)
        return self.accepted()

    def _engine(self):
        if self.engine is None:
            self.engine = self.engine_factory()
            self.stage.begin()  # the model has loaded: from here on the stage counts as started
        return self.engine

    def _batch(self, batch: list[dict], bar: GenerationBar) -> int:
        new = 0
        for attempt in range(self.tc.attempts):
            live = [p for p in batch if not any(r["accepted"] for r in self.tries.get(p["id"], []))
                    and not any(r["attempt"] == attempt for r in self.tries.get(p["id"], []))]
            if not live:
                continue
            self._engine()
            seeds = [batch_seed(self.cfg.seed, "teach", p["id"], attempt) for p in live]
            hook = bar.begin(samples=len(live))
            outs = self.engine.generate([self.prompt(p) for p in live], self.params, seeds, progress=hook)
            bar.end(tokens=sum(len(s.token_ids) for (s,) in outs))
            rows = []
            for p, (s,) in zip(live, outs):
                ok = s.finish_reason == "stop" and grade(s.text, p["answer"], p["grader"],
                                                         strict=self.cfg.curate.strict)
                rows.append({"id": p["id"], "attempt": attempt, "accepted": ok, "finish_reason": s.finish_reason,
                             "answer": extract_answer(s.text), "reply_text": s.text, "reply_ids": s.token_ids})
            append_rows(self.own_log, rows)
            self.stage.add(generated_tokens=sum(len(r["reply_ids"]) for r in rows))
            new += sum(r["accepted"] for r in rows)
            for r in rows:
                self.tries.setdefault(r["id"], []).append(r)
        return new

    def funnel(self, pairs: list[dict]) -> dict:
        """Teacher outcome over ``pairs``: tried, accepted, and why the rest were rejected."""
        tried = [p["id"] for p in pairs if p["id"] in self.tries]
        samples = [r for i in tried for r in self.tries[i]]
        wrong = [r for r in samples if not r["accepted"]]
        by_id = {p["id"]: p for p in pairs}
        copied = sum(1 for r in wrong if r["answer"] is not None and r["finish_reason"] == "stop"
                     and r["answer"] == by_id[r["id"]].get("incorrect_answer"))
        return {"pairs_tried": len(tried), "accepted": sum(any(r["accepted"] for r in self.tries[i]) for i in tried),
                "samples": len(samples), "samples_accepted": len(samples) - len(wrong),
                "rejected_truncated": sum(r["finish_reason"] == "length" for r in wrong),
                "rejected_no_answer": sum(r["finish_reason"] == "stop" and r["answer"] is None for r in wrong),
                "rejected_gave_incorrect_attempts_answer": copied}

    def finish(self, pairs: list[dict], **extra) -> dict:
        """Write ``examples.jsonl`` (the first ``max_examples`` accepted pairs, in pair order) and the manifest."""
        if dist.world() > 1:
            if not dist.is_main():
                return self.stage.finish({})  # waits for rank 0's manifest
            merge_parts(self.log_path, [r for rs in self.tries.values() for r in rs])
        examples = []
        for p in pairs:
            good = [r for r in self.tries.get(p["id"], []) if r["accepted"]]
            if good and len(examples) < self.tc.max_examples:
                r = min(good, key=lambda r: r["attempt"])
                examples.append({"id": p["id"], "question": p["question"], "answer": p["answer"],
                                 "grader": p["grader"], "teacher_prompt_ids": self.prompt(p),
                                 "reply_ids": r["reply_ids"], "reply_text": r["reply_text"], "attempt": r["attempt"]})
        if not examples:
            raise SsbError("the teacher produced 0 verified solutions; try teach.attempts > 1 or more pairs")
        write_rows(self.stage.path("examples.jsonl"), examples)
        funnel = self.funnel(pairs)
        counts = {"pairs": len(pairs), "pairs_tried": funnel["pairs_tried"], "examples": len(examples),
                  "samples": funnel["samples"]}
        return self.stage.finish(counts, prompt=self.tc.prompt, context=self.tc.context,
                                 acceptance=round(funnel["accepted"] / max(funnel["pairs_tried"], 1), 4),
                                 funnel=funnel, **extra)  # generated_tokens: the cost ledger's sum


def _read_tries(log_path) -> dict[str, list[dict]]:
    """Every teacher sample so far, by pair id, from the log and any ranks' part files."""
    tries: dict[str, list[dict]] = {}
    for r in read_with_parts(log_path, repair=True):
        tries.setdefault(r["id"], []).append(r)
    return tries
