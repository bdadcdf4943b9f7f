"""What a user takes away from a run (``ssb export``): the trained model as a standalone Hugging Face directory with
its model card, and the curated data set with its dataset card.

- :func:`export_model`: the run's adapter (``distill/adapter``, else ``grpo/adapter``: SSB, SFT, RFT, on-policy or
  GRPO) merged into the base weights and saved with ``save_pretrained`` (safetensors), with the tokenizer and its
  chat template, a ``generation_config.json`` holding the evaluation's settings, and ``README.md``: the hub's
  metadata header (base model, license, datasets, tags) and what was trained, how, on how many examples, with the
  run's evaluation table against base (paired 95% CI, wins / losses). ``adapter_only`` keeps the adapter (peft's
  ``adapter_model.safetensors``) instead of merging. A GGUF base model is merged in its dequantised form (in the
  dtype the run resolved), which the card says.
- :func:`export_dataset`: ``teach/examples.jsonl`` (the teacher-verified examples) joined with the curated pairs
  (the correct and incorrect attempts the teacher saw) as Parquet under ``data/`` with a dataset card whose header
  declares the files, so ``datasets.load_dataset(DIR)`` loads it.

Both write into a temporary sibling of ``out`` and rename it at the end, so an interrupted export leaves no half
directory; an ``out`` that exists and is not empty is refused. The cards are built by pure functions
(:func:`model_card`, :func:`dataset_card`) of the run's records.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

from ssb.atomic import publishing
from ssb.config import Config
from ssb.errors import SsbError
from ssb.prompts import SYSTEM_PROMPT
from ssb.report import load_run, paired_rows, pct
from ssb.rows import read_json, read_rows
from ssb.rundir import MANIFEST

# hub ids of the data sets ssb knows by name (model and dataset cards' ``datasets:``)
HUB_DATASETS = {"gsm8k": "openai/gsm8k", "math500": "HuggingFaceH4/MATH-500", "aime24": "HuggingFaceH4/aime_2024",
                "aime25": "math-ai/aime25", "amc23": "math-ai/amc23"}
LICENSES = {"gsm8k": "mit", "math500": "mit"}  # of the source data sets, for the dataset card
TAGS = ["ssb", "semantic-soft-bootstrapping", "math", "reasoning", "lora"]


def method(cfg: Config, run_dir: Path) -> tuple[str, str]:
    """(short name, one sentence) of what trained this run's adapter, read off its config and finished stages."""
    dc = cfg.distill
    if (run_dir / "grpo" / MANIFEST).exists() and not (run_dir / "distill" / MANIFEST).exists():
        return "GRPO", "GRPO (TRL) with LoRA on the training problems, rewarded by answer correctness."
    if dc.targets == "rollouts":
        return "RFT", "rejection-sampling fine-tuning: cross-entropy on the model's own correct rollouts."
    if dc.targets == "on_policy":
        return "on-policy SSB", (f"on-policy distillation: the student samples its own replies and the hinted "
                                 f"teacher (hint: {dc.hint}) scores them (forward KL at T={dc.temperature}).")
    if dc.kd_weight == 0:
        return "SFT", "supervised fine-tuning (cross-entropy) on the teacher-verified solutions."
    return "SSB", (f"Semantic Soft Bootstrapping: the same base model, shown the problem with a correct and an "
                   f"incorrect attempt, wrote a clean solution; the student (question only) was trained to match "
                   f"that hinted teacher's next-token distribution over it ({dc.loss}, T={dc.temperature}"
                   f"{', x T^2' if dc.scale_t2 else ''}{f', + {dc.ce_weight} CE' if dc.ce_weight else ''}).")


def _hub_datasets(cfg: Config) -> list[str]:
    names = [cfg.rollout.data.name] + [b.name for b in cfg.evaluate.benchmarks]
    return list(dict.fromkeys(HUB_DATASETS.get(n, n) for n in names if n in HUB_DATASETS or n.count("/") == 1))


def _yaml_header(fields: dict) -> str:
    import yaml

    return "---\n" + yaml.safe_dump({k: v for k, v in fields.items() if v not in (None, [], "")}, sort_keys=False,
                                    allow_unicode=True) + "---\n"


def _split(cfg: Config) -> str:
    return f" ({cfg.rollout.data.split})" if cfg.rollout.data.split else ""


