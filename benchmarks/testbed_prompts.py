"""The opening the CPU engine benchmarks share (eval_calls.py, kv_windows.py, prefill_budget.py): the testbed's engine
under configs/testbed-cpu.yaml and the chat prompts of the first GSM8K test problems, rendered as evaluate renders
them. Benchmarks run as scripts from the repository root, so this module is imported by its plain name."""

from __future__ import annotations

from ssb.config import DatasetConfig
from ssb.configio import load_config
from ssb.data import load_problems
from ssb.engine.factory import make_engine
from ssb.models import render_chat
from ssb.prompts import student_messages


def engine_and_prompts(model: str, data: str, problems: int, *overrides: str) -> tuple:
    """(the engine of ``model`` with ``overrides`` on configs/testbed-cpu.yaml, the first ``problems`` GSM8K test
    prompts)."""
    cfg = load_config("configs/testbed-cpu.yaml", [f"model.name_or_path={model}", *overrides])
    eng = make_engine(cfg.model, None, cfg.engine)
    probs = load_problems(DatasetConfig(name="gsm8k", split="test", limit=problems), data)
    return eng, [render_chat(eng.tokenizer, student_messages(p.question)) for p in probs]
