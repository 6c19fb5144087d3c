"""Merge the records of several accuracy runs into one folder, with their summary and plots.

Runs made apart (on several GPUs, on several days, a grid split by strategy) are merged only when
their ``environment.json`` agree on what changes numbers (``environment.MUST_MATCH``: model,
dtype, device type); the merged ``environment.json`` lists every source's own. A record key found
in several runs keeps its first computed record over a refusal, else its first record (a warning
counts those whose scores differ).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from kvpress_like.errors import ConfigError
from kvpress_like.eval.environment import MUST_MATCH
from kvpress_like.eval.harness import EvalResult, check_plotting, read_records
from kvpress_like.eval.report import plot_accuracy_vs_budget, plot_needle_heatmaps, summary_table

logger = logging.getLogger("kvpress_like")


def _environment(folder: Path) -> dict:
    path = folder / "environment.json"
    if not (folder / "records.jsonl").is_file() or not path.is_file():
        raise ConfigError(f"runs: must be folders of `kvpress-like eval` runs, with records.jsonl and "
                          f"environment.json (got {str(folder)!r})")  # fmt: skip
    return json.loads(path.read_text())


def merge_runs(folders: Sequence[str | Path], out: str | Path, plots: bool = True) -> EvalResult:
    """Records of ``folders`` (in order) into ``out``: records.jsonl, environment.json, summary.md
    and the plots. Refused before anything is written when the runs' environments differ."""
    folders = [Path(f) for f in folders]
    if not folders:
        raise ConfigError("runs: must name at least one run folder (got none)")
    if plots:
        check_plotting(skip="pass --no-plots")
    environments = [_environment(f) for f in folders]
    first = environments[0]
    for folder, env in zip(folders[1:], environments[1:], strict=True):
        differs = [
            f"{key} {first.get(key)!r} vs {env.get(key)!r}"
            for key in MUST_MATCH
            if env.get(key) != first.get(key)
        ]
        if differs:
            raise ConfigError(f"runs: {folders[0]} and {folder} were made with different "
                              f"{'; '.join(differs)}: their records do not compare")  # fmt: skip
    records: dict[str, dict] = {}
    differing = 0
    for folder in folders:
        for key, record in read_records(folder / "records.jsonl").items():
            kept = records.get(key)
            if kept is None or (kept["status"] != "ok" and record["status"] == "ok"):
                records[key] = record  # a computed record beats a refusal (made in a bigger batch)
            elif record["status"] == "ok":
                scores = [(r.get("score"), r.get("kl")) for r in (kept, record)]
                differing += scores[0] != scores[1]
    if differing:
        logger.warning(
            "%d record(s) found in several runs with other scores: the first run's kept", differing
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records.values()))
    merged = {key: first.get(key) for key in MUST_MATCH} | {
        "merged_from": [{"folder": str(f), **env} for f, env in zip(folders, environments, strict=True)]
    }
    (out / "environment.json").write_text(json.dumps(merged, indent=1) + "\n")
    rows = list(records.values())
    summary = summary_table(rows)
    (out / "summary.md").write_text(summary)
    files = [path, out / "environment.json", out / "summary.md"]
    if plots:
        files += plot_accuracy_vs_budget(rows, out / "accuracy_vs_budget.png")
        files += plot_needle_heatmaps(rows, out)
    return EvalResult(rows, 0, len(rows), summary, files)
