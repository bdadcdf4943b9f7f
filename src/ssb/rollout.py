"""Stage 1, rollout: sample K responses per training problem from the base model under the fixed system prompt.

Output ``rollout/rollouts.jsonl``, one row per problem, in dataset order::

    {"id", "question", "answer" (gold), "grader",
     "samples": [{"text", "token_ids" (as sampled, end-of-turn included if stopped), "finish_reason"}, ...K]}
"""

from __future__ import annotations

from ssb.common import generate_rows, sample_dict
from ssb.config import Config, fingerprint
from ssb.data import load_problems
from ssb.engine import SamplingParams, make_engine
from ssb.errors import SsbError
from ssb.models import render_chat
from ssb.prompts import student_messages
from ssb.rundir import Stage

FILE = "rollouts.jsonl"


def stage_for(cfg: Config, run_dir, force: bool = False) -> Stage:
    fp = fingerprint("rollout", cfg.model, cfg.seed, cfg.rollout, cfg.engine.backend)
    return Stage(run_dir, "rollout", fp, {"model": cfg.model, "seed": cfg.seed, "rollout": cfg.rollout}, force)


def run(cfg: Config, run_dir, force: bool = False) -> dict:
    stage = stage_for(cfg, run_dir, force)
    if stage.is_done():
        return stage.manifest
    problems = load_problems(cfg.rollout.data, cfg.data_dir)
    if len({p.id for p in problems}) != len(problems):
        raise SsbError("training problems have duplicate ids; set rollout.data.id_field to a unique column")
    stage.begin()
    rc = cfg.rollout
    params = SamplingParams(rc.samples, rc.temperature, rc.top_k, rc.top_p, rc.max_new_tokens)

    def prompt_of(tokenizer, p):
        return render_chat(tokenizer, student_messages(p.question))

    def row_of(p, samples):
        return {"id": p.id, "question": p.question, "answer": p.answer, "grader": p.grader,
                "samples": [sample_dict(s) for s in samples]}

    rows, stats = generate_rows(stage, FILE, problems, prompt_of, row_of,
                                lambda: make_engine(cfg.model, engine_cfg=cfg.engine), params, cfg.seed,
                                rc.batch_size, "rollout")
    samples = [s for r in rows for s in r["samples"]]
    counts = {"problems": len(rows), "samples": len(samples),
              "truncated": sum(s["finish_reason"] == "length" for s in samples),
              "tokens": sum(len(s["token_ids"]) for s in samples)}
    return stage.finish(counts, **stats)
