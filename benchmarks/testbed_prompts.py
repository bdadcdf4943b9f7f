"""The opening the testbed benchmarks share. For the CPU engine's (eval_calls.py, kv_windows.py, prefill_budget.py):
the testbed's engine under configs/testbed-cpu.yaml and the chat prompts of the first GSM8K test problems, rendered
as evaluate renders them. For the LoRA policy's (merged_sampling.py, merged_precision.py): the testbed with the
testbed config's LoRA attached, its arguments, and GSM8K train prompts. Benchmarks run as scripts from the
repository root, so this module is imported by its plain name."""

from __future__ import annotations

import argparse
import datetime

import torch

from ssb.config import DatasetConfig, DistillConfig, ModelConfig
from ssb.configio import load_config
from ssb.data import load_problems
from ssb.engine.factory import make_engine
from ssb.models import load_model, load_tokenizer, lora_config, native_cpu_bf16, render_chat
from ssb.prompts import student_messages
from ssb.provenance import machine


def engine_and_prompts(model: str, data: str, problems: int, *overrides: str) -> tuple:
    """(the engine of ``model`` with ``overrides`` on configs/testbed-cpu.yaml, the first ``problems`` GSM8K test
    prompts)."""
    cfg = load_config("configs/testbed-cpu.yaml", [f"model.name_or_path={model}", *overrides])
    eng = make_engine(cfg.model, None, cfg.engine)
    probs = load_problems(DatasetConfig(name="gsm8k", split="test", limit=problems), data)
    return eng, [render_chat(eng.tokenizer, student_messages(p.question)) for p in probs]


def policy_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments of a LoRA-policy benchmark: --model, --gguf, --data (add the benchmark's own)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--model", default="testbed", help="directory holding model.gguf (fetch.sh DIR)")
    ap.add_argument("--gguf", default="model.gguf")
    ap.add_argument("--data", default="../shared/data", help="data directory (GSM8K train)")
    return ap


def testbed_policy(args, note: str = "") -> tuple:
    """(tokenizer, base model, the peft policy: base + the testbed config's LoRA, B still zero), after printing the
    machine, its native bf16 and torch's threads (and ``note``)."""
    from peft import get_peft_model

    print(f"# {datetime.date.today()} {machine()} native bf16: {native_cpu_bf16()}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads{note}")
    cfg = ModelConfig(name_or_path=args.model, gguf_file=args.gguf, device="cpu")
    tok, base = load_tokenizer(cfg), load_model(cfg)
    print(f"# model dtype {base.dtype}")
    return tok, base, get_peft_model(base, lora_config(DistillConfig()))


def train_prompts(tok, data: str, problems: int) -> tuple[list, list[list[int]]]:
    """(the first ``problems`` GSM8K train problems, their student chat prompts)."""
    rows = load_problems(DatasetConfig(name="gsm8k", split="train", limit=problems), data)
    return rows, [render_chat(tok, student_messages(r.question)) for r in rows]
