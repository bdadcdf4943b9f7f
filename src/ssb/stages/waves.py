"""Budgeted generation: ``ssb run`` runs rollout -> curate -> teach in waves until ``teach.max_examples``
teacher-verified examples exist (or the training problems run out), instead of rolling out every problem first.

Why this gives the same examples whatever the wave sizes: every problem's rollouts are seeded by (seed, problem
id), curation of a problem depends on its own samples only, and every teacher sample by (seed, pair id, attempt).
Problems are taken in dataset order, the teacher works through the pairs in that order, and the examples are the
first ``max_examples`` accepted pairs. Waves only decide how far down the list generation has gone.

Wave sizes: the first wave is ``rollout.first_wave`` problems (default ``teach.max_examples``); each later wave is
sized from the yield so far (examples per problem rolled out) to reach the target with a 10% margin. Each wave is
recorded in ``rollout/waves.jsonl`` when planned and when finished, so an interrupted run resumes the wave it was
in, with the same plan; the finished waves' yields (problems rolled out, usable pairs, teacher samples and
acceptances) go into the rollout manifest under ``waves``.

The three stages keep their own directories, files and manifests (rollout's fingerprint also covers the curate
and teach settings, since they decide how much is rolled out); one engine serves the rollouts and the teacher. The
time of the waves is split between the three manifests, not counted three times: grading is curate's, the
teacher's sampling is teach's, the rest (loading the engine, rolling out) rollout's (teach's if rollout had
finished before).
"""

from __future__ import annotations

import contextlib

from ssb.stages import STAGES, curate, rollout, teach

from ssb import dist
from ssb.config import Config
from ssb.engine.factory import make_engine
from ssb.errors import SsbError
from ssb.rows import append_rows, read_rows
from ssb.rundir import locking, read_upstream

LOG = "waves.jsonl"
MARGIN_PCT = 110  # plan 10% more problems than the yield so far says are needed


