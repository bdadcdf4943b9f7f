"""Greedy evaluation cut into calls (each call drains to its few long replies: what generate_rows did before it
sent every missing item in one call) against one call over the same prompts, side by side in one run.

    SSB_CACHE=... python benchmarks/eval_calls.py --model testbed --data ../shared/data --problems 192 --chunk 64
"""

from __future__ import annotations

import argparse
import time

from ssb.engine import SamplingParams

from testbed_prompts import engine_and_prompts  # benchmarks/, beside this script


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="testbed")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--problems", type=int, default=192)
    ap.add_argument("--chunk", type=int, default=64, help="problems per call in the cut-up run (= rows)")
    ap.add_argument("--new", type=int, default=1024)
    a = ap.parse_args()
    eng, prompts = engine_and_prompts(a.model, a.data, a.problems, f"engine.max_batch_size={a.chunk}")
    params = SamplingParams(1, 0.0, 0, 1.0, a.new)
    seeds = list(range(len(prompts)))
    res = {}
    for name, cuts in (("calls", [prompts[i:i + a.chunk] for i in range(0, len(prompts), a.chunk)]),
                       ("one call", [prompts])):
        t0, outs, k = time.time(), [], 0
        for c in cuts:
            outs += eng.generate(c, params, seeds[k:k + len(c)])
            k += len(c)
        dt = time.time() - t0
        tok = sum(len(s[0].token_ids) for s in outs)
        res[name] = (tok, dt, [s[0].token_ids for s in outs])
        print(f"{name:>9}: {len(cuts)} call(s), {tok} tokens in {dt:.1f} s = {tok / dt:.1f} tok/s", flush=True)
    same = sum(x == y for x, y in zip(res["calls"][2], res["one call"][2]))
    print(f"one call / calls: {res['calls'][1] / res['one call'][1]:.2f}x; identical replies {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
