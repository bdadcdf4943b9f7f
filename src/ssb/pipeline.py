"""Running stages in order: ``ssb run`` and ``ssb compare`` (and the single-stage commands) go through
:func:`run_stages`, which checks every asked-for stage against the run directory before any starts, runs
rollout -> curate -> teach as budgeted waves when asked, and prints one summary line per stage."""

from __future__ import annotations

import sys
from pathlib import Path

from ssb import dist
from ssb.config import Config
from ssb.configio import dump_yaml
from ssb.rows import read_json
from ssb.rundir import MANIFEST, flush_deferred, write_on_begin
from ssb.stages import STAGES
from ssb.usage import release_memory


def _summary(name: str, result: dict, run_dir: Path) -> str:
    if name == "evaluate":
        parts = [f"{k}: acc {m['accuracy']:.3f} ({m['problems']} problems)" for k, m in result.items()]
        return f"evaluate: {'; '.join(parts)} -> {run_dir / 'evaluate'}"
    counts = ", ".join(f"{k} {v}" for k, v in result.get("counts", {}).items())
    return f"{name}: {counts} in {result.get('wall_seconds', 0):.1f}s -> {run_dir / name}"


def _run_stage(name: str, cfg: Config, run_dir: Path, force: bool):
    """Run one stage; under torchrun, stages that do not shard their work (``solo``: curate, grpo) run on rank 0
    alone."""
    spec = STAGES[name]
    if spec.solo and dist.world() > 1:
        if dist.is_main():
            with dist.solo():
                result = spec.run(cfg, run_dir, force=force)
        else:
            result = None
        dist.barrier()
        return result or read_json(run_dir / name / MANIFEST)
    return spec.run(cfg, run_dir, force=force)


def _manifest_fp(run_dir: Path, name: str) -> str | None:
    p = run_dir / name / MANIFEST
    return read_json(p).get("fingerprint") if p.exists() else None


def check_stages(cfg: Config, run_dir: Path, stages, waves: bool = False) -> None:
    """Refuse, before anything is written, a stage of ``stages`` that was started or finished with another
    configuration. A stage's fingerprint is computed from the fingerprint its upstream stage will have (if that
    runs in this command too) or has (its manifest); a stage whose upstream is not there yet is checked when it
    runs (and then refused for that)."""
    fps: dict[str, str | None] = {}

    def fp_of(name: str) -> str | None:
        return fps[name] if name in fps else _manifest_fp(run_dir, name)

    for name in stages:
        spec = STAGES[name]
        up = next((u for u in spec.upstream(cfg) if fp_of(u) is not None), None)
        checked = spec.stages(cfg, run_dir, (up, fp_of(up)) if up else None, waves)
        for stage in checked:
            stage.check()
        fps[name] = checked[0].fingerprint if checked else None


def run_stages(cfg: Config, run_dir: Path, stages, force: bool = False, budgeted: bool = False,
               save_config: bool = False) -> None:
    """Run ``stages`` in order. ``budgeted`` (``ssb run`` with ``rollout.budget=waves``): rollout, curate and teach,
    when all three are asked for, run together in waves (:mod:`ssb.stages.waves`). ``save_config``: write
    ``RUN_DIR/config.yaml`` once a stage begins (or at the end, if none had to)."""
    waves = budgeted and cfg.rollout.budget == "waves" and {"rollout", "curate", "teach"} <= set(stages)
    if not force:
        check_stages(cfg, run_dir, stages, waves)
    if save_config:
        write_on_begin(run_dir, "config.yaml", dump_yaml(cfg))
    try:
        _run_in_order(cfg, run_dir, stages, force, waves)
        flush_deferred(run_dir)
    finally:
        write_on_begin(run_dir, "config.yaml", None)


def _run_in_order(cfg: Config, run_dir: Path, stages, force: bool, waves: bool) -> None:
    done_before = {name for name in stages if name != "evaluate" and not force
                   and (run_dir / name / "manifest.json").exists()}
    for name in stages:
        if waves and name in ("curate", "teach"):
            result = read_json(run_dir / name / "manifest.json")
        elif waves and name == "rollout":
            from ssb.stages import waves as waves_module

            waves_module.run(cfg, run_dir, force=force)
            result = read_json(run_dir / name / "manifest.json")
        else:
            result = _run_stage(name, cfg, run_dir, force)
        release_memory()  # what the stage freed goes back to the system before the next one loads its model
        if not dist.is_main():
            continue
        note = " (already done)" if name in done_before else ""
        print(_summary(name, result, run_dir) + note, file=sys.stderr, flush=True)