def next_total(done: int, accepted: int, target: int, available: int, min_wave: int) -> int:
    """Problems to have rolled out after the next wave, from the yield so far.

    >>> next_total(100, 25, 50, 1000, 16)  # 0.25 examples/problem: 25 more need 100 problems, +10%
    210
    >>> next_total(100, 0, 50, 150, 16)  # nothing yet: double, within what exists
    150
    """
    need = target - accepted
    more = -(-need * done * MARGIN_PCT // (accepted * 100)) if accepted else done  # ceil, in integers
    return min(available, done + max(more, min_wave))


@locking
def run(cfg: Config, run_dir, force: bool = False) -> dict:
    """Run (or resume, or skip if finished) rollout, curate and teach under the budget; returns the teach manifest."""
    cfg = rollout.WAVES_READS.view(cfg)  # the three stages' fields: rollout's fingerprint covers them all
    r_stage = rollout.stage_for(cfg, run_dir, force, waves=True)
    c_stage = STAGES["curate"].stage(cfg, run_dir, up=r_stage.fingerprint, force=force)
    t_stage = STAGES["teach"].stage(cfg, run_dir, up=c_stage.fingerprint, force=force)
    for stage in (r_stage, c_stage, t_stage):
        stage.discard_if_forced()
    r_done, c_done, t_done = r_stage.is_done(), c_stage.is_done(), t_stage.is_done()
    if r_done and c_done and t_done:
        return t_stage.manifest
    problems = rollout.training_problems(cfg)
    if not problems:
        raise SsbError("rollout.data has no problems")
    target = cfg.teach.max_examples
    on = _clock(t_stage if r_done else r_stage, (r_stage, c_stage, t_stage))
    rows = read_upstream(run_dir, "rollout", rollout.FILE) if r_done else None  # checked against its manifest
    engine = make_engine(cfg.model, engine_cfg=cfg.engine)
    if not r_done:
        r_stage.begin()  # the model has loaded: from here on the stages count as started
    t_stage.begin()

    def engine_factory():
        return engine

    teacher = teach.Teacher(cfg, t_stage, engine_factory)
    planned, finished = _read_log(r_stage)
    total = planned[-1]["problems_total"] if planned else min(len(problems), cfg.rollout.first_wave or target)
    cache: dict = {}
    while True:
        if not r_done:  # (if finished earlier, the rows are all there)
            _plan(r_stage, planned, total)
            rollout.generate(cfg, r_stage, problems[:total], engine_factory)  # its cost goes to r_stage's ledger
            dist.barrier()  # rank 0 has merged every rank's rows
            rows = read_rows(r_stage.path(rollout.FILE))
        wave = len(planned) - 1
        with on(c_stage):
            graded, pairs, stats = curate.select(rows, cfg, cache=cache)
        with on(t_stage):
            accepted = teacher.work(pairs)
        if not any(r["wave"] == wave for r in finished) and not r_done:
            finished.append(_wave_record(wave, rows, pairs, teacher.funnel(pairs), min(accepted, target), finished))
            if dist.is_main():
                append_rows(r_stage.path(LOG), [finished[-1]])
        if r_done or accepted >= target or len(rows) >= len(problems):
            break
        total = next_total(len(rows), accepted, target, len(problems), 1)
    return _finish(cfg, (r_stage, c_stage, t_stage), (r_done, c_done), rows, (graded, pairs, stats), teacher,
                   finished, on)


def _clock(base, stages):
    """Pause every stage of ``stages`` but ``base``, whose time the waves are unless lent (see the module's
    docstring); returns ``on(stage)``, a context whose time is ``stage``'s."""
    for stage in stages:
        if stage is not base:
            stage.pause()

    def on(stage):
        return contextlib.nullcontext() if stage is base else base.lend(stage)

    return on


def _read_log(r_stage) -> tuple[list[dict], list[dict]]:
    """The waves logged so far: (planned, finished)."""
    log = read_rows(r_stage.path(LOG), repair=dist.is_main())
    return [r for r in log if "accepted" not in r], [r for r in log if "accepted" in r]


def _plan(r_stage, planned: list[dict], total: int) -> None:
    """Plan (and log) a wave that rolls out up to ``total`` problems, unless it is the wave last planned (an
    interrupted run resumes it)."""
    if not planned or planned[-1]["problems_total"] != total:
        planned.append({"wave": len(planned), "problems_total": total})
        if dist.is_main():
            append_rows(r_stage.path(LOG), [planned[-1]])


def _wave_record(wave: int, rows: list, pairs: list, funnel: dict, examples: int, finished: list[dict]) -> dict:
    """The log row of a finished wave: what it added (problems rolled out, usable pairs, teacher samples and
    acceptances) and the totals so far."""
    before = finished[-1] if finished else {"problems_total": 0, "pairs_total": 0, "teacher_samples_total": 0,
                                            "examples_total": 0}
    return {"wave": wave, "problems": len(rows) - before["problems_total"], "problems_total": len(rows),
            "pairs": len(pairs) - before["pairs_total"], "pairs_total": len(pairs),
            "teacher_samples": funnel["samples"] - before["teacher_samples_total"],
            "teacher_samples_total": funnel["samples"],
            "accepted": examples - before["examples_total"], "examples_total": examples}


def _finish(cfg, stages, done, rows, curated, teacher, finished, on) -> dict:
    r_stage, c_stage, t_stage = stages
    graded, pairs, stats = curated
    accepted_ids = [p["id"] for p in pairs if any(r["accepted"] for r in teacher.tries.get(p["id"], []))]
    used = accepted_ids[: cfg.teach.max_examples]
    position = {r["id"]: i for i, r in enumerate(rows)}
    needed = position[used[-1]] + 1 if used else len(rows)
    budget = {"target_examples": cfg.teach.max_examples, "problems_needed": needed,
              "rollout_overshoot": round(len(rows) / max(needed, 1), 4), "waves": finished}
    if not done[0]:
        rollout.finish(r_stage, rows, {}, **budget)
    if not done[1]:
        with on(c_stage):
            c_stage.begin()
            if dist.is_main():
                curate.write_files(c_stage, graded, pairs, stats)
            c_stage.finish({"problems": stats["problems"], "pairs": len(pairs)}, stats=stats)
    with on(t_stage):
        return teacher.finish(pairs, budget=budget)
