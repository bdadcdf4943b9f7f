"""The real model on a CPU: fp32 against bf16, measured side by side in one run, beside this CPU's GEMM rate.

On the testbed (Qwen2.5-Coder-0.5B-Instruct GGUF, ``../shared/testbed/fetch.sh DIR``) and GSM8K test prompts under
ssb's system prompt, per dtype:

- the GEMM rate of the model's MLP shape (rows x 896 x 4864) at 16, 64 and 256 rows: the matrix units' ceiling;
- greedy and sampled (T=0.8, top-k 50) generation through ssb's engine, tokens/s, and as a share of the limit
  ``rate(256 rows) / (2 x parameters)`` tokens/s (a decode step is ~2 FLOPs per multiplied parameter per token:
  the input embedding is a lookup);
- one decode step of a full batch, profiled: matrix products' share (``aten::mm``/``addmm``) of the step;
- a distill step (batch 4 of the greedy replies, LoRA r=32 all linear layers, online teacher, forward KL at T=2):
  seconds, and as a share of its limit (student forward + backward ~3x, teacher forward 1x, 2 FLOPs/param/token);
- greedy agreement of bf16 with fp32 (same final answer) and accuracy on the same problems;
- with bf16, transformers' own ``model.generate``: one prompt at a time and padded batches, tokens/s;
- peak resident memory (VmHWM) after each part.

    python benchmarks/cpu.py --model testbed --data ../shared/data                             # ~20 min, 2 cores
    python benchmarks/cpu.py --model testbed --data ... --prompts 16 --new 64 --dtypes bfloat16  # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

import torch

from ssb.config import DatasetConfig, DistillConfig, ModelConfig
from ssb.data import load_problems
from ssb.engine import SamplingParams
from ssb.engine.transformers_engine import Scheduler, TransformersEngine
from ssb.grading import extract_answer, grade
from ssb.chunked_losses import chunked_distill_loss
from ssb.models import load_model, load_tokenizer, lora_config, native_cpu_bf16, render_chat, stop_token_ids
from ssb.prompts import student_messages
from ssb.provenance import machine


def vm(key: str = "VmHWM") -> float:
    """GB of this process's resident memory (VmHWM: peak so far; VmRSS: now)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1e6
    return float("nan")


