"""The prefill of an engine call at several token budgets (``engine.prefill_tokens``: prompt tokens, padding included,
per forward), side by side in one run on the same prompts: what the CPU default is chosen by.

    SSB_CACHE=... python benchmarks/prefill_budget.py --model testbed --data ../shared/data --problems 256

Each budget prefills every prompt once, as the engine does when a call admits its rows (prompts sorted by length,
left-padded in groups up to the budget). On a CPU the big forwards are slower per token: their elementwise passes
(the MLP's SiLU and product, RMSNorm, rotary) run over activations that no longer fit in the caches.
"""

from __future__ import annotations

import argparse
import time

import torch

from ssb.engine import SamplingParams
from ssb.engine.transformers_engine import Scheduler
from ssb.provenance import machine

from testbed_prompts import engine_and_prompts  # benchmarks/, beside this script


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="testbed")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--problems", type=int, default=256)
    ap.add_argument("--budgets", default="16384,8192,4096,2048,1024")
    a = ap.parse_args()
    eng, prompts = engine_and_prompts(a.model, a.data, a.problems)
    tokens = sum(map(len, prompts))
    print(f"{machine()}, torch {torch.__version__}, {next(eng.model.parameters()).dtype}, "
          f"{torch.get_num_threads()} threads; {len(prompts)} prompts, {tokens} tokens", flush=True)
    rates = {}
    for budget in map(int, a.budgets.split(",")):
        eng.prefill_tokens = budget
        with torch.inference_mode():
            s = Scheduler(eng, prompts, SamplingParams(1, 0.0, 0, 1.0, 1), list(range(len(prompts))))
            t0, forwards = time.time(), 0
            while len(s.prefilled) < len(prompts):
                s.prefill(next(k for k, (i, _) in enumerate(s.queue) if i not in s.prefilled))
                forwards += 1
            dt = time.time() - t0
        rates[budget] = tokens / dt
        print(f"budget {budget:>6}: {forwards:>3} forwards, {dt:6.1f} s, {tokens / dt:6.0f} prompt tok/s", flush=True)
    top = max(rates, key=rates.get)
    print("rate / the largest budget's: " + ", ".join(f"{b}: {r / rates[max(rates)]:.2f}x" for b, r in rates.items())
          + f"; fastest {top}")


if __name__ == "__main__":
    main()
