"""The stages, in one place: what each reads, what it writes, which stage's fingerprint enters its own.

Each stage owns ``RUN_DIR/<name>/`` and meets the others only through files there, finished by ``manifest.json``
(:mod:`ssb.rundir`). Its module (``ssb.stages.<name>``) declares the config fields it reads (``READS``,
:class:`ssb.reads.Reads`) and defines ``run(cfg, run_dir, force=False)``; :data:`STAGES` says the rest, and the
pipeline, ``ssb compare``, the audit and the report iterate it instead of naming stages.

The other modules here are the stages' shared parts: :mod:`ssb.stages.generate` (resumable, sharded generation of
a stage's rows), :mod:`ssb.stages.waves` (rollout -> curate -> teach under ``ssb run``'s budget) and
:mod:`ssb.stages.on_policy` (distill's on-policy targets).
"""

from __future__ import annotations

import functools
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ssb.rows import read_rows
from ssb.rundir import Stage, locking, require_done
from ssb.usage import release_memory


@dataclass(frozen=True)
class StageSpec:
    """One stage. ``inputs``: the upstream files it reads (``stage/file``); ``outputs``: what it writes into its
    directory; ``upstream(cfg)``: the stages whose fingerprint enters its own under ``cfg`` (evaluate: the first
    that finished, if any, is where its adapter comes from); ``solo``: under torchrun it runs on rank 0 alone;
    ``training``: its cost is part of producing the model (all but evaluate); ``in_run``: a step of ``ssb run``
    (all but grpo, the RL baseline, which ``ssb grpo`` runs); ``reproducible``: seeded and deterministic, so a
    finished run whose weights were not kept is rerun to get them back (:func:`restore_weights`); ``split``: how
    its :class:`ssb.rundir.Stage` objects are made where that is not one per config (rollout under budgeted
    waves, evaluate one per benchmark): ``split(cfg, run_dir, up, waves)`` as :meth:`stages`; ``renders``: the
    token sequences it renders from a problem (:data:`RENDERS`), which ``ssb prompts`` shows and checks."""

    name: str
    summary: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    upstream: Callable[[Any], tuple[str, ...]] = lambda cfg: ()
    solo: bool = False
    training: bool = True
    in_run: bool = True
    reproducible: bool = False
    split: Callable[..., list] | None = None
    renders: tuple[str, ...] = ()

    @property
    def module(self):
        return importlib.import_module(f"ssb.stages.{self.name}")

    @property
    def reads(self):
        """The config fields the stage reads (its module's ``READS``)."""
        return self.module.READS

    def upstream_fingerprint(self, cfg, run_dir) -> str | None:
        """The fingerprint of the finished stage this one reads (from its manifest); None when it reads none."""
        up = self.upstream(cfg)
        return require_done(run_dir, up[0])["fingerprint"] if up else None

    def stage(self, cfg, run_dir, up: str | None = None, force: bool = False, reads=None, **config) -> Stage:
        """The :class:`ssb.rundir.Stage` of this stage under ``cfg``. Its fingerprint hashes the config fields it
        reads (``reads``, default :attr:`reads`) and ``up``, the upstream fingerprint (read from the upstream
        manifest when not given), which its manifest records under ``upstream``; ``config``: more to record."""
        reads = reads or self.reads
        if up is None and self.upstream(cfg):
            up = self.upstream_fingerprint(cfg, run_dir)
        values = {**reads.values(cfg), **config, **({"upstream": up} if up is not None else {})}
        return Stage(run_dir, self.name, reads.fingerprint(cfg, *([up] if up is not None else [])), values, force)

    def stages(self, cfg, run_dir, up: tuple[str, str] | None, waves: bool = False) -> list[Stage]:
        """This stage's :class:`ssb.rundir.Stage` objects under ``cfg``, for the checks before a command starts;
        ``up``: (the upstream stage it will read, that stage's fingerprint), None if none has finished or will
        run first; ``waves``: rollout, curate and teach run as budgeted waves. Empty when the stage needs an
        upstream that is not there yet (it is checked when it runs)."""
        if self.split is not None:
            return self.split(cfg, run_dir, up, waves)
        if up is None and self.upstream(cfg):
            return []
        return [self.stage(cfg, run_dir, up=up[1] if up else None)]

    def run(self, cfg, run_dir, force: bool = False) -> dict:
        return self.module.run(cfg, run_dir, force=force)


RENDERS = {  # what a stage may render from a problem (StageSpec.renders), as `ssb prompts` names it
    "sampled": "the chat prompt a model is sampled on: system prompt + bare question",
    "student": "the student's training prompt (the sampled one, or plain text under distill.paper_student_format)",
    "teacher": "the hinted prompt: the question and the attempts (or another hint)",
    "targets": "the reply tokens trained on",
}


def rendering(kind: str) -> tuple[str, ...]:
    """The stages that render ``kind`` (a key of :data:`RENDERS`), in registry order."""
    return tuple(name for name, spec in STAGES.items() if kind in spec.renders)


