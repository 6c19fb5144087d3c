"""Reports of an accuracy run: the summary table (means with 95% intervals) and the plots.

The plots need matplotlib (the ``eval`` extra); ``harness.check_plotting`` refuses a run that
asks for them without it before any model work.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from kvpress_like.eval.haystacks import DEFAULT_HAYSTACK
from kvpress_like.eval.intervals import bootstrap_mean, interval
from kvpress_like.eval.tasks import NEEDLE_TASKS


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _interval(values: list[float], task: str) -> tuple[float, float]:
    """95%: fidelity's top-1 agreement and KL are means of other values (the bootstrap's), even
    when every one is 0 or 1; accuracies get Wilson's when they are 0/1 (``intervals.interval``)."""
    return bootstrap_mean(values) if task in ("fidelity", "kl") else interval(values)


def _cell(values: list[float], task: str, digits: int = 2) -> str:
    """Mean and 95% interval: ``0.75 [0.30, 0.95]``."""
    if not values:
        return "—"
    low, high = _interval(values, task)
    return f"{_fmt(_mean(values), digits)} [{_fmt(low, digits)}, {_fmt(high, digits)}]"


def _haystack(record: dict) -> str:
    return record.get("haystack", DEFAULT_HAYSTACK)  # records written before there was a choice


def summary_table(records: list[dict], budgets: Sequence[float] = ()) -> str:
    """Markdown: one row per (strategy, budget, length), mean score per task (n samples each);
    fidelity as top-1 agreement and mean KL; ``skipped`` counts refused records. Records of more
    than one haystack get a ``haystack`` column (a row per haystack)."""
    tasks = list(dict.fromkeys(r["task"] for r in records))
    haystacks = list(dict.fromkeys(_haystack(r) for r in records))
    rows: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        row = rows[(_haystack(r), r["strategy"], r["budget"], r["length"])]
        if r["status"] != "ok":
            row["skipped"].append(1)
            continue
        row[r["task"]].append(r["score"])
        if r["task"] == "fidelity":
            row["kl"].append(r["kl"])
    columns = [t if t != "fidelity" else "fidelity top-1" for t in tasks]
    if "fidelity" in tasks:
        columns.append("fidelity KL")
    several = len(haystacks) > 1
    header = [
        *(["haystack"] if several else []),
        "strategy",
        "budget",
        "length",
        *columns,
        "mean acc",
        "skipped",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    strategies = list(dict.fromkeys(r["strategy"] for r in records))

    def order(key: tuple) -> tuple:  # grouped by strategy, budgets then lengths ascending, whatever
        haystack, strategy, budget, length = key  # order the records came in (merged runs)
        return haystacks.index(haystack), strategies.index(strategy), budget or 0.0, length

    for haystack, strategy, budget, length in sorted(rows, key=order):
        row = rows[(haystack, strategy, budget, length)]
        cells = [
            *([haystack] if several else []),
            strategy,
            "—" if budget is None else f"{budget:g}",
            str(length),
        ]
        for task in tasks:
            cells.append(_cell(row[task], task))
        if "fidelity" in tasks:
            cells.append(_cell(row["kl"], "kl", 4))
        accuracy = [v for t in tasks if t != "fidelity" for v in row[t]]
        cells += [_cell(accuracy, "accuracy"), str(len(row["skipped"]))]
        lines.append("| " + " | ".join(cells) + " |")
    counts = sorted({len(values) for row in rows.values() for task in tasks if (values := row[task])})
    n = "no" if not counts else str(counts[0]) if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
    text = f"{haystacks[0]} haystack; " if haystacks and not several else ""
    return "\n".join(lines) + (
        f"\n\n{text}Scores are means over {n} sample(s) per cell with 95% intervals (Wilson's for 0/1 "
        "scores, a bootstrap of the mean otherwise); — = no record.\n"
    )


def plot_accuracy_vs_budget(records: list[dict], path: Path) -> list[Path]:
    """One panel per task, one line per strategy (mean over lengths and samples, with its 95%
    interval as error bars); full dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r["status"] == "ok"]
    tasks = list(dict.fromkeys(r["task"] for r in ok))
    if not tasks:
        return []
    budgets = sorted({r["budget"] for r in ok if r["budget"] is not None})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        by = defaultdict(lambda: defaultdict(list))
        for r in ok:
            if r["task"] == task:
                by[r["strategy"]][r["budget"]].append(r["score"])
        for strategy, points in by.items():
            if list(points) == [None]:
                ax.axhline(_mean(points[None]), linestyle="--", color="black", label=strategy)
                continue
            xs = sorted(b for b in points if b is not None)
            means = [_mean(points[b]) for b in xs]
            bounds = [_interval(points[b], task) for b in xs]  # 95%, as in the summary
            # max(0, ...): Wilson's end and a mean of all-1 scores can differ by a rounding error
            below = [max(0.0, m - low) for m, (low, _) in zip(means, bounds, strict=True)]
            above = [max(0.0, high - m) for m, (_, high) in zip(means, bounds, strict=True)]
            ax.errorbar(xs, means, yerr=[below, above], marker="o", capsize=3, label=strategy)
        ax.set_title(task if task != "fidelity" else "fidelity (top-1 agreement)")
        ax.set_xlabel("KV budget (retain rate)")
        ax.set_ylim(-0.05, 1.05)
        if budgets:
            ax.set_xticks(budgets)
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_needle_heatmaps(records: list[dict], out: Path) -> list[Path]:
    """Per strategy: needle depth x context length (mean over needle tasks), one panel per budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    ok = [r for r in records if r["status"] == "ok" and r["task"] in NEEDLE_TASKS]
    paths = []
    for strategy in dict.fromkeys(r["strategy"] for r in ok):
        mine = [r for r in ok if r["strategy"] == strategy]
        budgets = sorted({r["budget"] for r in mine}, key=lambda b: -1 if b is None else b)
        depths = sorted({round(r["depth"], 3) for r in mine})
        lengths = sorted({r["length"] for r in mine})
        width = 1.5 + max(2.6, 1.1 * len(lengths)) * len(budgets)
        fig, axes = plt.subplots(1, len(budgets), figsize=(width, 3.8), layout="constrained")
        axes = [axes] if len(budgets) == 1 else list(axes)
        for ax, budget in zip(axes, budgets, strict=True):
            grid = torch.full((len(depths), len(lengths)), float("nan"))
            cells = defaultdict(list)
            for r in mine:
                if r["budget"] == budget:
                    cells[(depths.index(round(r["depth"], 3)), lengths.index(r["length"]))].append(r["score"])
            for (i, j), values in cells.items():
                grid[i, j] = _mean(values)
            image = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            for (i, j), values in cells.items():
                ax.text(j, i, f"{_mean(values):.2f}", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
            ax.set_xlabel("context length (tokens)")
            ax.set_title(f"budget {budget:g}" if budget is not None else "no budget")
        axes[0].set_ylabel("needle depth")
        fig.suptitle(f"{strategy}: needle retrieval (passkey + niah)")
        fig.colorbar(image, ax=axes, fraction=0.05, label="accuracy")
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in strategy)
        path = out / f"heatmap_{safe}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
