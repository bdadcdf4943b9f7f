"""GRPO's policy-gradient pass on a CPU: TRL's fused log-prob head scoring every position of a micro-batch (its
default off Triton devices: prompt and padding too) against only the labelled completion positions
(``ssb.stages.grpo.scoring_labelled_positions_only``), side by side in one run, on the testbed with the testbed
config's LoRA, as GRPOTrainer runs it: bf16 autocast, log-probs and entropies at the sampling temperature, forward
and backward of one micro-batch (``grpo.micro_batch_size`` completions). Prompts are the first GSM8K train problems,
left-padded; completions are token ids of seeded lengths (values do not change the cost), right-padded.

    SSB_CACHE=... python benchmarks/grpo_scoring.py --rows 8 --repeats 2
"""

from __future__ import annotations

import time

import torch

from ssb.stages.grpo import scoring_labelled_positions_only
from testbed_prompts import policy_parser, testbed_policy, train_prompts


def micro_batch(tok, prompts: list[list[int]], lengths: list[int], pad: int):
    """(input_ids, attention_mask, labels, positions scored by default, labelled positions), labelled as TRL's
    ``_get_per_token_logps_and_entropies`` labels them: completion tokens only."""
    g = torch.Generator().manual_seed(0)
    p_len, c_len = max(map(len, prompts)), max(lengths)
    ids = torch.full((len(prompts), p_len + c_len), pad)
    mask = torch.zeros_like(ids)
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        ids[i, p_len - len(p):p_len] = torch.tensor(p)
        ids[i, p_len:p_len + n] = torch.randint(100, len(tok) - 1000, (n,), generator=g)
        mask[i, p_len - len(p):p_len + n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :p_len] = -100
    return ids, mask, labels, ids.shape[0] * (ids.shape[1] - 1), int((labels[:, 1:] != -100).sum())


def main():
    ap = policy_parser(__doc__)
    ap.add_argument("--rows", type=int, default=8, help="completions per micro-batch (grpo.micro_batch_size)")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per variant, alternating")
    args = ap.parse_args()
    import trl
    from trl.trainer.utils import add_fused_lm_head

    tok, base, policy = testbed_policy(args, f"; trl {trl.__version__}")
    add_fused_lm_head(base, temperature=0.8, outputs=("log_probs", "entropy"))  # as GRPOTrainer: on peft's base
    policy.train()
    _, prompts = train_prompts(tok, args.data, args.rows)
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(180, 513, (args.rows,), generator=g).tolist()  # GSM8K completions: ~180-512 tokens
    ids, mask, labels, every, labelled = micro_batch(tok, prompts, lengths, tok.pad_token_id)
    print(f"# micro-batch {tuple(ids.shape)}: {every} positions, {labelled} labelled ({labelled / every:.0%})")

    def one_pass():
        policy.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = policy(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        loss = -(out.log_probs * (labels[:, 1:] != -100)).sum() / labelled
        loss.backward()
        return time.perf_counter() - t0, out.log_probs.detach().float()

    times: dict[str, list[float]] = {"every position": [], "labelled only": []}
    logps = {}
    for _ in range(args.repeats):
        for name in times:
            if name == "labelled only":
                with scoring_labelled_positions_only():
                    dt, logps[name] = one_pass()
            else:
                dt, logps[name] = one_pass()
            times[name].append(dt)
            print(f"{name:15s} forward + backward {dt:7.2f} s")
    best = {k: min(v) for k, v in times.items()}
    diff = float((logps["every position"] - logps["labelled only"]).abs().max())
    print(f"labelled only / every position: {best['every position'] / best['labelled only']:.2f}x faster "
          f"(best of {args.repeats}); max |log-prob difference| {diff:.2e}")


if __name__ == "__main__":
    main()
