"""Stage 5, evaluate: generate on benchmarks with the base model or base + adapter, grade, and summarise.

Each benchmark gets ``evaluate/<label>/`` with ``samples.jsonl`` (one row per problem: ``{"id", "question",
"answer", "grader", "samples": [{"text", "answer", "correct", "strict_correct", "n_tokens", "finish_reason"}]}``,
appended per batch and resumable), ``metrics.json`` (see :func:`ssb.metrics.summarize`) and ``manifest.json``.
Prompts are the training ones: the same system prompt and chat template.
"""

from __future__ import annotations

import re
from pathlib import Path

from ssb import dist
from ssb.stages.generate import generate_rows
from ssb.config import Config, DatasetConfig
from ssb.reads import Reads, fingerprint
from ssb.data import load_problems
from ssb.engine import SamplingParams
from ssb.engine.factory import make_engine
from ssb.errors import SsbError
from ssb.grading import extract_answer, grade, grade_answer
from ssb.metrics import summarize
from ssb.models import render_chat
from ssb.prompts import student_messages
from ssb.rows import read_json, write_json
from ssb.rundir import MANIFEST, Stage, locking, verify_upstream
from ssb.stages import restore_weights

# The config fields this stage reads (ssb.reads.Reads). Each benchmark's fingerprint has its one benchmark and the
# resolved adapter (its fingerprint, or path) instead of the lists in evaluate.benchmarks and evaluate.adapter.
READS = Reads("evaluate", result=("model", "seed", "evaluate", "engine.backend"),
              how=("engine", "data_dir", "evaluate.benchmarks", "evaluate.adapter"))


def label(ds: DatasetConfig) -> str:
    """Directory name of a benchmark: its known name, or ``<parent>_<stem>`` for a file path."""
    p = Path(ds.name)
    base = f"{p.parent.name}_{p.stem}" if p.suffix in (".jsonl", ".json", ".parquet") else ds.name
    if ds.split and p.suffix == "":
        base += f"_{ds.split}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("_")


def resolve_adapter(cfg: Config, run_dir) -> tuple[str | None, str | None]:
    """(adapter path or None, its fingerprint) per ``evaluate.adapter``."""
    choice = cfg.evaluate.adapter
    if choice == "none":
        return None, None
    if choice == "auto":  # this run's distilled adapter, else its GRPO adapter, else the base model
        for stage in ("distill", "grpo"):
            m = Path(run_dir) / stage / MANIFEST
            if m.exists():
                return str(Path(run_dir) / stage / "adapter"), read_json(m)["fingerprint"]
        return None, None
    path = Path(choice)
    if not (path / "adapter_config.json").exists():
        raise SsbError(f"evaluate.adapter: not a peft adapter directory (no adapter_config.json): {path}")
    return str(path.resolve()), fingerprint(str(path.resolve()), (path / "adapter_config.json").read_text())


def stages_for(cfg: Config, run_dir, force: bool = False, adapter: tuple | None = None) -> list[tuple]:
    """``(benchmark, Stage)`` for every configured benchmark; ``adapter`` = (path, fingerprint) overrides
    :func:`resolve_adapter` (the command line's check of an adapter this command will make)."""
    adapter, adapter_fp = adapter or resolve_adapter(cfg, run_dir)
    values = READS.values(cfg)
    out = []
    for ds in cfg.evaluate.benchmarks:
        fp = READS.fingerprint(cfg, ds, adapter_fp, adapter if adapter_fp is None else "")
        out.append((ds, Stage(run_dir, f"evaluate/{label(ds)}", fp, {**values, "adapter": adapter, "dataset": ds},
                              force)))
    return out


def split_stages(cfg: Config, run_dir, up: tuple[str, str] | None, waves: bool) -> list[Stage]:
    """:meth:`ssb.stages.StageSpec.stages` of evaluate: one per benchmark, with the adapter of ``up`` (the stage
    whose adapter ``auto`` picks, and its fingerprint), or none."""
    adapter = (str(Path(run_dir) / up[0] / "adapter"), up[1]) if up else None
    return [stage for _, stage in stages_for(cfg, run_dir, adapter=adapter)]


@locking
def run(cfg: Config, run_dir, force: bool = False) -> dict:
    """Evaluate every configured benchmark; returns {label: metrics}."""
    whole, cfg = cfg, READS.view(cfg)
    adapter, adapter_fp = resolve_adapter(cfg, run_dir)
    ec = cfg.evaluate
    params = SamplingParams(ec.samples, ec.temperature, ec.top_k, ec.top_p, ec.max_new_tokens)
    engine = {}

    def engine_factory():
        if "e" not in engine:
            engine["e"] = make_engine(cfg.model, adapter, cfg.engine)
        return engine["e"]

    results, checked = {}, False
    stages = stages_for(cfg, run_dir, force, (adapter, adapter_fp))
    for _, stage in stages:
        stage.pause()  # each benchmark's clock runs from its turn on: not over the distill rerun or those before it
    for ds, stage in stages:
        name = label(ds)
        stage.discard_if_forced()
        if stage.is_done():
            results[name] = read_json(stage.path("metrics.json"))
            continue
        if not checked and cfg.evaluate.adapter == "auto" and adapter is not None:  # run_dir/<distill|grpo>/adapter
            restore_weights(whole, run_dir, Path(adapter).parent.name)
            verify_upstream(run_dir, Path(adapter).parent.name, "adapter/")
            checked = True
        stage.resume()
        problems = load_problems(ds, cfg.data_dir)

        def prompt_of(tokenizer, p):
            return render_chat(tokenizer, student_messages(p.question))

        def row_of(p, samples):
            out = []
            for s in samples:
                ans = extract_answer(s.text)
                out.append({"text": s.text, "answer": ans, "correct": grade_answer(ans, p.answer, p.grader),
                            "strict_correct": grade(s.text, p.answer, p.grader, strict=True),
                            "n_tokens": len(s.token_ids), "finish_reason": s.finish_reason})
            return {"id": p.id, "question": p.question, "answer": p.answer, "grader": p.grader, "samples": out}

        rows, stats = generate_rows(stage, "samples.jsonl", problems, prompt_of=prompt_of, row_of=row_of,
                                    engine_factory=engine_factory, params=params, seed=cfg.seed,
                                    batch_size=ec.batch_size, desc=f"evaluate {name}")
        metrics = {"benchmark": name, "adapter": adapter, **summarize(rows)}
        stage.begin()  # (already begun, unless there was nothing to generate)
        if dist.is_main():
            write_json(stage.path("metrics.json"), metrics)
        stage.finish({"problems": len(rows), "samples": metrics["samples"]}, metrics=metrics, **stats)
        results[name] = metrics
    return results
