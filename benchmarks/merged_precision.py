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

import argparse
import datetime

import torch
from peft import get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from ssb.config import DatasetConfig, DistillConfig, ModelConfig
from ssb.data import load_problems
from ssb.engine.merged import merged_copy
from ssb.models import load_model, load_tokenizer, lora_config, native_cpu_bf16, render_chat
from ssb.prompts import student_messages
from ssb.provenance import machine


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", required=True, help="LoRA weights (.safetensors, peft parameter names)")
    ap.add_argument("--model", default="testbed", help="directory holding model.gguf (fetch.sh DIR)")
    ap.add_argument("--gguf", default="model.gguf")
    ap.add_argument("--data", default="../shared/data", help="data directory (GSM8K train)")
    ap.add_argument("--prompts", type=int, default=4, help="GSM8K train prompts for the output comparison")
    args = ap.parse_args()
    print(f"# {datetime.date.today()} {machine()} native bf16: {native_cpu_bf16()}; torch {torch.__version__}; "
          f"adapter {args.adapter}")
    cfg = ModelConfig(name_or_path=args.model, gguf_file=args.gguf, device="cpu")
    tok, base = load_tokenizer(cfg), load_model(cfg)
    policy = get_peft_model(base, lora_config(DistillConfig()))
    state = load_file(args.adapter)
    missing = policy.load_state_dict(state, strict=False).unexpected_keys
    assert not missing, f"adapter keys the model does not have: {missing[:3]}"
    policy.eval()
    print(f"# model dtype {base.dtype}; {len(state)} adapter tensors")
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
    rows = load_problems(DatasetConfig(name="gsm8k", split="train", limit=args.prompts), args.data)
    merged = merged_copy(policy)
    gaps, moves = [], []
    for r in rows:
        ids = torch.tensor([render_chat(tok, student_messages(r.question)) + tok.encode(r.solution or "")])
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
