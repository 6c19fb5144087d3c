"""Accuracy harness: strategies x KV budgets x tasks x context lengths on one model.

Each (task, length, sample, strategy, budget) gives one JSON record, appended to
``OUT/records.jsonl`` as soon as it is done; a rerun skips every record whose ``key`` is already
there (the key names the model, seed, task, length, sample and sample count, haystack, strategy
spec and budget), so an interrupted run resumes where it stopped. Samples go ``batch`` at a time
through one pipeline call (left-padded rows of nearly the same length; ``batch`` and the call's
seconds per sample are in each record). Then ``OUT/summary.md`` (also printed),
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from kvpress_like.errors import ConfigError
from kvpress_like.eval.environment import environment, record_environment
from kvpress_like.eval.haystacks import DEFAULT_HAYSTACK, haystack_named
from kvpress_like.eval.report import plot_accuracy_vs_budget, plot_needle_heatmaps, summary_table
from kvpress_like.eval.tasks import MAX_NEW_TOKENS, TASKS, Sample, make_samples, score

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


def record_key(
    model: str, seed: int, sample: Sample, samples: int, spec: StrategySpec, budget: float | None, steps: int
) -> str:
    """The record's identity: what made its prompt, its settings and its tokens. A sample's depth
    depends on how many samples its task has (``tasks.sample_depth``), so the count is part of it;
    ``steps`` (new tokens, or fidelity's teacher-forced steps) is, when not the task's default."""
    b = "-" if budget is None else f"{budget:g}"
    hay = "" if sample.haystack == DEFAULT_HAYSTACK else f"|hay={sample.haystack}"
    where = f"{sample.task}|len={sample.target_tokens}|#{sample.index}of{samples}{hay}"
    tokens = "" if steps == MAX_NEW_TOKENS[sample.task] else f"|steps={steps}"
    return f"{model}|seed={seed}|{where}|{spec.label}|b={b}{tokens}"


def read_records(path: Path) -> dict[str, dict]:
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


# ---- the records of one batch of samples ---------------------------------------------------------


def _teacher_forced_logits(pipe, prompts: list[str], tokens, steps: int):
    """Next-token logits ``[B, steps, V]`` after each prompt and each of ``tokens`` ``[B, steps]``
    (the reference's greedy tokens), and the tokens themselves (greedy on this pipe's own logits
    when None); with the prefill's Stats."""
    import torch

    context = pipe.compress(prompts)
    stats = context.stats
    logits = [context.last_logits.float()]
    chosen = []
    for step in range(steps - 1):
        token = logits[-1].argmax(dim=-1) if tokens is None else tokens[:, step]
        chosen.append(token)
        context = pipe.extend(context, token[:, None].tolist())  # logits after one more token
        logits.append(context.last_logits.float())
    if tokens is None:
        chosen.append(logits[-1].argmax(dim=-1))
    return torch.stack(logits, dim=1), (torch.stack(chosen, dim=1) if tokens is None else tokens), stats


def _fidelity(pipe, references: dict, samples: list[Sample], steps: int) -> tuple[list[dict], Any]:
    """Top-1 agreement and KL(full || compressed) per sample, against ``references`` (sample index
    -> the full cache's teacher-forced logits and greedy tokens)."""
    import torch

    ref_logits = torch.stack([references[s.index][0] for s in samples])
    ref_tokens = torch.stack([references[s.index][1] for s in samples])
    logits, _, stats = _teacher_forced_logits(pipe, [s.prompt for s in samples], ref_tokens, steps)
    agree = (logits.argmax(dim=-1) == ref_tokens).float().mean(dim=-1)
    ref_logp, logp = ref_logits.log_softmax(-1), logits.log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp(min=0).mean(dim=-1)
    rows = [
        {"score": a, "kl": k, "prediction": None} for a, k in zip(agree.tolist(), kl.tolist(), strict=True)
    ]
    return rows, stats


def _identity(
    model: str, seed: int, sample: Sample, samples: int, spec: StrategySpec, budget: float | None
) -> dict[str, Any]:
    """What a record is of: the fields its key names, and the sample's and strategy's details."""
    return {
        "model": model,
        "seed": seed,
        "task": sample.task,
        "length": sample.target_tokens,
        "haystack": sample.haystack,
        "sample": sample.index,
        "samples": samples,
        "sample_seed": sample.seed,
        "depth": sample.depth,
        "strategy": spec.label,
        "strategy_name": spec.name,
        "budget": budget,
        "settings": spec.settings_for(budget),
        "answers": list(sample.answers),
    }


def _stats_fields(stats, row: int) -> dict[str, Any]:
    kept = [layer[row] for layer in stats.kv_kept_per_layer]
    return {
        "prompt_tokens": stats.prompt_tokens[row],
        "kv_kept_mean": statistics.fmean(kept),
        "kv_kept_share": statistics.fmean(kept) / max(1, stats.prompt_tokens[row]),
        "prefill_seconds": stats.prefill_seconds / len(stats.prompt_tokens),  # a row's share
    }


# ---- the run ------------------------------------------------------------------------------------


class _Pipes:
    """The run's pipelines, one per (strategy spec, budget), built on first use; greedy, eager
    decoding (records measure accuracy: a compiled step per pipeline and batch size would cost
    more than the decoding it speeds up), no chat template."""

    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer, self._built = model, tokenizer, {}

    def get(self, name: str, label: str, budget: float | None, settings: dict) -> Any:
        from kvpress_like.pipeline import pipeline

        if (label, budget) not in self._built:
            self._built[(label, budget)] = pipeline(
                self.model,
                name,
                tokenizer=self.tokenizer,
                chat_template=False,
                do_sample=False,  # greedy whatever the model's generation_config
                decode="eager",
                **settings,
            )
        return self._built[(label, budget)]


def _batch_records(
    pipes: _Pipes,
    spec: StrategySpec,
    budget: float | None,
    samples: list[Sample],
    references: dict,
    fidelity_steps: int,
    max_new_tokens: int | None,
) -> list[dict]:
    """The scores of one batch of samples (one pipeline call), or ConfigError's refusal."""
    start = time.perf_counter()
    pipe = pipes.get(spec.name, spec.label, budget, spec.settings_for(budget))
    task = samples[0].task
    if task == "fidelity":
        missing = [s for s in samples if s.index not in references]
        if missing:  # the full cache's logits, once per sample for every strategy
            full = pipes.get(FULL, "__reference__", None, {})
            logits, tokens, _ = _teacher_forced_logits(
                full, [s.prompt for s in missing], None, fidelity_steps
            )
            for row, sample in enumerate(missing):
                references[sample.index] = (logits[row], tokens[row])
        results, stats = _fidelity(pipe, references, samples, fidelity_steps)
    else:
        n_new = max_new_tokens or MAX_NEW_TOKENS[task]
        gen = pipe([s.prompt for s in samples], max_new_tokens=n_new)
        results = [
            {"score": score(s, text), "prediction": text} for s, text in zip(samples, gen.texts, strict=True)
        ]
        stats = gen.stats
    seconds = (time.perf_counter() - start) / len(samples)
    return [
        {"status": "ok", **result, **_stats_fields(stats, row), "seconds": seconds, "batch": len(samples)}
        for row, result in enumerate(results)
    ]


def _group_records(
    pipes: _Pipes,
    spec: StrategySpec,
    budget: float | None,
    group: list[Sample],
    references: dict,
    fidelity_steps: int,
    max_new_tokens: int | None,
) -> list[dict]:
    """The group's records from one call; when the call is refused (``ConfigError``), each sample
    alone, since alone it may pass what its batch did not (the free memory for every row's new
    tokens): a record is refused only for itself."""
    args = (references, fidelity_steps, max_new_tokens)
    try:
        return _batch_records(pipes, spec, budget, group, *args)
    except ConfigError as exc:
        if len(group) == 1:
            return [{"status": "skipped", "reason": str(exc)}]
    return [_group_records(pipes, spec, budget, [sample], *args)[0] for sample in group]


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
    haystack: str = DEFAULT_HAYSTACK,
    batch: int = 1,
) -> EvalResult:
    """Run the grid (resumably), then write the summary and plots; see the module docstring.

    ``batch``: samples per pipeline call (rows of one left-padded batch; a task's samples have
    nearly the same length). Records do not depend on it beyond floating-point rounding."""
    for task in tasks:
        if task not in TASKS:
            raise ConfigError(f"tasks: must be among {', '.join(TASKS)} (got {task!r})")
    if batch < 1:
        raise ConfigError(f"batch: must be at least 1 (got {batch})")
    try:
        haystack_named(haystack)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if plots:
        check_plotting()
    specs = [StrategySpec.parse(s) for s in strategies]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record_environment(out, environment(model, model_name))  # before any record is added
    path = out / "records.jsonl"
    done = read_records(path)
    runs = {(spec.label, None if spec.name == FULL else b): spec for spec in specs for b in budgets}
    runs = [(spec, budget) for (_, budget), spec in runs.items()]  # full: once
    computed = reused = 0
    keys_this_run: list[str] = []
    bar = tqdm(
        total=len(tasks) * len(lengths) * samples * len(runs),
        desc="eval",
        unit="record",
        disable=not progress,
    )
    pipes = _Pipes(model, tokenizer)
    with path.open("a") as sink:
        for task in tasks:
            for length in lengths:
                task_samples = make_samples(tokenizer, task, length, samples, seed, haystack)
                references: dict = {}  # fidelity: the full cache's, per sample index
                for spec, budget in runs:
                    steps = fidelity_steps if task == "fidelity" else max_new_tokens or MAX_NEW_TOKENS[task]
                    keys = {
                        s.index: record_key(model_name, seed, s, samples, spec, budget, steps)
                        for s in task_samples
                    }
                    keys_this_run += keys.values()
                    todo = [s for s in task_samples if keys[s.index] not in done]
                    reused += len(task_samples) - len(todo)
                    bar.update(len(task_samples) - len(todo))
                    bar.set_postfix_str(f"{task} {length} {spec.label} {budget}")
                    for first in range(0, len(todo), batch):
                        group = todo[first : first + batch]
                        results = _group_records(
                            pipes, spec, budget, group, references, fidelity_steps, max_new_tokens
                        )
                        for sample, result in zip(group, results, strict=True):
                            record = {
                                "key": keys[sample.index],
                                **_identity(model_name, seed, sample, samples, spec, budget),
                                **result,
                            }
                            sink.write(json.dumps(record) + "\n")
                            done[record["key"]] = record
                        sink.flush()
                        computed += len(group)
                        bar.update(len(group))
    bar.close()
    records = [done[k] for k in dict.fromkeys(keys_this_run)]
    summary = summary_table(records, budgets)
    (out / "summary.md").write_text(summary)
    files = [path, out / "summary.md"]
    if plots:
        files += plot_accuracy_vs_budget(records, out / "accuracy_vs_budget.png")
        files += plot_needle_heatmaps(records, out)
    return EvalResult(records, computed, reused, summary, files)
