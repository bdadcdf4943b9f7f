"""How much of a trained LoRA adapter a merged bf16 copy keeps (``distill.sample_merged``, ``grpo.sample_merged``).

A merged copy holds ``round_bf16(W + delta)``: a weight moves only once its delta reaches half a bf16 step of it.
For an adapter saved by a training (a distill checkpoint's ``weights.safetensors`` or an ``adapter/`` directory's
``adapter_model.safetensors``), this prints, over every LoRA layer of the testbed:

- the weights: the delta's size against the base weights', and how far the delta the merged copy really adds is
  from the adapter's (relative error, share of entries rounded away);
- the outputs, on the first GSM8K train prompts (teacher-forced, next-token log-probabilities at every position):
  how far the merged copy's are from the unmerged adapter's, against how far the adapter moves them from base.

    SSB_CACHE=... python benchmarks/merged_precision.py --adapter runs/.../distill/checkpoint/weights.safetensors
"""

from __future__ import annotations

import torch
from peft import set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from ssb.engine.merged import merged_copy
from testbed_prompts import policy_parser, testbed_policy, train_prompts

def main():
    ap = policy_parser(__doc__)
    ap.add_argument("--adapter", required=True, help="LoRA weights (.safetensors, peft parameter names)")
    ap.add_argument("--prompts", type=int, default=4, help="GSM8K train prompts for the output comparison")
    args = ap.parse_args()
    tok, base, policy = testbed_policy(args, f"; adapter {args.adapter}")
    state = load_file(args.adapter)
    if any(".default." in k for k in state):  # a training checkpoint: the peft model's own parameter names
        unknown = policy.load_state_dict(state, strict=False).unexpected_keys
    else:  # a saved adapter (save_pretrained): names without the adapter's
        unknown = set_peft_model_state_dict(policy, state).unexpected_keys
    assert not unknown, f"adapter keys the model does not have: {unknown[:3]}"
    policy.eval()
    print(f"# {len(state)} adapter tensors")
    weights(policy)
    outputs(policy, tok, args)


@torch.no_grad()
def weights(policy) -> None:
    delta_sq = base_sq = err_sq = 0.0
    lost = moved = 0
    for _, layer in policy.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        w = layer.get_base_layer().weight
        delta = layer.get_delta_weight("default").float()
        merged = w.clone()
        merged += delta  # as peft's merge: in the weight's dtype
        kept = merged.float() - w.float()
        delta_sq += float(delta.pow(2).sum())
        base_sq += float(w.float().pow(2).sum())
        err_sq += float((kept - delta).pow(2).sum())
        lost += int(((kept == 0) & (delta != 0)).sum())
        moved += int((delta != 0).sum())
    print(f"weights: |delta| / |W| = {(delta_sq / base_sq) ** 0.5:.4f}; merged delta's relative error "
          f"{(err_sq / delta_sq) ** 0.5:.3f}; entries rounded back to the base weight {lost / moved:.1%}")


@torch.no_grad()
def outputs(policy, tok, args) -> None:
    rows, prompts = train_prompts(tok, args.data, args.prompts)
    merged = merged_copy(policy)
    gaps, moves = [], []
    for r, prompt in zip(rows, prompts):
        ids = torch.tensor([prompt + tok.encode(r.solution or "")])
        lora = policy(ids).logits.float().log_softmax(-1)
        with policy.disable_adapter():
            plain = policy(ids).logits.float().log_softmax(-1)
        kept = merged(ids).logits.float().log_softmax(-1)
        p = lora.exp()
        moves.append(float((p * (lora - plain)).sum(-1).mean()))  # KL(adapter || base) per position
        gaps.append(float((p * (lora - kept)).sum(-1).mean()))  # KL(adapter || merged copy)
    print(f"outputs ({len(rows)} prompts, teacher-forced): KL(adapter || base) {sum(moves) / len(moves):.5f} nats "
          f"per position; KL(adapter || merged bf16 copy) {sum(gaps) / len(gaps):.5f}")


if __name__ == "__main__":
    main()
