"""Greedy evaluation in one long call, decode attention over the whole KV buffer against attention per chunk of rows
over its own columns (``ssb.engine.windows``), side by side in one run on the same prompts.

    SSB_CACHE=... python benchmarks/kv_windows.py --model testbed --data ../shared/data --problems 256 --rows 128

Prints tokens/s per arm, the attention width per row (mean over steps of the (row, column) pairs attended / rows),
how often rows were reordered, and how many replies are identical (bf16 is not batch-invariant: see eval_calls.py).
"""

from __future__ import annotations

import argparse
import time

import torch

from ssb.engine import SamplingParams, windows
from ssb.engine.kv_buffer import KVBuffer
from ssb.engine.transformers_engine import Scheduler

from testbed_prompts import engine_and_prompts  # benchmarks/, beside this script


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="testbed")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--problems", type=int, default=256)
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--new", type=int, default=1024)
    ap.add_argument("--before", action="store_true", help="the first arm also prefills 16384 tokens per forward (the "
                    "engine before this session: both changes against neither)")
    a = ap.parse_args()
    eng, prompts = engine_and_prompts(a.model, a.data, a.problems, f"engine.max_batch_size={a.rows}")
    params = SamplingParams(1, 0.0, 0, 1.0, a.new)
    print(f"{torch.__version__}, dtype {next(eng.model.parameters()).dtype}, {torch.get_num_threads()} threads, "
          f"{a.problems} problems, {a.rows} rows, <= {a.new} tokens, chunk {windows.CHUNK}", flush=True)

    widths, lows, owns, keeps = [], [], [], []
    step, keep = KVBuffer.step, Scheduler._keep

    def counted_step(self, inputs):
        starts = [s for _, _, s in inputs]
        pairs = windows.window_cost(starts, self.t) if self.windowed else len(starts) * (self.t + 1)
        widths.append(pairs / len(starts))
        lows.append(self.t + 1 - min(starts))  # from the oldest row's start
        owns.append(sum(self.t + 1 - s for s in starts) / len(starts))  # each row's own columns
        return step(self, inputs)

    KVBuffer.step = counted_step
    Scheduler._keep = lambda self, rows: keeps.append(len(rows)) or keep(self, rows)
    res = {}
    default_prefill = eng.prefill_tokens
    for name, on in (("whole buffer", False), ("windows", True)):
        eng.windowed = on
        eng.prefill_tokens = 16384 if a.before and not on else default_prefill
        for x in (widths, lows, owns, keeps):
            x.clear()
        t0 = time.time()
        outs = eng.generate(prompts, params, list(range(len(prompts))))
        dt = time.time() - t0
        tok = sum(len(s[0].token_ids) for s in outs)
        res[name] = (dt, [s[0].token_ids for s in outs])
        print(f"{name:>12} (prefill {eng.prefill_tokens}): {tok} tokens in {dt:.1f} s = {tok / dt:.1f} tok/s; "
              f"{len(widths)} steps, attention width {sum(widths) / len(widths):.0f} columns per row (from the oldest "
              f"row {sum(lows) / len(lows):.0f}, each row's own {sum(owns) / len(owns):.0f}); rows kept/reordered "
              f"{len(keeps)} times", flush=True)
    same = sum(x == y for x, y in zip(res["whole buffer"][1], res["windows"][1]))
    print(f"windows / whole buffer: {res['whole buffer'][0] / res['windows'][0]:.2f}x; identical replies "
          f"{same}/{len(prompts)}")


if __name__ == "__main__":
    main()
