"""``ssb report RUN_DIR [RUN_DIR ...] --out DIR``: compare run directories side by side.

Writes ``DIR/report.md`` and PNG plots next to it:

- one table row per (run, benchmark): accuracy with its 95% bootstrap CI, strict accuracy, pass@k / maj@k when
  there are several samples per problem, response length, truncation, and the adapter that was evaluated. Metrics
  are recomputed from ``evaluate/<bench>/samples.jsonl`` with :func:`ssb.metrics.summarize` (so runs evaluated by
  an older ssb get the same columns); ``metrics.json`` is the fallback when the samples are gone;
- the curation funnel per run (``curate/stats.json``, ``teach/manifest.json``) and the cost per run (every stage
  manifest's ``wall_seconds``, ``generated_tokens``, distill's ``trained_tokens``);
- ``accuracy.png`` (accuracy with CI error bars per benchmark, grouped by run), ``lengths.png`` (response-length
  box plots per run per benchmark), ``loss.png`` (training loss per step from ``distill/train_log.jsonl``),
  ``reward.png`` (mean training reward per step of a GRPO baseline run, ``grpo/train_log.jsonl``).

Anything a run lacks (a base-model run has only ``evaluate/``) is left out; a path that is not a run directory is
an :class:`~ssb.errors.SsbError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ssb.errors import SsbError
from ssb.metrics import summarize
from ssb.plots import plot_accuracy, plot_lengths, plot_loss, plot_reward
from ssb.rundir import MANIFEST, read_json, read_rows

STAGES = ("rollout", "curate", "teach", "distill", "evaluate", "grpo")  # grpo: the RL baseline (ssb grpo)


@dataclass
class Bench:
    metrics: dict
    tokens: list[int]
    adapter: str
    finished: bool


@dataclass
class Run:
    label: str
    path: Path
    benches: dict[str, Bench] = field(default_factory=dict)
    funnel: dict | None = None
    cost: dict | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    rewards: list[tuple[int, float]] = field(default_factory=list)


def _json(path: Path) -> dict | None:
    return read_json(path) if path.exists() else None


def _adapter_name(adapter: str | None, run_path: Path) -> str:
    if not adapter:
        return "base"
    try:
        return str(Path(adapter).resolve().relative_to(run_path.resolve()))
    except ValueError:
        return str(adapter)


def load_run(path: str | Path, label: str) -> Run:
    path = Path(path)
    if not path.is_dir() or not ((path / "config.yaml").exists() or any((path / s).is_dir() for s in STAGES)):
        raise SsbError(f"not a run directory: {path} (expected config.yaml or stage folders such as evaluate/)")
    run = Run(label, path)
    for d in sorted(p for p in (path / "evaluate").glob("*") if p.is_dir()):
        manifest, saved = _json(d / MANIFEST), _json(d / "metrics.json")
        rows = read_rows(d / "samples.jsonl")
        if not rows and saved is None:
            continue
        metrics = summarize(rows) if rows else saved
        adapter = (saved or {}).get("adapter") or ((manifest or {}).get("config") or {}).get("adapter")
        tokens = [s["n_tokens"] for r in rows for s in r["samples"]]
        run.benches[d.name] = Bench(metrics, tokens, _adapter_name(adapter, path), manifest is not None)
    stats, teach = _json(path / "curate" / "stats.json"), _json(path / "teach" / MANIFEST)
    if stats is not None or teach is not None:
        stats, counts = stats or {}, (teach or {}).get("counts", {})
        run.funnel = {"problems": stats.get("problems"), "with_answer": stats.get("with_answer"),
                      "pairs": stats.get("kept", counts.get("pairs")), "pairs_tried": counts.get("pairs_tried"),
                      "examples": counts.get("examples")}
    manifests = {s: _json(path / s / MANIFEST) for s in STAGES if s != "evaluate"}
    manifests.update({f"evaluate/{d.name}": _json(d / MANIFEST) for d in sorted((path / "evaluate").glob("*"))})
    manifests = {k: m for k, m in manifests.items() if m}
    if manifests:
        wall = {s: sum(m.get("wall_seconds", 0) for k, m in manifests.items() if k.split("/")[0] == s)
                for s in STAGES if any(k.split("/")[0] == s for k in manifests)}
        run.cost = {"wall": wall, "generated_tokens": sum(m.get("generated_tokens", 0) for m in manifests.values()),
                    "trained_tokens": (manifests.get("distill") or {}).get("counts", {}).get("trained_tokens")}
    log = read_rows(path / "distill" / "train_log.jsonl")
    run.losses = [(r["step"], r["loss"]) for r in log if "step" in r and "loss" in r]
    log = read_rows(path / "grpo" / "train_log.jsonl")
    run.rewards = [(r["step"], r["reward"]) for r in log if "step" in r and r.get("reward") is not None]
    return run


# ---- markdown ----

def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _acc(m: dict, prefix: str = "") -> str:
    ci = m.get(f"{prefix}accuracy_ci95")
    return _pct(m.get(f"{prefix}accuracy")) + (f" [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else "")


def _at_k(d: dict | None, skip_one: bool = False) -> str:
    items = [f"@{k} {_pct(v)}" for k, v in (d or {}).items() if not (skip_one and k == "1")]
    return " · ".join(items) or "–"


def _cell(x) -> str:
    return "–" if x is None else str(x).replace("|", "\\|")


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(_cell(c) for c in row) + " |" for row in rows), ""]


def _funnel_cell(n, total) -> str:
    return "–" if n is None else (f"{n} ({100 * n / total:.0f}%)" if total else str(n))


def render_markdown(runs: list[Run], plots: list[str]) -> str:
    out = ["# ssb report", "", "Runs: " + ", ".join(f"`{r.label}` ({r.path})" for r in runs), "", "## Evaluation", ""]
    rows = []
    for r in runs:
        for name, b in r.benches.items():
            m, multi = b.metrics, b.metrics.get("samples_per_problem", 1) > 1
            rows.append([r.label, name + ("" if b.finished else " (unfinished)"), b.adapter, m.get("problems"),
                         m.get("samples_per_problem", "–"), _acc(m), _acc(m, "strict_"),
                         _at_k(m.get("pass_at_k"), skip_one=True) if multi else "–",
                         _at_k(m.get("maj_at_k")) if multi else "–", f"{m.get('mean_response_tokens', 0):.1f}",
                         _pct(m.get("truncated_fraction")), _pct(m.get("no_answer_fraction"))])
    if rows:
        out += _table(["Run", "Benchmark", "Adapter", "Problems", "Samples/problem", "Accuracy % [95% CI]",
                       "Strict % [95% CI]", "pass@k %", "maj@k %", "Mean tokens", "Truncated %", "No answer %"], rows)
    missing = [r.label for r in runs if not r.benches]
    out += [f"No evaluation results in: {', '.join(missing)}.", ""] if missing else []
    if not rows:
        out += ["No evaluation results.", ""]
    funnels = [r for r in runs if r.funnel]
    if funnels:
        out += ["## Curation funnel", "", "problems → with an answer → usable pairs (a correct and an incorrect "
                "answer) → teacher-verified examples (% of problems).", ""]
        out += _table(["Run", "Problems", "With an answer", "Usable pairs", "Pairs tried by teacher",
                       "Teacher-verified"],
                      [[r.label, f.get("problems"), *(_funnel_cell(f.get(k), f.get("problems"))
                                                      for k in ("with_answer", "pairs", "pairs_tried", "examples"))]
                       for r in funnels for f in [r.funnel]])
    costs = [r for r in runs if r.cost]
    if costs:
        out += ["## Cost", "", "Wall-clock seconds per stage (summed over benchmarks for evaluate), tokens generated "
                "by every stage, tokens trained on by distill.", ""]
        out += _table(["Run", *(f"{s} s" for s in STAGES), "Total s", "Generated tokens", "Trained tokens"],
                      [[r.label, *(f"{r.cost['wall'][s]:.1f}" if s in r.cost["wall"] else None for s in STAGES),
                        f"{sum(r.cost['wall'].values()):.1f}", r.cost["generated_tokens"], r.cost["trained_tokens"]]
                       for r in costs])
    if plots:
        out += ["## Plots", ""] + [f"![{Path(p).stem}]({p})\n" for p in plots]
    out += ["## How the numbers are computed", "",
            "- Accuracy is the mean over all samples (pass@1 as avg@n); the 95% CI is a percentile bootstrap over "
            "problems (1000 resamples, seed 0). Strict = the paper's exact `\\boxed{}` match.",
            "- pass@k is the unbiased estimator of Chen et al. (2021); maj@k votes over each problem's first k samples "
            "(answers grouped by `answer_key`; ties go to the answer seen first; unanswered samples do not vote).",
            "- Metrics are recomputed from `samples.jsonl`; `metrics.json` is used only when the samples are missing.",
            ""]
    return "\n".join(out)


def _labels(run_dirs: list, labels: str | list[str] | None) -> list[str]:
    if isinstance(labels, str):
        labels = [s.strip() for s in labels.split(",")]
    if labels is not None and len(labels) != len(run_dirs):
        raise SsbError(f"--labels: got {len(labels)} labels for {len(run_dirs)} run directories")
    names = list(labels) if labels is not None else [Path(d).resolve().name for d in run_dirs]
    seen: dict[str, int] = {}
    for i, n in enumerate(names):  # two runs both called "run" become "run" and "run-2"
        seen[n] = seen.get(n, 0) + 1
        names[i] = n if seen[n] == 1 else f"{n}-{seen[n]}"
    return names


def main_report(run_dirs: list, out, labels: str | list[str] | None = None) -> Path:
    """Write ``out/report.md`` (and its plots) comparing ``run_dirs``; returns the report's path."""
    if not run_dirs:
        raise SsbError("report: give at least one run directory")
    runs = [load_run(d, name) for d, name in zip(run_dirs, _labels(run_dirs, labels))]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = [name for name, fn in (("accuracy.png", plot_accuracy), ("lengths.png", plot_lengths),
                                   ("loss.png", plot_loss), ("reward.png", plot_reward)) if fn(runs, out / name)]
    report = out / "report.md"
    report.write_text(render_markdown(runs, plots))
    return report
