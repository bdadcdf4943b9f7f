"""The PNG plots of ``ssb report`` (matplotlib, Agg backend, imported only when a plot is drawn).

Each ``plot_*(runs, path)`` takes :class:`ssb.run_results.Run` objects, writes ``path`` and returns True, or returns
False and writes nothing when no run has the data:

- ``accuracy.png``: accuracy with CI error bars per benchmark, grouped by run;
- ``lengths.png``: response-length box plots per run per benchmark;
- ``loss.png``: training loss per step (``distill/train_log.jsonl``);
- ``reward.png``: mean training reward per step of a GRPO baseline run (``grpo/train_log.jsonl``);
- ``cost.png``: per benchmark, accuracy (CI error bars) against training cost, one labelled point per run (x:
  GPU-seconds including reused stages, or wall seconds when no run used a GPU).
"""

from __future__ import annotations

from pathlib import Path

from ssb.run_results import Run


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(runs: list[Run], path: Path) -> bool:
    benches = sorted({b for r in runs for b in r.benches})
    if not benches:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(benches) * max(len(runs), 1) ** 0.5 + 2), 3.5))
    width = 0.8 / len(runs)
    for i, r in enumerate(runs):
        xs, ys, errs = [], [], [[], []]
        for j, name in enumerate(benches):
            if name in r.benches:
                m = r.benches[name].metrics
                acc, (lo, hi) = 100 * m["accuracy"], m.get("accuracy_ci95") or (m["accuracy"],) * 2
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(acc)
                errs[0].append(max(acc - 100 * lo, 0))
                errs[1].append(max(100 * hi - acc, 0))
        bars = ax.bar(xs, ys, width, yerr=errs, capsize=3, label=r.label)
        ax.bar_label(bars, fmt="%.1f", fontsize="x-small", label_type="center")
    ax.set_xticks(range(len(benches)), benches, rotation=20, ha="right")
    ax.set_ylabel("accuracy % (95% CI)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize="small")
    return _save(plt, fig, path)


def plot_lengths(runs: list[Run], path: Path) -> bool:
    benches = sorted({b for r in runs for b, v in r.benches.items() if v.tokens})
    if not benches:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(benches), figsize=(2.5 + 2.2 * len(benches) * max(1, len(runs) / 2), 3.5),
                             squeeze=False)
    for ax, name in zip(axes[0], benches):
        have = [r for r in runs if name in r.benches and r.benches[name].tokens]
        ax.boxplot([r.benches[name].tokens for r in have])
        ax.set_xticks(range(1, len(have) + 1), [r.label for r in have], rotation=20, ha="right")
        ax.set_title(name, fontsize="medium")
    axes[0][0].set_ylabel("response tokens")
    return _save(plt, fig, path)


def plot_loss(runs: list[Run], path: Path) -> bool:
    return _plot_curves([(r.label, r.losses) for r in runs], "distill loss", path)


def plot_reward(runs: list[Run], path: Path) -> bool:
    return _plot_curves([(r.label, r.rewards) for r in runs], "GRPO mean training reward", path)


def _plot_curves(curves: list[tuple[str, list]], ylabel: str, path: Path) -> bool:
    """One line per run of (step, value) points; False (nothing written) if no run has any."""
    curves = [(label, pts) for label, pts in curves if pts]
    if not curves:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, pts in curves:
        ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small")
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def training_cost_axis(runs: list[Run]) -> tuple[str, dict[str, float | None]]:
    """(axis label, run label -> training cost): GPU-seconds, or wall seconds when no run used a GPU (CPU runs).
    A run with no training stage (the base model) costs 0; None when its GPU-seconds were not recorded."""
    train = {r.label: (r.cost or {}).get("training") or {} for r in runs}
    if any(t.get("gpu_seconds") for t in train.values()):
        return "training GPU-seconds (incl. reused stages)", {k: t.get("gpu_seconds", 0) for k, t in train.items()}
    wall = {k: t.get("wall_seconds", 0) for k, t in train.items()}
    return "training wall seconds (incl. reused stages; no GPU)", wall


def plot_cost(runs: list[Run], path: Path) -> bool:
    """Per benchmark: accuracy (95% CI error bars) against training cost, one labelled point per run."""
    benches = sorted({b for r in runs for b in r.benches})
    if not benches:
        return False
    xlabel, cost = training_cost_axis(runs)
    plt = _plt()
    fig, axes = plt.subplots(1, len(benches), figsize=(1 + 3.8 * len(benches), 3.5), squeeze=False)
    for ax, name in zip(axes[0], benches):
        for i, r in enumerate(runs):
            if name not in r.benches or cost[r.label] is None:
                continue
            m = r.benches[name].metrics
            acc, (lo, hi) = 100 * m["accuracy"], m.get("accuracy_ci95") or (m["accuracy"],) * 2
            ax.errorbar([cost[r.label]], [acc], yerr=[[max(acc - 100 * lo, 0)], [max(100 * hi - acc, 0)]], fmt="o",
                        capsize=3, color=f"C{i % 10}")
            ax.annotate(r.label, (cost[r.label], acc), textcoords="offset points", xytext=(5, 4), fontsize="x-small")
        ax.set_title(name, fontsize="medium")
        ax.set_xlabel(xlabel, fontsize="small")
        ax.set_ylim(0, 102)
        ax.margins(x=0.15)
    axes[0][0].set_ylabel("accuracy % (95% CI)")
    return _save(plt, fig, path)
