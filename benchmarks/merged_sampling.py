"""GRPO's and on-policy's sampling on a CPU: the LoRA policy unmerged (each linear layer: the base product plus the
adapter's two small ones) against a merged copy (``grpo.sample_merged``, ``distill.sample_merged``: one product per
layer), with ssb's engine, side by side in one run, on the same prompts and seed; also the in-place refresh that a
copy kept across steps costs per step (:class:`ssb.engine.merged.MergedCopy`). The adapter is LoRA r=32 on every
linear layer (the testbed config's) with random B (a trained adapter's delta, not the zero one peft starts with).

    SSB_CACHE=... python benchmarks/merged_sampling.py --model testbed --data ../shared/data --prompts 4 --n 8 --new 256
    SSB_CACHE=... python benchmarks/merged_sampling.py --prompts 4 --n 1 --new 512   # an on-policy step's sampling
"""

from __future__ import annotations

import time

import torch

from ssb.engine import SamplingParams
from ssb.engine.merged import MergedCopy
from ssb.engine.transformers_engine import TransformersEngine
from ssb.models import stop_token_ids
from testbed_prompts import policy_parser, testbed_policy, train_prompts

def main():
    ap = policy_parser(__doc__)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step (grpo.batch_size)")
    ap.add_argument("--n", type=int, default=8, help="completions per prompt (grpo.num_generations)")
    ap.add_argument("--new", type=int, default=256, help="new tokens at most per completion")
    args = ap.parse_args()
    tok, base, policy = testbed_policy(args)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    policy.eval()
    _, prompts = train_prompts(tok, args.data, args.prompts)
    params = SamplingParams(args.n, 0.8, 50, 1.0, args.new)
    stops = stop_token_ids(tok, base)
    rates = {}
    for name in ("unmerged", "merged", "unmerged"):  # unmerged twice: the first call also warms the machine up
        t0 = time.perf_counter()
        copy = MergedCopy(policy)
        model = copy.refresh() if name == "merged" else policy
        t_copy = time.perf_counter() - t0
        if name == "merged":  # what every later step pays instead (on-policy keeps the copy across steps)
            t1 = time.perf_counter()
            copy.refresh()
            print(f"# in-place refresh of the kept copy: {time.perf_counter() - t1:.2f} s")
            t0 += time.perf_counter() - t1
        engine = TransformersEngine(model, tok, stops, max_batch_size=256)
        with torch.no_grad():
            samples = engine.generate(prompts, params, 0)
        dt = time.perf_counter() - t0
        tokens = sum(len(s.token_ids) for group in samples for s in group)
        rates[name] = tokens / dt
        print(f"{name:9s} copy+merge {t_copy:6.1f} s  total {dt:7.1f} s  {tokens:6d} tokens  {tokens / dt:7.1f} tok/s")
        del engine, model
    print(f"merged / unmerged (second unmerged run): {rates['merged'] / rates['unmerged']:.2f}x")


if __name__ == "__main__":
    main()
