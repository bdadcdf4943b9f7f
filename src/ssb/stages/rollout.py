"""Stage 1, rollout: sample K responses per training problem from the base model under the fixed system prompt.

Output ``rollout/rollouts.jsonl``, one row per problem, in dataset order::

    {"id", "question", "answer" (gold), "grader",
     "samples": [{"text", "token_ids" (as sampled, end-of-turn included if stopped), "finish_reason"}, ...K]}
"""

from __future__ import annotations

from ssb.stages.generate import generate_rows, sample_dict
from ssb.config import Config
from ssb.reads import Reads
from ssb.data import load_problems
from ssb.engine import SamplingParams
from ssb.engine.factory import make_engine
from ssb.errors import SsbError
from ssb.models import render_chat
from ssb.prompts import student_messages
from ssb.stages import STAGES, entry
from ssb.rundir import Stage

FILE = "rollouts.jsonl"
# The config fields this stage reads (see ssb.reads.Reads): the result ones make up its fingerprint.
READS = Reads("rollout", result=("model", "seed", "rollout", "engine.backend"), how=("engine", "data_dir"))
# Under ssb run's budget (ssb.stages.waves) how far the rollout goes depends on curation and the teacher too.
WAVES_READS = Reads("rollout-waves", result=READS.result + ("curate", "teach"), how=READS.how)


def stage_for(cfg: Config, run_dir, force: bool = False, waves: bool = False) -> Stage:
    """The rollout stage, alone or under budgeted ``waves`` (whose fingerprint also covers curate and teach)."""
    if not waves:
        return STAGES["rollout"].stage(cfg, run_dir, force=force)
    return STAGES["rollout"].stage(cfg, run_dir, force=force, reads=WAVES_READS, waves=True)


def split_stages(cfg: Config, run_dir, up, waves: bool) -> list[Stage]:
    """:meth:`ssb.stages.StageSpec.stages` of rollout (it has no upstream)."""
    return [stage_for(cfg, run_dir, waves=waves)]


@entry("rollout")
def run(cfg: Config, stage: Stage) -> dict:
    problems = training_problems(cfg)
    rows, stats = generate(cfg, stage, problems)  # begins the stage once the engine has loaded
    return finish(stage, rows, stats)


def training_problems(cfg: Config) -> list:
    problems = load_problems(cfg.rollout.data, cfg.data_dir)
    if len({p.id for p in problems}) != len(problems):
        raise SsbError("training problems have duplicate ids; set rollout.data.id_field to a unique column")
    return problems


def generate(cfg: Config, stage: Stage, problems: list, engine_factory=None) -> tuple[list[dict], dict]:
    """Rows for ``problems`` (those already in the file are kept, the rest generated); see
    :func:`ssb.stages.generate.generate_rows`."""
    rc = cfg.rollout
    params = SamplingParams(rc.samples, rc.temperature, rc.top_k, rc.top_p, rc.max_new_tokens)

    def prompt_of(tokenizer, p):
        return render_chat(tokenizer, student_messages(p.question))

    def row_of(p, samples):
        return {"id": p.id, "question": p.question, "answer": p.answer, "grader": p.grader,
                "samples": [sample_dict(s) for s in samples]}

    factory = engine_factory or (lambda: make_engine(cfg.model, engine_cfg=cfg.engine))
    return generate_rows(stage, FILE, problems, prompt_of=prompt_of, row_of=row_of, engine_factory=factory,
                         params=params, seed=cfg.seed, batch_size=rc.batch_size, desc="rollout")


def finish(stage: Stage, rows: list[dict], stats: dict, **extra) -> dict:
    samples = [s for r in rows for s in r["samples"]]
    counts = {"problems": len(rows), "samples": len(samples),
              "truncated": sum(s["finish_reason"] == "length" for s in samples),
              "tokens": sum(len(s["token_ids"]) for s in samples)}
    return stage.finish(counts, **stats, **extra)