def gemm_tflops(dtype: torch.dtype, rows: int, k: int = 896, n: int = 4864) -> float:
    a, w = torch.randn(rows, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    for _ in range(3):
        torch.nn.functional.linear(a, w)
    reps = max(3, int(1e10 / (2 * rows * k * n)))
    t = time.perf_counter()
    for _ in range(reps):
        torch.nn.functional.linear(a, w)
    return 2 * rows * k * n * reps / (time.perf_counter() - t) / 1e12


def generate(engine, prompts, params) -> tuple[list, float]:
    t = time.perf_counter()
    out = engine.generate(prompts, params, seed=0)
    return out, time.perf_counter() - t


def step_profile(engine, prompts, new: int) -> tuple[float, float]:
    """(seconds per decode step of a full batch, matrix products' share of it)."""
    from torch.profiler import profile

    with torch.inference_mode():
        s = Scheduler(engine, prompts, SamplingParams(1, 0.0, 0, 1.0, new + 8), 0)
        s._admit()
        for _ in range(2):
            s._housekeep()
            s.step()
        with profile() as prof:
            t = time.perf_counter()
            for _ in range(3):
                s._housekeep()
                s.step()
            dt = (time.perf_counter() - t) / 3
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    mm = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    return dt, mm / max(total, 1)


def distill_step(model, tok, prompts, replies, steps: int = 2) -> float:
    """Seconds per optimizer-free distill step (forward + backward) of batch 4: the student (LoRA) on the bare prompt,
    the teacher (adapter off) on the same prompt + reply (a stand-in for the hinted one, same lengths)."""
    from peft import get_peft_model

    dc = DistillConfig()
    peft = get_peft_model(model, lora_config(dc))
    decoder, head = peft.get_base_model().model, peft.get_base_model().get_output_embeddings()
    seqs = [p + r for p, r in zip(prompts, replies)][:4]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    pos = mask.bool() & (torch.arange(width)[None] >= torch.tensor([len(p) for p in prompts[:4]])[:, None])
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        with torch.no_grad(), peft.disable_adapter():
            teacher = decoder(input_ids=ids, attention_mask=mask).last_hidden_state[pos]
        student = decoder(input_ids=ids, attention_mask=mask).last_hidden_state[pos]
        loss = chunked_distill_loss(student, teacher, head.weight, temperature=2.0) / pos.sum()
        loss.backward()
        peft.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    peft.unload()
    return sum(times[1:]) / steps, int(pos.sum()), int(mask.sum())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="testbed", help="directory holding model.gguf (fetch.sh DIR)")
    ap.add_argument("--gguf", default="model.gguf")
    ap.add_argument("--data", default="../shared/data", help="data directory (GSM8K test)")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--new", type=int, default=256, help="new tokens per reply (greedy replies stop earlier)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--hf-prompts", type=int, default=2, help="prompts for one-at-a-time model.generate (bf16)")
    args = ap.parse_args()
    rows = load_problems(DatasetConfig(name="gsm8k", split="test", limit=args.prompts), args.data)
    print(f"# {datetime.date.today()} {machine()} native bf16: {native_cpu_bf16()}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {platform.node()}")
    answers = {}
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        rates = {r: gemm_tflops(dtype, r) for r in (16, 64, 256)}
        cfg = ModelConfig(name_or_path=args.model, gguf_file=args.gguf, dtype=name, device="cpu")
        tok, model = load_tokenizer(cfg), load_model(cfg)
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        params = sum(p.numel() for p in model.parameters()) - (0 if emb is head else emb.numel())  # multiplied
        limit = rates[256] * 1e12 / (2 * params)
        prompts = [render_chat(tok, student_messages(r.question)) for r in rows]
        engine = TransformersEngine(model, tok, stop_token_ids(tok, model), max_batch_size=256)
        print(f"\n## {name}: GEMM {', '.join(f'{r} rows {v:.2f}' for r, v in rates.items())} TFLOPS; "
              f"{params / 1e6:.0f}M parameters -> limit {limit:.0f} tok/s")
        out, dt = generate(engine, prompts, SamplingParams(1, 0.0, 0, 1.0, args.new))
        n = sum(len(s[0].token_ids) for s in out)
        print(f"greedy  {len(prompts)} prompts: {n} tokens in {dt:.1f} s = {n / dt:.1f} tok/s "
              f"({100 * n / dt / limit:.0f}% of the limit), prefill included; peak RSS {vm():.1f} GB")
        answers[name] = [extract_answer(s[0].text) for s in out]
        answers[name + "_correct"] = [grade(s[0].text, r.answer, r.grader) for s, r in zip(out, rows)]
        correct = sum(grade(s[0].text, r.answer, r.grader) for s, r in zip(out, rows))
        print(f"        accuracy {correct}/{len(rows)}; truncated {sum(s[0].finish_reason == 'length' for s in out)}")
        sampled, dt2 = generate(engine, prompts, SamplingParams(1, 0.8, 50, 1.0, args.new))
        n2 = sum(len(s[0].token_ids) for s in sampled)
        print(f"sampled T=0.8 top-k 50: {n2} tokens in {dt2:.1f} s = {n2 / dt2:.1f} tok/s "
              f"({100 * n2 / dt2 / limit:.0f}% of the limit); sampled/greedy rate {n2 / dt2 / (n / dt):.2f}")
        step, mm = step_profile(engine, prompts, args.new)
        print(f"decode step, {len(prompts)} rows: {1000 * step:.0f} ms = {len(prompts) / step:.0f} tok/s "
              f"({100 * len(prompts) / step / limit:.0f}% of the limit); matrix products {100 * mm:.0f}% of it")
        del engine
        model.train()
        dt3, targets, tokens = distill_step(model, tok, prompts, [s[0].token_ids for s in out])
        flops = 2 * params * (3 * tokens + tokens)
        print(f"distill step (batch 4, {tokens} tokens, {targets} targets): {dt3:.1f} s = "
              f"{flops / dt3 / 1e12:.3f} TFLOPS ({100 * flops / dt3 / 1e12 / rates[256]:.0f}% of the GEMM rate); "
              f"peak RSS {vm():.1f} GB")
        if name == "bfloat16" and args.hf_prompts:
            hf_generate(model, tok, prompts, args)
        del model
    if "float32" in answers and "bfloat16" in answers:
        a, b = answers["float32"], answers["bfloat16"]
        same = sum(x == y for x, y in zip(a, b))
        print(f"\ngreedy bf16 vs fp32: same final answer on {same}/{len(a)} problems; correct: fp32 "
              f"{sum(answers['float32_correct'])}, bf16 {sum(answers['bfloat16_correct'])}")


@torch.inference_mode()
def hf_generate(model, tok, prompts, args):
    model.eval()
    n, t = 0, time.perf_counter()
    for p in prompts[: args.hf_prompts]:
        out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=args.new, do_sample=False, pad_token_id=tok.pad_token_id)
        n += out.shape[1] - len(p)
    one = n / (time.perf_counter() - t)
    batch = prompts[:64]
    width = max(map(len, batch))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    t = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=args.new, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=stop_token_ids(tok, model))
    gen = out[:, width:]
    stops = torch.tensor(stop_token_ids(tok, model))
    lengths = [int(next((k + 1 for k, x in enumerate(row.tolist()) if x in stops.tolist()), len(row))) for row in gen]
    padded = sum(lengths) / (time.perf_counter() - t)
    print(f"model.generate bf16: one at a time {one:.1f} tok/s; padded batch of {len(batch)} {padded:.1f} tok/s")


if __name__ == "__main__":
    main()