def evaluation_rows(run_dir: Path, base_dir: Path | None) -> list[dict]:
    """Per benchmark this run evaluated: its accuracy (95% CI), and against ``base_dir``'s evaluation of the same
    benchmark (when there is one) the paired difference with its 95% bootstrap CI and wins / losses
    (:func:`ssb.report.paired_rows`)."""
    run = load_run(run_dir, "run")
    base = load_run(base_dir, "base") if base_dir is not None else None
    paired = {p["benchmark"]: p for p in (paired_rows([run, base], base)[0] if base is not None else [])}
    out = []
    for name, bench in sorted(run.benches.items()):
        m = bench.metrics
        row = {"benchmark": name, "problems": m.get("problems"), "accuracy": m.get("accuracy"),
               "ci95": m.get("accuracy_ci95"), "truncated": m.get("truncated_fraction"), "model": bench.adapter}
        if name in paired and base is not None:
            p = paired[name]
            row.update(base_accuracy=base.benches[name].metrics.get("accuracy"), diff=p["diff"], diff_ci95=p["ci95"],
                       wins=p["run_wins"], losses=p["run_losses"], paired_n=p["n"])
        out.append(row)
    return out


def model_card(*, cfg: Config, name: str, sentence: str, base_model: str, license: str, examples: int | None,
               steps: int | None, evaluation: list[dict], dtype: str, gguf: bool, adapter_only: bool,
               skipped_steps: int = 0) -> str:
    """The model card (``README.md``): hub metadata header, then what was trained, how, and how it scored."""
    dc = cfg.distill
    header = {"base_model": base_model if base_model.count("/") == 1 and not base_model.startswith((".", "/"))
              else None, "license": license,
              "library_name": "peft" if adapter_only else "transformers", "pipeline_tag": "text-generation",
              "datasets": _hub_datasets(cfg), "tags": list(dict.fromkeys(TAGS + [name.lower().replace(" ", "-")]))}
    what = "A LoRA adapter" if adapter_only else "The base model with a LoRA adapter merged into its weights"
    lines = [_yaml_header(header), f"# {Path(base_model).name} + {name} (ssb)", "",
             f"{what}, trained with ssb by {sentence}", "",
             f"- **Base model:** `{base_model}`" + (f" (GGUF `{cfg.model.gguf_file}`, dequantised to {dtype} before "
                                                   "merging: these weights are the dequantised model, not the "
                                                   "quantised file)" if gguf else f" ({dtype})"),
             f"- **Training data:** {examples if examples is not None else '?'} examples from "
             f"`{cfg.rollout.data.name}`{_split(cfg)}"
             + (f"; {steps} optimizer steps" if steps is not None else "")
             + (f", {skipped_steps} skipped (non-finite gradient)" if skipped_steps else ""),
             f"- **LoRA:** r={dc.lora_r}, alpha={dc.lora_alpha}, dropout={dc.lora_dropout}, "
             f"targets `{dc.target_modules}`",
             f"- **Optimisation:** lr {dc.lr}, batch {dc.batch_size}, {dc.epochs} epochs, {dc.schedule} schedule"
             if name != "GRPO" else f"- **GRPO:** {cfg.grpo.steps} steps, batch {cfg.grpo.batch_size} x "
             f"{cfg.grpo.num_generations} completions, lr {cfg.grpo.lr}",
             f"- **Prompt:** the chat template with ssb's system prompt (ask for the final answer in `\\boxed{{}}`); "
             f"the evaluation decoded at temperature {cfg.evaluate.temperature} with up to "
             f"{cfg.evaluate.max_new_tokens} new tokens (`generation_config.json`)", "", "## Evaluation", ""]
    if not evaluation:
        lines.append("This run was not evaluated.")
    else:
        lines += ["Pass@1 (%), 95% CI; against the base model evaluated the same way, the paired difference "
                  "(percentage points, 95% paired bootstrap CI) and the problems this model gets right that base "
                  "does not (wins) and the reverse (losses).", "",
                  "| benchmark | problems | this model | base | difference | wins / losses | truncated |",
                  "|---|---|---|---|---|---|---|"]
        for r in evaluation:
            ci = f" [{pct(r['ci95'][0])}, {pct(r['ci95'][1])}]" if r.get("ci95") else ""
            diff = (f"{100 * r['diff']:+.1f} [{100 * r['diff_ci95'][0]:+.1f}, {100 * r['diff_ci95'][1]:+.1f}]"
                    if "diff" in r else "–")
            wl = f"{r['wins']} / {r['losses']}" if "wins" in r else "–"
            lines.append(f"| {r['benchmark']} | {r['problems']} | {pct(r['accuracy'])}{ci} | "
                         f"{pct(r.get('base_accuracy'))} | {diff} | {wl} | {pct(r.get('truncated'))} |")
        if not any("diff" in r for r in evaluation):
            lines += ["", "No base-model evaluation was found beside this run (`--base DIR`), so no paired "
                      "difference is given."]
    usage = ("from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
             f"base = AutoModelForCausalLM.from_pretrained(\"{base_model}\")\n"
             "model = PeftModel.from_pretrained(base, \"THIS_DIR\")\ntokenizer = AutoTokenizer.from_pretrained("
             "\"THIS_DIR\")" if adapter_only else
             "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
             "model = AutoModelForCausalLM.from_pretrained(\"THIS_DIR\")\n"
             "tokenizer = AutoTokenizer.from_pretrained(\"THIS_DIR\")")
    lines += ["", "## Use", "", "```python", usage, "```", "",
              "Prompt it through the tokenizer's chat template with the system prompt it was trained and evaluated "
              "with, and the problem as the user turn:", "", "```text", SYSTEM_PROMPT, "```", "",
              "The run's whole configuration is in `ssb_config.yaml`.", ""]
    return "\n".join(lines)


