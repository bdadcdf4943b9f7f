"""`ssb grpo` generators on a device: does each run, does a resume reproduce the uninterrupted adapter, how fast is
each generator, and does transformers' ``generate_batch`` (the ``paged`` generator) return results in input order
(TRL 1.16 reads ``all_outputs.values()``)?

1. every generator (ssb, generate, paged) trains 2 steps of the tiny model (``ssb.tiny``, built if absent);
2. ssb and generate: 3 steps with a checkpoint per step, killed at step 2 (after its log row, before its
   checkpoint) and rerun; prints the log steps, counters and whether the adapter equals an uninterrupted run's;
3. generate_batch greedy vs per-prompt ``generate`` greedy on prompts of different lengths;
4. timing: a random-init Qwen2 (~0.3B at --scale 1; its replies run to --new-tokens) trains 3 steps of 8 prompts x
   8 completions with each generator; prints seconds spent generating per step (``GRPOTrainer._generate``), step
   times and peak memory.

    PYTHONPATH=src python benchmarks/grpo_generators.py --device cuda
    PYTHONPATH=src python benchmarks/grpo_generators.py --device cpu --scale 4 --new-tokens 16   # a quick CPU pass
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import transformers

from ssb.stages import grpo
from ssb.configio import load_config
from ssb.rows import read_rows

GENERATORS = ("ssb", "generate", "paged")


class Interrupt(Exception):
    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", help="directory of the tiny model (default: ssb.tiny.ensure_tiny_model())")
    ap.add_argument("--scale", type=int, default=1, help="divide the timing model's width and depth by this")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: run,resume,order,timing")
    a = ap.parse_args()
    skip = set(a.skip.split(","))
    import peft
    import trl

    print("versions: torch", torch.__version__, "transformers", transformers.__version__, "trl", trl.__version__,
          "peft", peft.__version__, flush=True)
    if a.tiny:
        tiny = Path(a.tiny).resolve()
    else:
        from ssb.tiny import ensure_tiny_model

        tiny = ensure_tiny_model()
    tmp = Path(tempfile.mkdtemp())
    cuda = a.device.startswith("cuda")
    gen_seconds: list[float] = []
    original = trl.GRPOTrainer._generate

    def timed(self, prompts):
        if cuda:
            torch.cuda.synchronize()
        t = time.time()
        out = original(self, prompts)
        if cuda:
            torch.cuda.synchronize()
        gen_seconds.append(round(time.time() - t, 3))
        return out

    trl.GRPOTrainer._generate = timed

    def ov(model, *extra):
        return [f"model.name_or_path={model}", f"model.device={a.device}", "rollout.data={name: arith, limit: 16}",
                "grpo.batch_size=2", "grpo.num_generations=4", "grpo.micro_batch_size=8", "grpo.max_new_tokens=24",
                "grpo.lr=1e-2", "grpo.schedule=constant", *extra]

    def show(m):
        keys = ("stopped_by", "gpus", "wall_seconds", "device_seconds", "gpu_seconds", "generated_tokens",
                "train_seconds", "resumed_from_step")
        return {k: m.get(k) for k in keys} | {"steps": m["counts"]["steps"]}

    def adapter(run_dir):
        from safetensors.torch import load_file

        return load_file(str(run_dir / "grpo" / "adapter" / "adapter_model.safetensors"))

    if "run" not in skip:
        for gen in GENERATORS:
            try:
                m = grpo.run(load_config(None, ov(tiny, "grpo.steps=2", f"grpo.generator={gen}")), tmp / f"run-{gen}")
                log = read_rows(tmp / f"run-{gen}" / "grpo" / "train_log.jsonl")
                print("run", gen, "OK", show(m), "reward", [round(r["reward"], 3) for r in log], flush=True)
            except Exception:
                print("run", gen, "FAILED", flush=True)
                traceback.print_exc()

    if "resume" not in skip:
        from transformers import TrainerCallback

        class Kill(TrainerCallback):
            def on_log(self, args, state, control, **kwargs):
                if state.global_step == 2:
                    raise Interrupt

        for gen in ("ssb", "generate"):
            try:
                extra = ("grpo.steps=3", "grpo.save_every=1", f"grpo.generator={gen}")
                grpo.run(load_config(None, ov(tiny, *extra)), tmp / f"whole-{gen}")
                try:
                    grpo.run(load_config(None, ov(tiny, *extra)), tmp / f"cut-{gen}", callbacks=[Kill()])
                except Interrupt:
                    pass
                m = grpo.run(load_config(None, ov(tiny, *extra)), tmp / f"cut-{gen}")
                x, y = adapter(tmp / f"whole-{gen}"), adapter(tmp / f"cut-{gen}")
                steps = [r["step"] for r in read_rows(tmp / f"cut-{gen}" / "grpo" / "train_log.jsonl")]
                print("resume", gen, "log steps", steps, show(m), "adapter equal:",
                      all(torch.equal(x[k], y[k]) for k in x),
                      "max diff", max((x[k].float() - y[k].float()).abs().max().item() for k in x), flush=True)
            except Exception:
                print("resume", gen, "FAILED", flush=True)
                traceback.print_exc()

    if "order" not in skip:
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

            tok = AutoTokenizer.from_pretrained(tiny)
            model = AutoModelForCausalLM.from_pretrained(tiny).to(a.device).eval()
            prompts = [tok(tok.apply_chat_template([{"role": "user", "content": f"{x} + {y} = ?"}],
                                                   add_generation_prompt=True, tokenize=False),
                           add_special_tokens=False)["input_ids"] for x, y in [(1, 2), (3, 4), (5, 1), (2, 2), (7, 1)]]
            prompts = [p[: len(p) - i % 3] for i, p in enumerate(prompts)]  # different lengths
            g = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
            got = [list(o.generated_tokens)
                   for o in model.generate_batch(prompts, generation_config=g, progress_bar=False).values()]
            ref = [model.generate(torch.tensor([p], device=a.device), generation_config=g)[0, len(p):].tolist()
                   for p in prompts]
            print("order: generate_batch results in input order:",
                  all(x[: len(y)] == y[: len(x)] for x, y in zip(got, ref)), flush=True)
        except Exception:
            print("order FAILED", flush=True)
            traceback.print_exc()

    if "timing" not in skip:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        cfg = AutoConfig.from_pretrained(tiny)
        s = a.scale
        cfg.update(dict(hidden_size=1024 // s, intermediate_size=2816 // s, num_hidden_layers=16 // s,
                        num_attention_heads=16 // s, num_key_value_heads=max(1, 4 // s), head_dim=64))
        cfg.layer_types = ["full_attention"] * cfg.num_hidden_layers
        torch.manual_seed(0)
        big = tmp / "random-qwen2"
        AutoModelForCausalLM.from_config(cfg).save_pretrained(big)
        AutoTokenizer.from_pretrained(tiny).save_pretrained(big)
        for gen in GENERATORS:
            gen_seconds.clear()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            try:
                m = grpo.run(load_config(None, ov(big, "grpo.steps=3", f"grpo.generator={gen}", "grpo.batch_size=8",
                                                  "grpo.num_generations=8", "grpo.micro_batch_size=16",
                                                  f"grpo.max_new_tokens={a.new_tokens}",
                                                  "rollout.data={name: arith, limit: 64}")), tmp / f"timing-{gen}")
                log = read_rows(tmp / f"timing-{gen}" / "grpo" / "train_log.jsonl")
                print("timing", gen, show(m), "generate s/step", gen_seconds,
                      "step s", [round(r.get("step_time", float("nan")), 3) for r in log],
                      "mean length", [r["completion_length"] for r in log],
                      "peak GiB", round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else "-", flush=True)
            except Exception:
                print("timing", gen, "FAILED", flush=True)
                traceback.print_exc()


if __name__ == "__main__":
    sys.exit(main())
