"""Accuracy harness: strategies x KV budgets x tasks x context lengths on one model.

Each (task, length, sample, strategy, budget) gives one JSON record, appended to
``OUT/records.jsonl`` as soon as it is done; a rerun skips every record whose ``key`` is already
there (the key names the model, seed, task, length, sample, strategy spec and budget), so an
interrupted run resumes where it stopped. Then ``OUT/summary.md`` (also printed),
``OUT/accuracy_vs_budget.png`` and ``OUT/heatmap_<strategy>.png``. The plots need matplotlib
(``pip install "kvpress-like[eval]"``); without it a run asking for them is refused before any
model work, and ``--no-plots`` (``plots=False``) runs without it.

Strategy specs: ``NAME[:SETTING=VALUE[:SETTING=VALUE...]]``, e.g. ``fastkv:tsp=0.2:window=4``.
``tsp`` is short for ``tsp_rate``; any other setting goes to the strategy as is. Budgets: for
every strategy but ``full`` the budget is ``retain_rate``; fastkv also gets
``tsp_rate = max(budget, 0.2)`` unless the spec sets it. ``full`` ignores budgets and runs once
(budget ``null`` in the records, a dashed line in the plots). A combination that a strategy
refuses (``ConfigError``, e.g. a budget below its window) is recorded with ``status: "skipped"``
and its reason.

Scores: accuracy in [0, 1] (``kvpress_like.eval.tasks.score``); for ``fidelity`` the share of
teacher-forced greedy steps whose top-1 token matches the full cache's, with the mean KL
divergence KL(full || compressed) of the next-token distributions in ``kl``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from kvpress_like.errors import ConfigError
from kvpress_like.eval.environment import environment, record_environment
from kvpress_like.eval.intervals import interval
from kvpress_like.eval.tasks import (
    MAX_NEW_TOKENS,
    NEEDLE_TASKS,
    TASKS,
    Sample,
    make_samples,
    score,
)

DEFAULT_TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt")
ALIASES = {"tsp": "tsp_rate"}
FULL = "full"
INSTALL_EVAL = 'pip install "kvpress-like[eval]"'


def check_plotting(skip: str = "pass plots=False") -> None:
    """Refuse plots that could not be drawn (matplotlib, from the ``eval`` extra, is missing) now,
    before any model work, rather than after the whole run; ``skip`` says how to do without them."""
    try:
        import matplotlib  # noqa: F401  (the plot functions import it when they draw)
    except ImportError:
        message = f"plots: need matplotlib, which is not installed: {INSTALL_EVAL}, or {skip}"
        raise ConfigError(message) from None


@dataclass(frozen=True)
class StrategySpec:
    """A strategy name plus fixed settings, parsed from ``NAME[:K=V[:K=V...]]``."""

    name: str
    settings: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    @classmethod
    def parse(cls, text: str) -> StrategySpec:
        name, *parts = text.strip().split(":")
        if not name:
            raise ConfigError(f"strategies: a spec must start with a strategy name (got {text!r})")
        settings: dict[str, Any] = {}
        for part in parts:
            key, sep, value = part.partition("=")
            if not sep or not key:
                raise ConfigError(f"strategies: settings must be KEY=VALUE after the name (got {text!r})")
            settings[ALIASES.get(key, key)] = _value(value)
        return cls(name, settings, text.strip())

    def settings_for(self, budget: float | None) -> dict[str, Any]:
        """The strategy's settings at one budget (``full``: none; else ``retain_rate``)."""
        if self.name == FULL or budget is None:
            return dict(self.settings)
        out = {"retain_rate": budget}
        if self.name == "fastkv":
            out["tsp_rate"] = max(budget, 0.2)
        return out | self.settings


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


@dataclass
class EvalResult:
    records: list[dict]
    computed: int  # records computed in this call
    reused: int  # records found in the JSONL and skipped
    summary: str
    files: list[Path]


def record_key(model: str, seed: int, sample: Sample, spec: StrategySpec, budget: float | None) -> str:
    b = "-" if budget is None else f"{budget:g}"
    return f"{model}|seed={seed}|{sample.task}|len={sample.target_tokens}|#{sample.index}|{spec.label}|b={b}"


