"""``ssb compare --config C --run-dir R``: the question users run ssb for, in one resumable command — does SSB make
this model better at math, and by how much compared with the alternatives at the same cost?

On one model, one grader and one evaluation harness it runs, each in its own run directory under ``R``:

| run | what | how |
|---|---|---|
| ``base`` | the model as it is | ``evaluate.adapter=none`` |
| ``ssb`` | Semantic Soft Bootstrapping | ``ssb run`` (budgeted waves, distill, evaluate) |
| ``grpo`` | RL at equal cost | ``ssb grpo`` on the problems SSB rolled out, stopped when its cost reaches SSB's training cost (rollout + curate + teach + distill: GPU-seconds, or CPU-seconds on a CPU), then evaluate |
| ``sft`` | is the soft target needed? | cross-entropy on the teacher's replies: ``distill.kd_weight=0 distill.ce_weight=1`` |
| ``rft`` | is the teacher needed? | cross-entropy on the student's own correct rollouts: ``distill.targets=rollouts`` + the above |
| ``onpolicy`` | on-policy self-distillation | the student samples, the hinted teacher scores its tokens: ``distill.targets=on_policy`` on SSB's questions and hinted prompts (:mod:`ssb.stages.on_policy`) |

``sft``, ``rft`` and ``onpolicy`` reuse SSB's finished upstream stages through relative symbolic links (``R/sft/teach ->
../ssb/teach``), not copies: the work is done and paid for once, and ``ssb report`` marks reused stages. The budget
unit is GPU-seconds on GPUs and CPU-seconds on a CPU (every thread's CPU time: a job sharing the cores inflates
wall seconds, not these); wall seconds, GPU-seconds, CPU-seconds and generated tokens are recorded for every run.
Then ``R/report/`` gets the report with paired differences (every run against ``base``, ``ssb`` against each
baseline, 95% paired-bootstrap CIs) and accuracy against cost (``cost.png``).

Every run is an ordinary run directory, so each step resumes like the rest and a finished step is skipped:
rerunning the same command continues where it stopped; ``--runs`` picks a subset (in this order). The command
holds the locks of ``R`` and of every run directory it works in (:func:`run_dirs`), so a second ``ssb compare`` on
``R``, or an ``ssb run`` on ``R/ssb`` meanwhile, is refused.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ssb import dist
from ssb.config import Config
from ssb.configio import load_config, to_dict
from ssb.errors import SsbError
from ssb.lock import locked
from ssb.rundir import MANIFEST
from ssb.rows import read_json
from ssb.stages import PIPELINE, STAGES, TRAINING as STAGE_TRAINING

RUNS = ("base", "ssb", "grpo", "sft", "rft", "onpolicy")
SSB_UPSTREAM = {"sft": ("rollout", "curate", "teach"), "rft": ("rollout", "curate"),
                "onpolicy": ("rollout", "curate", "teach")}
NEEDS = {"grpo": "distill", "sft": "teach", "rft": "curate", "onpolicy": "teach"}  # the ssb stage a run waits for (grpo: its cost)
OVERRIDES = {
    "base": ["evaluate.adapter=none"],
    "ssb": [],
    "grpo": [],
    "sft": ["distill.kd_weight=0", "distill.ce_weight=1"],
    "rft": ["distill.targets=rollouts", "distill.kd_weight=0", "distill.ce_weight=1"],
    "onpolicy": ["distill.targets=on_policy"],
}
TRAINING = tuple(s for s in STAGE_TRAINING if STAGES[s].in_run)  # SSB's training stages: its cost
STEPS = {"base": ["evaluate"], "ssb": list(PIPELINE),
         "grpo": ["grpo", "evaluate"], "sft": ["distill", "evaluate"], "rft": ["distill", "evaluate"],
         "onpolicy": ["distill", "evaluate"]}


def training_cost(run_dir: Path) -> dict:
    """SSB's training cost from its manifests (:func:`ssb.report.cost_totals`: wall seconds, GPU-seconds,
    generated tokens) plus the budget unit, device-seconds: GPU-seconds, or wall seconds where no GPU was used."""
    from ssb.report import cost_totals

    cost = cost_totals([read_json(Path(run_dir) / stage / MANIFEST) for stage in TRAINING])
    cost["device_seconds"] = cost["gpu_seconds"] or cost["wall_seconds"]
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in cost.items()}


def grpo_overrides(cfg: Config, ssb_dir) -> list[str]:
    """GRPO at SSB's cost, as overrides: the budget (:func:`training_cost`: SSB's training GPU-seconds where it used
    GPUs, else its CPU-seconds, which other work sharing the cores does not inflate as it does wall seconds; wall
    seconds for manifests that predate CPU-seconds) and the problems SSB rolled out (the first ``counts.problems``
    of ``rollout.data``). A budget the user set (``grpo.max_seconds`` or ``grpo.max_cpu_seconds``, e.g. SSB's cost
    measured by hand where its manifests undercount it) is kept instead of the measured one."""
    problems = read_json(Path(ssb_dir) / "rollout" / MANIFEST)["counts"]["problems"]
    data = {**to_dict(cfg.rollout.data), "limit": problems}
    if cfg.grpo.max_seconds is not None or cfg.grpo.max_cpu_seconds is not None:
        return [f"rollout.data={json.dumps(data)}"]
    budget = training_cost(ssb_dir)
    if budget["gpu_seconds"] or not budget["cpu_seconds"]:
        limit = f"grpo.max_seconds={max(budget['device_seconds'], 1e-3)}"
    else:
        limit = f"grpo.max_cpu_seconds={max(budget['cpu_seconds'], 1e-3)}"
    return [limit, f"rollout.data={json.dumps(data)}"]


def _config(base: Config, extra: list[str]) -> Config:
    return load_config(None, extra, base=to_dict(base))


def _link_upstream(run_dir: Path, ssb_dir: Path, stages) -> None:
    for stage in stages:
        link, target = run_dir / stage, Path(os.path.relpath(ssb_dir / stage, run_dir))
        if link.is_symlink() and os.readlink(link) == str(target):
            continue
        if link.exists() or link.is_symlink():
            raise SsbError(f"{link} exists and is not a link to {ssb_dir / stage}; remove it or use another --run-dir")
        link.symlink_to(target, target_is_directory=True)


def run_dirs(root, runs) -> list[Path]:
    """The run directories a comparison of ``runs`` works in: ``root``, each run's, and ``ssb``'s, which the
    others read."""
    root = Path(root)
    needed = [r for r in RUNS if r in runs or (r == "ssb" and set(runs) & {"grpo", *SSB_UPSTREAM})]
    return [root] + [root / r for r in needed]


def run(cfg: Config, root, runs=RUNS, force: bool = False) -> Path:
    """Run the comparison under ``root``; returns the report's path."""
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        raise SsbError(f"--runs: unknown run '{unknown[0]}'; runs are {', '.join(RUNS)}")
    with locked(*run_dirs(root, runs)):
        return _run(cfg, Path(root), runs, force)


