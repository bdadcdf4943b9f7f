"""GRPO's budget (:mod:`ssb.stages.grpo`): the cost counters it carries through TRL's checkpoints, the callback that
stops training at a step end once a budget is spent, and the newest complete checkpoint to resume from."""

from __future__ import annotations

import time
from pathlib import Path

from ssb import usage
from ssb.provenance import gpus_in_use
from ssb.rows import write_json

COUNTERS = "ssb_counters.json"  # the budget counters, written into each checkpoint directory
COUNTER_KEYS = ("wall_seconds", "device_seconds", "gpu_seconds", "cpu_seconds", "completions", "correct",
                "generated_tokens")


def budget_callback(gc, t0: float, cpu0: float, carried: dict, stats: dict):
    """Counts this stage's cost (``carried`` from the checkpoint resumed + this process since ``t0``, its CPU time
    since ``cpu0``), stops training at a step end once a budget is spent, and writes the counters into every
    checkpoint it saves."""
    from transformers import TrainerCallback

    class Budget(TrainerCallback):
        stopped_by: str | None = None

        def totals(self) -> dict:
            wall, gpus = time.time() - t0, gpus_in_use()
            now = {"wall_seconds": wall, "device_seconds": wall * max(gpus, 1), "gpu_seconds": wall * gpus,
                   "cpu_seconds": usage.cpu_seconds() - cpu0, "completions": stats.get("completions", 0),
                   "correct": stats.get("correct", 0),
                   "generated_tokens": stats.get("generated_tokens", 0)}
            return {k: carried.get(k, 0) + now[k] for k in COUNTER_KEYS}

        def on_step_end(self, args, state, control, **kwargs):
            self.stopped_by = over_budget(gc, self.totals())
            if self.stopped_by:
                control.should_training_stop = True
                control.should_save = args.save_strategy != "no"  # a crash before the manifest resumes here

        def on_save(self, args, state, control, **kwargs):  # after the Trainer wrote checkpoint-<step>
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                write_json(ckpt / COUNTERS, {"step": state.global_step, "stopped_by": self.stopped_by,
                                             **self.totals()})

    return Budget()


def last_checkpoint(trl_dir: Path) -> Path | None:
    """The newest complete checkpoint (its counters are written last), or None."""
    found = []
    for p in Path(trl_dir).glob("checkpoint-*"):
        step = p.name.split("-", 1)[1]
        if step.isdigit() and (p / COUNTERS).is_file() and (p / "trainer_state.json").is_file():
            found.append((int(step), p))
    return max(found)[1] if found else None


def budget_spent(gc, counters: dict) -> str | None:
    if counters.get("stopped_by"):
        return counters["stopped_by"]
    if counters["step"] >= gc.steps:
        return "steps"
    return over_budget(gc, counters)


def over_budget(gc, totals: dict) -> str | None:
    """Which budget the totals have reached: "seconds" (device-seconds), "cpu_seconds", "tokens" (generated), or
    None."""
    if gc.max_seconds is not None and totals["device_seconds"] >= gc.max_seconds:
        return "seconds"
    if gc.max_cpu_seconds is not None and totals.get("cpu_seconds", 0) >= gc.max_cpu_seconds:
        return "cpu_seconds"
    if gc.max_generated_tokens is not None and totals["generated_tokens"] >= gc.max_generated_tokens:
        return "tokens"
    return None
