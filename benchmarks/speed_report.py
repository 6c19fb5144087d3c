"""The speed benchmark's report: its table, the issue's targets checked against a run, its plot.

``speed.py`` writes these from its records; ``pyplot`` also serves the other benchmarks' plots.
"""

from __future__ import annotations

from pathlib import Path

# The issue's targets, all at 128K x1: (what, unit, comparison, limit).
TARGETS = [
    ("FastKV decode", "ms/token", "<=", 5.0),
    ("FastKV decode vs transformers", "x", ">=", 10.0),
    ("FastKV prefill vs transformers", "x", ">=", 2.0),
    ("FastKV peak GPU memory", "GiB", "<=", 22.0),
    ("whole benchmark run", "s", "<=", 600.0),
]


def print_table(records: list[dict]) -> None:
    base = {
        (r["length"], r["batch"]): r for r in records if r["system"] == "transformers" and "prefill_s" in r
    }
    print(
        f"\n{'case':>10} {'system':>12} {'prefill s':>10} {'x tf':>6} {'decode ms':>10} {'x tf':>6} "
        f"{'peak GiB':>9} {'prefill/floor':>14} {'decode/floor':>13}"
    )
    for r in records:
        case = f"{r['length'] // 1024}Kx{r['batch']}"
        if "error" in r:
            print(f"{case:>10} {r['system']:>12}  error: {r['error'][:80]}")
            continue
        ref = base.get((r["length"], r["batch"]))
        speedup_p = f"{ref['prefill_s'] / r['prefill_s']:.2f}" if ref else "-"
        speedup_d = f"{ref['decode_ms'] / r['decode_ms']:.1f}" if ref else "-"
        print(
            f"{case:>10} {r['system']:>12} {r['prefill_s']:>10.2f} {speedup_p:>6} {r['decode_ms']:>10.2f} "
            f"{speedup_d:>6} {r.get('peak_gib', 0):>9.1f} {r['prefill_vs_floor']:>14.2f} "
            f"{r['decode_vs_floor']:>13.2f}"
        )


def check_targets(records: list[dict], seconds: float) -> list[dict]:
    """``TARGETS`` against this run's FastKV and transformers records at 128K x1: the value reached,
    whether it is met, and by how much (relative to the limit) a miss misses. Empty without them."""
    at_128k = {
        r["system"]: r for r in records if (r["length"], r["batch"]) == (131072, 1) and "prefill_s" in r
    }
    if not {"fastkv", "transformers"} <= at_128k.keys():
        return []
    fast, base = at_128k["fastkv"], at_128k["transformers"]
    reached = [
        fast["decode_ms"],
        base["decode_ms"] / fast["decode_ms"],
        base["prefill_s"] / fast["prefill_s"],
        fast.get("peak_gib"),  # GPU only
        seconds,
    ]
    rows = []
    for (what, unit, comparison, limit), value in zip(TARGETS, reached, strict=True):
        if value is None:
            continue
        met = value <= limit if comparison == "<=" else value >= limit
        miss = 0.0 if met else abs(value - limit) / limit
        rule = f"{comparison} {limit:g} {unit}"
        rows.append({"target": what, "rule": rule, "reached": value, "met": met, "missed_by": miss})
    return rows


def print_targets(rows: list[dict]) -> None:
    if not rows:
        print("\ntargets: not checked (they need the 131072x1 case of transformers and fastkv)")
        return
    print("\ntargets (128K x1, this run):")
    for row in rows:
        status = "met" if row["met"] else f"MISSED by {100 * row['missed_by']:.1f}%"
        print(f"  {row['target'] + ' ' + row['rule']:<48} reached {row['reached']:8.2f}  {status}")


def pyplot():
    """matplotlib's pyplot drawing to files, or None (saying so) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return None
    return plt


def plot(records: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    ok = [r for r in records if "prefill_s" in r]
    cases = sorted({(r["length"], r["batch"]) for r in ok})
    systems = list(dict.fromkeys(r["system"] for r in ok))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = [
        ("prefill_s", "prefill (s)"),
        ("decode_ms", "decode (ms/token)"),
        ("peak_gib", "peak GPU memory (GiB)"),
    ]
    for ax, (key, label) in zip(axes, panels, strict=True):
        width = 0.8 / len(systems)
        for i, system in enumerate(systems):
            by_case = {(r["length"], r["batch"]): r.get(key, 0) for r in ok if r["system"] == system}
            values = [by_case.get(c, 0) for c in cases]
            ax.bar([j + i * width for j in range(len(cases))], values, width, label=system)
        ax.set_xticks(
            [j + 0.4 - width / 2 for j in range(len(cases))], [f"{n // 1024}K x{b}" for n, b in cases]
        )
        ax.set_title(label)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