def _run(cfg: Config, root: Path, runs, force: bool) -> Path:
    from ssb.pipeline import run_stages
    from ssb.report import main_report

    ssb_dir = root / "ssb"
    for name in [r for r in RUNS if r in runs]:
        run_dir = root / name
        sub = _config(cfg, OVERRIDES[name])
        need = NEEDS.get(name)
        if need and not (ssb_dir / need / MANIFEST).exists():
            raise SsbError(f"compare: the '{name}' run needs the ssb run's finished {need} stage in {ssb_dir}; "
                           f"run with --runs ssb,{name} (or all runs) first")
        if name == "grpo":
            sub = _config(sub, grpo_overrides(sub, ssb_dir))
        if dist.is_main():
            run_dir.mkdir(parents=True, exist_ok=True)
            _link_upstream(run_dir, ssb_dir, SSB_UPSTREAM.get(name, ()))
        dist.barrier()
        print(f"ssb compare: {name} -> {run_dir}", file=sys.stderr, flush=True)
        run_stages(sub, run_dir, STEPS[name], force=force, budgeted=True, save_config=True)
    if not dist.is_main():
        return root / "report" / "report.md"
    present = [r for r in RUNS if (root / r / "evaluate").is_dir()]
    return main_report([root / r for r in present], root / "report", labels=present,
                       base="base" if "base" in present else None, focus="ssb" if "ssb" in present else None)
