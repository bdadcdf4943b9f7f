"""Step time of on-policy distillation against off-policy SSB at the same batch, on the tiny model (CPU) or any
model: one taught run directory (rollout -> curate -> teach), then distill twice on it, side by side.

    python benchmarks/on_policy_step.py [--steps 8] [key=value overrides, e.g. model.name_or_path=DIR model.device=cuda]

Prints the mean seconds per optimizer step of each mode (the first step left out: warm-up), on-policy's sampling
share, and the ratio. Numbers go to benchmarks/RESULTS.md with the machine and date.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import small_overrides  # noqa: E402

from ssb.stages import curate, distill, rollout, teach  # noqa: E402
from ssb.configio import load_config, to_dict  # noqa: E402
from ssb.data import BUILTIN_DIR  # noqa: E402
from ssb.rows import read_rows  # noqa: E402
from ssb.tiny import ensure_tiny_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ssb-onpolicy-bench-"))
    over = small_overrides(ensure_tiny_model(), BUILTIN_DIR) + ["rollout.data={name: arith, limit: 16}",
                                                                "teach.max_examples=8", *args.overrides]
    cfg = load_config(None, over)
    for stage in (rollout, curate, teach):
        stage.run(cfg, root / "taught")
    rows = {}
    for mode in ("teacher", "on_policy"):
        d = root / mode
        for s in ("rollout", "curate", "teach"):
            shutil.copytree(root / "taught" / s, d / s)
        c = load_config(None, [f"distill.targets={mode}", "distill.batch_size=4", f"distill.max_steps={args.steps}",
                               "distill.save_every=0"], base=to_dict(cfg))
        distill.run(c, d)
        rows[mode] = read_rows(d / "distill" / "train_log.jsonl")[1:]
    off = statistics.mean(r["seconds"] for r in rows["teacher"])
    on = statistics.mean(r["seconds"] for r in rows["on_policy"])
    sample = statistics.mean(r["sample_seconds"] for r in rows["on_policy"])
    tokens = statistics.mean(r["sampled_tokens"] for r in rows["on_policy"])
    print(f"steps measured: {len(rows['teacher'])} per mode (batch 4, first step left out)")
    print(f"off-policy (SSB)  {off:8.3f} s/step")
    print(f"on-policy         {on:8.3f} s/step   of which sampling {sample:.3f} s ({tokens:.0f} tokens/step)")
    print(f"ratio on/off      {on / off:8.2f}x")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