def dataset_card(*, cfg: Config, rows: int, license: str, model: str, acceptance: float | None) -> str:
    """The dataset card (``README.md``) of :func:`export_dataset`."""
    header = {"license": license, "task_categories": ["text-generation", "question-answering"], "language": ["en"],
              "tags": TAGS[:4] + ["distillation"], "size_categories": ["n<1K" if rows < 1000 else "1K<n<10K"],
              "source_datasets": _hub_datasets(cfg)[:1],
              "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}]}
    acc = f" ({100 * acceptance:.1f}% of the teacher's replies were accepted)" if acceptance is not None else ""
    return "\n".join([
        _yaml_header(header), "# SSB teacher-verified solutions", "",
        f"{rows} problems from `{cfg.rollout.data.name}`{_split(cfg)} curated by ssb's Semantic Soft "
        f"Bootstrapping pipeline with `{model}`: the model answered each problem {cfg.rollout.samples} times "
        f"(T={cfg.rollout.temperature}, top-k {cfg.rollout.top_k}); problems with a correct and an incorrect answer "
        f"were kept, with one correct attempt and one attempt giving the most common wrong answer; the same model, "
        f"shown both, wrote a standalone solution (T={cfg.teach.temperature}, prompt `{cfg.teach.prompt}`), kept "
        f"only when it finished and graded correct{acc}.", "",
        "| column | |", "|---|---|",
        "| `id` | the problem's id in its source data set |",
        "| `question` | the problem |",
        "| `answer` | the gold final answer |",
        "| `correct_attempt` / `correct_answer` | the model's correct attempt and its answer |",
        "| `incorrect_attempt` / `incorrect_answer` | the attempt with the most common wrong answer, and that answer |",
        "| `solution` | the teacher's verified solution (the distillation target) |",
        "| `teacher_attempt` | which teacher sample was accepted (0 = the first) |", "",
        "```python\nimport datasets\n\nds = datasets.load_dataset(\"THIS_DIR\", split=\"train\")\n```", ""])


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """The export is built in a temp directory that becomes ``out`` when it is complete (:func:`ssb.atomic.publishing`:
    a failed export leaves nothing behind); ``out`` must be missing or empty."""
    _check_out(out)
    with publishing(out) as tmp:
        yield tmp


def _check_out(out) -> None:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SsbError(f"--out {out} exists and is not empty; choose another directory or remove it")


def _find_base(run_dir: Path, base_dir: str | Path | None) -> Path | None:
    if base_dir is not None:
        if not Path(base_dir).is_dir():
            raise SsbError(f"--base {base_dir}: not a directory")
        return Path(base_dir)
    sibling = run_dir.resolve().parent / "base"  # ssb compare's layout: ROOT/base beside ROOT/ssb, ROOT/grpo, ...
    return sibling if (sibling / "evaluate").is_dir() and sibling.resolve() != run_dir.resolve() else None


def _generation_config(cfg: Config, tokenizer, model):
    from transformers import GenerationConfig

    from ssb.models import stop_token_ids

    ev = cfg.evaluate
    kw = {"do_sample": ev.temperature > 0, "max_new_tokens": ev.max_new_tokens,
          "eos_token_id": stop_token_ids(tokenizer, model), "pad_token_id": tokenizer.pad_token_id}
    if ev.temperature > 0:
        kw.update(temperature=ev.temperature, top_k=ev.top_k or None, top_p=ev.top_p)
    return GenerationConfig(**kw)


def export_model(cfg: Config, run_dir, out, adapter_only: bool = False, base_dir=None, base_model: str | None = None,
                 license: str = "other") -> Path:
    """Export ``run_dir``'s trained model into ``out`` (see the module docstring); returns ``out``."""
    import torch

    from ssb.stages.evaluate import resolve_adapter
    from ssb.models import dtype_name, load_model, load_tokenizer, resolve_dtype
    from ssb.configio import dump_yaml

    run_dir = Path(run_dir)
    adapter, _ = resolve_adapter(replace(cfg, evaluate=replace(cfg.evaluate, adapter="auto")), run_dir)
    if adapter is None:
        raise SsbError(f"{run_dir} has no trained adapter (neither distill/ nor grpo/ finished): nothing to export")
    if not (Path(adapter) / "adapter_config.json").exists():
        raise SsbError(f"{adapter} is missing (a restored run keeps no weights): rerun that stage, then export")
    name, sentence = method(cfg, run_dir)
    stage = "distill" if Path(adapter).parent.name == "distill" else "grpo"
    manifest = read_json(run_dir / stage / MANIFEST)
    counts = manifest.get("counts", {})
    device = torch.device("cpu")  # merging needs no accelerator; the dtype is the one `auto` resolves here
    cpu_model = replace(cfg.model, device="cpu")
    dtype = resolve_dtype(cpu_model, device)
    _check_out(out)
    tokenizer = load_tokenizer(cpu_model)
    if adapter_only:  # the adapter's files as they are; the base model's generation config, not its weights
        model = SimpleNamespace(generation_config=_base_generation_config(cpu_model))
    else:
        model = load_model(cpu_model, adapter=adapter, merge=True, device=device)
    with _staging(out) as tmp:
        if adapter_only:
            for f in Path(adapter).iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _generation_config(cfg, tokenizer, model).save_pretrained(tmp)
        (tmp / "ssb_config.yaml").write_text(dump_yaml(cfg))
        card = model_card(cfg=cfg, name=name, sentence=sentence, base_model=base_model or _base_name(cfg),
                          license=license, examples=counts.get("examples", counts.get("problems")),
                          steps=counts.get("steps"),
                          evaluation=evaluation_rows(run_dir, _find_base(run_dir, base_dir)),
                          dtype=dtype_name(dtype), gguf=bool(cfg.model.gguf_file), adapter_only=adapter_only,
                          skipped_steps=counts.get("skipped_steps", 0) or 0)
        (tmp / "README.md").write_text(card)
        (tmp / "ssb_export.json").write_text(json.dumps({"run_dir": str(run_dir.resolve()), "adapter": adapter,
                                                         "method": name, "merged": not adapter_only,
                                                         "dtype": dtype_name(dtype)}, indent=1) + "\n")
    return Path(out)


def _base_generation_config(model_cfg):
    """The base model's own generation config (its end-of-turn ids), read without loading weights; None if it has
    none."""
    from transformers import GenerationConfig

    from ssb.models import metadata_source

    path, kw = metadata_source(model_cfg)
    try:
        return GenerationConfig.from_pretrained(path, revision=kw.get("revision"))
    except (OSError, ValueError):
        return None


def _base_name(cfg: Config) -> str:
    m = cfg.model
    return f"{m.name_or_path}/{m.gguf_file}" if m.gguf_file else str(m.name_or_path)


def dataset_rows(run_dir: Path) -> list[dict]:
    """The teacher-verified examples joined with their curated pairs, one flat row each (pure given the files)."""
    examples = read_rows(run_dir / "teach" / "examples.jsonl")
    if not (run_dir / "teach" / MANIFEST).exists() or not examples:
        raise SsbError(f"{run_dir} has no finished teach stage with examples (teach/examples.jsonl): no curated "
                       f"data set to export")
    pairs = {p["id"]: p for p in read_rows(run_dir / "curate" / "pairs.jsonl")}
    out = []
    for e in examples:
        p = pairs.get(e["id"], {})
        out.append({"id": str(e["id"]), "question": e["question"], "answer": str(e["answer"]),
                    "correct_attempt": p.get("correct"), "correct_answer": _str(p.get("correct_answer")),
                    "incorrect_attempt": p.get("incorrect"), "incorrect_answer": _str(p.get("incorrect_answer")),
                    "solution": e["reply_text"], "teacher_attempt": int(e.get("attempt", 0))})
    return out


def _str(x) -> str | None:
    return None if x is None else str(x)


def export_dataset(cfg: Config, run_dir, out, license: str | None = None) -> Path:
    """Export ``run_dir``'s curated, teacher-verified examples into ``out`` (Parquet + dataset card); ``license``
    defaults to the source data set's (GSM8K, MATH: MIT), else ``other``."""
    import datasets

    license = license or LICENSES.get(cfg.rollout.data.name, "other")
    run_dir = Path(run_dir)
    rows = dataset_rows(run_dir)
    teach = read_json(run_dir / "teach" / MANIFEST)
    with _staging(out) as tmp:
        (tmp / "data").mkdir()
        datasets.Dataset.from_list(rows).to_parquet(str(tmp / "data" / "train-00000-of-00001.parquet"))
        (tmp / "README.md").write_text(dataset_card(cfg=cfg, rows=len(rows), license=license, model=_base_name(cfg),
                                                    acceptance=teach.get("acceptance")))
    return Path(out)