def _read_records(path: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by an interrupted run
                continue
            out[rec["key"]] = rec
    return out


# ---- one record ---------------------------------------------------------------------------------


def _teacher_forced_logits(pipe, prompt: str, tokens: list[int] | None, steps: int):
    """Next-token logits ``[steps, V]`` after the prompt and each of ``tokens`` (the reference's
    greedy tokens), and the tokens themselves (greedy on this pipe's own logits when None)."""
    import torch

    context = pipe.compress(prompt)
    stats = context.stats
    logits = [context.last_logits[0].float()]
    chosen: list[int] = []
    for step in range(steps - 1):
        token = int(logits[-1].argmax()) if tokens is None else tokens[step]
        chosen.append(token)
        context = pipe.extend(context, [token])  # next-token logits after one more token
        logits.append(context.last_logits[0].float())
    if tokens is None:
        chosen.append(int(logits[-1].argmax()))
    return torch.stack(logits), chosen, stats


def _fidelity(pipe, reference, sample: Sample, steps: int) -> tuple[dict, Any]:
    import torch

    ref_logits, ref_tokens = reference
    logits, _, stats = _teacher_forced_logits(pipe, sample.prompt, ref_tokens, steps)
    agree = (logits.argmax(dim=-1) == torch.tensor(ref_tokens)).float().mean().item()
    ref_logp, logp = ref_logits.log_softmax(-1), logits.log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp(min=0).mean().item()
    return {"score": agree, "kl": kl, "prediction": None}, stats


def _stats_fields(stats) -> dict[str, Any]:
    kept = [row[0] for row in stats.kv_kept_per_layer]
    return {
        "prompt_tokens": stats.prompt_tokens[0],
        "kv_kept_mean": statistics.fmean(kept),
        "kv_kept_share": statistics.fmean(kept) / max(1, stats.prompt_tokens[0]),
        "prefill_seconds": stats.prefill_seconds,
    }


# ---- the run ------------------------------------------------------------------------------------


def evaluate(
    model,
    tokenizer,
    *,
    strategies: Sequence[str],
    budgets: Sequence[float],
    tasks: Sequence[str] = DEFAULT_TASKS,
    lengths: Sequence[int] = (1024,),
    samples: int = 4,
    seed: int = 0,
    out: str | Path = "eval_results",
    model_name: str = "model",
    fidelity_steps: int = MAX_NEW_TOKENS["fidelity"],
    max_new_tokens: int | None = None,
    progress: bool = True,
    plots: bool = True,
) -> EvalResult:
    """Run the grid (resumably), then write the summary and plots; see the module docstring."""
    from kvpress_like.pipeline import pipeline

    for task in tasks:
        if task not in TASKS:
            raise ConfigError(f"tasks: must be among {', '.join(TASKS)} (got {task!r})")
    if plots:
        check_plotting()
    specs = [StrategySpec.parse(s) for s in strategies]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record_environment(out, environment(model, model_name))  # before any record is added
    path = out / "records.jsonl"
    done = _read_records(path)
    runs = {(spec.label, None if spec.name == FULL else b): spec for spec in specs for b in budgets}
    runs = [(spec, budget) for (_, budget), spec in runs.items()]  # full: once
    need_full_reference = "fidelity" in tasks
    computed = reused = 0
    keys_this_run: list[str] = []
    total = len(tasks) * len(lengths) * samples * len(runs)
    bar = tqdm(total=total, desc="eval", unit="record", disable=not progress)
    pipes: dict[tuple, Any] = {}
    with path.open("a") as sink:
        for task in tasks:
            for length in lengths:
                for s_index, sample in enumerate(make_samples(tokenizer, task, length, samples, seed)):
                    reference = None
                    for spec, budget in runs:
                        key = record_key(model_name, seed, sample, spec, budget)
                        keys_this_run.append(key)
                        bar.update()
                        if key in done:
                            reused += 1
                            continue
                        base = {
                            "key": key,
                            "model": model_name,
                            "seed": seed,
                            "task": task,
                            "length": length,
                            "sample": s_index,
                            "sample_seed": sample.seed,
                            "depth": sample.depth,
                            "strategy": spec.label,
                            "strategy_name": spec.name,
                            "budget": budget,
                            "settings": spec.settings_for(budget),
                            "answers": list(sample.answers),
                        }
                        bar.set_postfix_str(f"{task} {length} {spec.label} {budget}")
                        try:
                            pipe_key = (spec.label, budget)
                            if pipe_key not in pipes:
                                pipes[pipe_key] = pipeline(
                                    model,
                                    spec.name,
                                    tokenizer=tokenizer,
                                    chat_template=False,
                                    do_sample=False,  # greedy whatever the model's generation_config
                                    **base["settings"],
                                )
                            pipe = pipes[pipe_key]
                            start = time.perf_counter()
                            if task == "fidelity":
                                if reference is None and need_full_reference:
                                    full = pipes.setdefault(
                                        ("__reference__", None),
                                        pipeline(
                                            model,
                                            FULL,
                                            tokenizer=tokenizer,
                                            chat_template=False,
                                            do_sample=False,
                                        ),
                                    )
                                    ref_logits, ref_tokens, _ = _teacher_forced_logits(
                                        full, sample.prompt, None, fidelity_steps
                                    )
                                    reference = (ref_logits, ref_tokens)
                                result, stats = _fidelity(pipe, reference, sample, fidelity_steps)
                            else:
                                n_new = max_new_tokens or MAX_NEW_TOKENS[task]
                                gen = pipe(sample.prompt, max_new_tokens=n_new)
                                result = {"score": score(sample, gen.text), "prediction": gen.text}
                                stats = gen.stats
                            record = {
                                **base,
                                "status": "ok",
                                **result,
                                **_stats_fields(stats),
                                "seconds": time.perf_counter() - start,
                            }
                        except ConfigError as exc:
                            record = {**base, "status": "skipped", "reason": str(exc)}
                        sink.write(json.dumps(record) + "\n")
                        sink.flush()
                        done[key] = record
                        computed += 1
    bar.close()
    records = [done[k] for k in dict.fromkeys(keys_this_run)]
    summary = summary_table(records, budgets)
    (out / "summary.md").write_text(summary)
    files = [path, out / "summary.md"]
    if plots:
        files += plot_accuracy_vs_budget(records, out / "accuracy_vs_budget.png")
        files += plot_needle_heatmaps(records, out)
    return EvalResult(records, computed, reused, summary, files)


# ---- reports ------------------------------------------------------------------------------------


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _cell(values: list[float], digits: int = 2) -> str:
    """Mean and 95% interval (``intervals.py``): ``0.75 [0.30, 0.95]``."""
    if not values:
        return "—"
    low, high = interval(values)
    return f"{_fmt(_mean(values), digits)} [{_fmt(low, digits)}, {_fmt(high, digits)}]"


def summary_table(records: list[dict], budgets: Sequence[float] = ()) -> str:
    """Markdown: one row per (strategy, budget, length), mean score per task (n samples each);
    fidelity as top-1 agreement and mean KL; ``skipped`` counts refused records."""
    tasks = list(dict.fromkeys(r["task"] for r in records))
    rows: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        row = rows[(r["strategy"], r["budget"], r["length"])]
        if r["status"] != "ok":
            row["skipped"].append(1)
            continue
        row[r["task"]].append(r["score"])
        if r["task"] == "fidelity":
            row["kl"].append(r["kl"])
    columns = [t if t != "fidelity" else "fidelity top-1" for t in tasks]
    if "fidelity" in tasks:
        columns.append("fidelity KL")
    header = ["strategy", "budget", "length", *columns, "mean acc", "skipped"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (strategy, budget, length), row in rows.items():
        cells = [strategy, "—" if budget is None else f"{budget:g}", str(length)]
        for task in tasks:
            cells.append(_cell(row[task]))
        if "fidelity" in tasks:
            cells.append(_cell(row["kl"], 4))
        accuracy = [v for t in tasks if t != "fidelity" for v in row[t]]
        cells += [_cell(accuracy), str(len(row["skipped"]))]
        lines.append("| " + " | ".join(cells) + " |")
    n = max((r["sample"] + 1 for r in records), default=0)
    return "\n".join(lines) + (
        f"\n\nScores are means over {n} sample(s) per cell with 95% intervals (Wilson's for 0/1 "
        "scores, a bootstrap of the mean otherwise); — = no record.\n"
    )


def plot_accuracy_vs_budget(records: list[dict], path: Path) -> list[Path]:
    """One panel per task, one line per strategy (mean over lengths and samples); full dashed."""
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
            ax.plot(xs, [_mean(points[b]) for b in xs], marker="o", label=strategy)
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