def entry(name: str):
    """Decorator making a stage's body ``body(cfg, stage, **kw)`` its entry point ``run(cfg, run_dir, force=False,
    **kw)``: it holds the run directory's lock, runs on the stage's view of the config, starts over under
    ``force``, and returns the manifest of a stage already done without calling the body."""

    def wrap(body):
        @locking
        @functools.wraps(body)
        def run(cfg, run_dir, force: bool = False, **kw) -> dict:
            spec = STAGES[name]
            cfg = spec.reads.view(cfg)
            stage = spec.stage(cfg, run_dir, force=force)
            stage.discard_if_forced()
            if stage.is_done():
                return stage.manifest
            return body(cfg, stage, **kw)

        return run

    return wrap


def _distill_upstream(cfg) -> tuple[str, ...]:
    return ("curate",) if cfg.distill.targets == "rollouts" else ("teach",)


def _evaluate_upstream(cfg) -> tuple[str, ...]:
    return ("distill", "grpo") if cfg.evaluate.adapter == "auto" else ()


def _split(name: str) -> Callable[..., list]:
    """The ``split`` of stage ``name``: its module's ``split_stages`` (imported when called)."""
    return lambda *args: importlib.import_module(f"ssb.stages.{name}").split_stages(*args)


STAGES: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("rollout", "K sampled replies per training problem (rollout.data) from the base model",
              inputs=(), outputs=("rollouts.jsonl", "waves.jsonl"), split=_split("rollout"), renders=("sampled",)),
    StageSpec("curate", "grade the replies; one right and the commonest wrong reply per usable problem",
              inputs=("rollout/rollouts.jsonl",), outputs=("graded.jsonl", "pairs.jsonl", "stats.json"),
              upstream=lambda cfg: ("rollout",), solo=True),
    StageSpec("teach", "the base model, shown both replies, writes a standalone solution; correct ones are kept",
              inputs=("curate/pairs.jsonl",), outputs=("attempts.jsonl", "examples.jsonl"),
              upstream=lambda cfg: ("curate",), renders=("teacher",)),
    StageSpec("distill", "LoRA student on the bare question matches the hinted teacher's distribution (or SFT, RFT)",
              inputs=("teach/examples.jsonl", "rollout/rollouts.jsonl", "curate/graded.jsonl"),
              outputs=("adapter/", "train_log.jsonl"), upstream=_distill_upstream, reproducible=True,
              renders=("student", "teacher", "targets")),
    StageSpec("evaluate", "greedy pass@1 per benchmark, with this run's adapter (auto) or another",
              inputs=("distill/adapter/", "grpo/adapter/"), outputs=("<benchmark>/samples.jsonl",
                                                                     "<benchmark>/metrics.json"),
              upstream=_evaluate_upstream, training=False, split=_split("evaluate"), renders=("sampled",)),
    StageSpec("grpo", "the RL baseline: TRL's GRPO with the same LoRA on the rollout problems, under a budget",
              inputs=(), outputs=("adapter/", "train_log.jsonl"), solo=True, in_run=False, renders=("sampled",)),
)}


def restore_weights(cfg, run_dir, name: str) -> None:
    """Rerun finished stage ``name`` when it is ``reproducible`` and none of the ``adapter/`` files its manifest
    lists is there (a saved run keeps no weights: ``benchmarks/testbed_cpu.sh save``), then compare its new loss
    curve with the logged one and say how far they differ. ``cfg``: the whole config (the stage takes its own
    view). Anything else (some adapter files there, a stage that is not reproducible) is left to the checks of
    :func:`ssb.rundir.verify_upstream`."""
    spec, stage_dir = STAGES[name], Path(run_dir) / name
    weights = [f for f in require_done(run_dir, name).get("files") or {} if f.startswith("adapter/")]
    if not spec.reproducible or not weights or any((stage_dir / f).exists() for f in weights):
        return
    log = stage_dir / "train_log.jsonl"
    before = [row["loss"] for row in read_rows(log)] if log.exists() else []
    print(f"{name}: finished, but its adapter was not kept (saved runs keep no weights); rerunning it, seeded, to "
          f"get it back", file=sys.stderr, flush=True)
    spec.run(cfg, run_dir, force=True)
    release_memory()
    after = [row["loss"] for row in read_rows(log)]
    print(f"{name}: {curve_agreement(before, after)}", file=sys.stderr, flush=True)


def curve_agreement(before: list[float], after: list[float]) -> str:
    """One line saying whether a rerun's per-step losses (``after``) reproduce the logged ones (``before``)."""
    if not before:
        return f"rerun: {len(after)} steps; no earlier loss curve to compare with"
    if len(before) != len(after):
        return f"WARNING: the rerun logged {len(after)} steps, the saved run {len(before)}: not the same training"
    gap = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(after, before))
    said = f"the saved loss curve ({len(after)} steps, largest relative difference {gap:.2e})"
    if gap <= 1e-3:
        return f"the rerun reproduces {said}"
    return (f"WARNING: the rerun does NOT reproduce {said}; expected in bf16 on another CPU or GPU class (its kernels "
            f"round differently), not on the same one")


PIPELINE = tuple(name for name, spec in STAGES.items() if spec.in_run)  # the stages of `ssb run`, in order
TRAINING = tuple(name for name, spec in STAGES.items() if spec.training)  # what producing a model costs
