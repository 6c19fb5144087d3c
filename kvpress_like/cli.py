"""``kvpress-like``: the demo on the embedded model, any model from a config file, and the strategy list."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from kvpress_like.errors import ConfigError


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (got {value})")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (got {value})")
    return value


def _runs(values: Sequence[float]) -> str:
    """Per-layer values as runs: ``0-14: 1000 | 15-29: 200``."""
    parts, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            parts.append(f"{span}: {values[start]:g}")
            start = i
    return " | ".join(parts)


def stats_rows(stats) -> list[tuple[str, str]]:
    """Readable (label, value) rows for row 0 of a Stats."""
    mib = 2**20
    return [
        ("prompt tokens", str(stats.prompt_tokens[0])),
        ("tokens per layer", _runs([row[0] for row in stats.tokens_per_layer])),
        ("KV kept per layer", _runs([row[0] for row in stats.kv_kept_per_layer])),
        (
            "cache full / kept",
            f"{stats.cache_bytes_full / mib:.2f} MiB / {stats.cache_bytes_kept / mib:.2f} MiB",
        ),
        ("prefill", f"{stats.prefill_seconds:.2f} s"),
        ("decode", f"{stats.decode_seconds_per_token * 1e3:.1f} ms/token"),
    ]


def _side_by_side(columns: dict[str, list[tuple[str, str]]]) -> str:
    labels = [label for label, _ in next(iter(columns.values()))]
    table = [["", *columns]] + [
        [label, *(col[i][1] for col in columns.values())] for i, label in enumerate(labels)
    ]
    widths = [max(len(row[c]) for row in table) for c in range(len(table[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in table)


def demo(args: argparse.Namespace) -> None:
    from kvpress_like.models import load_smollm2
    from kvpress_like.passkey import found_key, passkey_prompt
    from kvpress_like.pipeline import pipeline

    model, tokenizer = load_smollm2()
    prompt = passkey_prompt(tokenizer, args.tokens, args.depth, args.seed)
    columns = {}
    for name in (args.strategy, "full"):
        pipe = pipeline(
            model, name, tokenizer=tokenizer, max_new_tokens=args.max_new_tokens, chat_template=False
        )
        out = pipe(prompt.text)
        verdict = "found" if found_key(out.text, prompt.key) else "missed"
        columns[name] = [
            ("answer", repr(out.text.strip())),
            ("passkey", f"{prompt.key} {verdict}"),
            *stats_rows(out.stats),
        ]
    print(
        f"SmolLM2-135M-Instruct, passkey {prompt.key} at depth {prompt.depth:.0%} of a "
        f"{columns['full'][2][1]}-token prompt\n"
    )
    print(_side_by_side(columns))


def run(args: argparse.Namespace) -> None:
    from kvpress_like.pipeline import Pipeline, pipeline

    overrides = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
    if args.config:
        pipe = Pipeline.from_config(args.config, args.model, **overrides)
    else:
        pipe = pipeline(args.model, args.strategy, **overrides)
    text = Path(args.prompt_file).read_text()
    out = pipe(text)
    print(out.text)
    print()
    print(
        _side_by_side({args.strategy if not args.config else Path(args.config).name: stats_rows(out.stats)})
    )


def strategies(_: argparse.Namespace) -> None:
    from kvpress_like.plugins import describe_strategies

    infos = describe_strategies()
    width = max(len(info.name) for info in infos)
    for info in infos:
        print(f"{info.name:{width}}  {info.description}  [{info.source}]")


def config_reference(_: argparse.Namespace) -> None:
    from kvpress_like.reference import config_reference

    print(config_reference(), end="")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvpress-like", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "demo", help="passkey retrieval on SmolLM2-135M-Instruct: a strategy next to the full cache"
    )
    p.add_argument("--strategy", default="fastkv")
    p.add_argument("--tokens", type=_positive_int, default=1000, help="prompt length in tokens")
    p.add_argument("--depth", type=_fraction, default=0.5, help="needle depth, 0 (start) to 1 (end)")
    p.add_argument("--seed", type=int, default=0, help="chooses the passkey")
    p.add_argument("--max-new-tokens", type=_positive_int, default=12)
    p.set_defaults(func=demo)

    p = sub.add_parser("run", help="run any model on a prompt file")
    p.add_argument("--model", required=True, help="HF name or path, or 'smollm2'")
    p.add_argument("--config", help="YAML or TOML pipeline config")
    p.add_argument("--strategy", default="fastkv", help="used when no --config is given")
    p.add_argument("--prompt-file", required=True)
    p.add_argument("--max-new-tokens", type=_positive_int)
    p.set_defaults(func=run)

    p = sub.add_parser("strategies", help="list installed strategies")
    p.set_defaults(func=strategies)

    p = sub.add_parser("config-reference", help="print the settings of every strategy (docs/config.md)")
    p.set_defaults(func=config_reference)

    from kvpress_like.evaluate import add_eval_parser

    add_eval_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
