"""``kvpress-like eval``: its arguments, checked before any model loads, and the run.

Kept apart from ``harness.py`` (the harness itself) so that building the CLI's parser imports
neither torch nor transformers (nor matplotlib, which only the plots need).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

from kvpress_like.arguments import (
    bounded,
    check_device,
    check_model_arg,
    choice,
    csv,
    load_model_arg,
    local_tokenizer,
)
from kvpress_like.errors import ConfigError
from kvpress_like.eval import harness
from kvpress_like.eval.harness import DEFAULT_TASKS, EvalResult, StrategySpec, check_plotting, evaluate
from kvpress_like.eval.haystacks import DEFAULT_HAYSTACK, HAYSTACKS
from kvpress_like.eval.passkey import passkey_prompt
from kvpress_like.eval.tasks import GENERATORS, MAX_NEW_TOKENS, TASKS, sample_seed


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``kvpress-like eval`` on an argparse subparsers object.

    Argument checks that need no model happen here; ``run_eval`` checks the rest (strategies,
    lengths against the tokenizer) before it loads the model.
    """
    p = subparsers.add_parser(
        "eval",
        help="accuracy harness: strategies x budgets x tasks x lengths, resumable JSONL + summary + plots",
        description=harness.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="smollm2", help="HF name or path, or 'smollm2' (default)")
    p.add_argument(
        "--strategies",
        type=str,
        default="full,fastkv,snapkv",
        help="comma-separated specs NAME[:K=V[:K=V]], e.g. full,fastkv:tsp=0.2,snapkv:window=4",
    )
    p.add_argument(
        "--budgets",
        type=csv(bounded(float, 0, 1, low_open=True)),
        default=[0.1, 0.2],
        help="retain rates in (0, 1], e.g. 0.1,0.2",
    )
    p.add_argument("--lengths", type=csv(bounded(int, 1)), default=[1024], help="prompt lengths in tokens")
    p.add_argument(
        "--tasks", type=csv(choice(TASKS)), default=list(DEFAULT_TASKS), help=f"among {','.join(TASKS)}"
    )
    p.add_argument("--samples", type=bounded(int, 1), default=4, help="samples per task and length")
    p.add_argument(
        "--haystack",
        choices=list(HAYSTACKS),
        default=DEFAULT_HAYSTACK,
        help="text the needles hide in: essays (prose) or code (Python's standard library)",
    )
    p.add_argument(
        "--batch", type=bounded(int, 1), default=1, help="samples per pipeline call (more: faster on a GPU)"
    )
    p.add_argument("--out", default="eval_results", help="output folder (records.jsonl is resumed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fidelity-steps", type=bounded(int, 1), default=MAX_NEW_TOKENS["fidelity"])
    p.add_argument("--max-new-tokens", type=bounded(int, 1), help="override the per-task default")
    p.add_argument("--no-plots", action="store_true", help="skip the plots (the only use of matplotlib)")
    p.add_argument(
        "--device", help="run on this device, e.g. cuda or cuda:1 (default: where the model loads, cpu)"
    )
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="cast the model (default: as it loads)"
    )
    p.set_defaults(func=run_eval)
    return p


def add_merge_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``kvpress-like eval-merge RUN [RUN...] --out OUT``."""
    from kvpress_like.eval import merge

    p = subparsers.add_parser(
        "eval-merge",
        help="merge the records of eval runs made apart (same model, dtype, device type) + summary + plots",
        description=merge.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", help="folders of `kvpress-like eval` runs")
    p.add_argument("--out", required=True, help="folder of the merged records")
    p.add_argument("--no-plots", action="store_true", help="skip the plots (the only use of matplotlib)")
    p.set_defaults(func=run_merge)
    return p


def run_merge(args: argparse.Namespace) -> EvalResult:
    from kvpress_like.eval.merge import merge_runs

    result = merge_runs(args.runs, args.out, plots=not args.no_plots)
    print(result.summary, end="")
    print(f"{len(result.records)} record(s) merged; files:")
    for f in result.files:
        print(f"  {f}")
    return result


def check_strategies(text: str) -> list[str]:
    """The specs of ``--strategies``: parsed, installed, and naming only settings they have."""
    from importlib.metadata import entry_points

    from kvpress_like.plugins import ENTRY_POINT_GROUP, load_strategy_class

    specs = [s.strip() for s in text.split(",") if s.strip()]
    if not specs:
        raise ConfigError(f"--strategies: must name at least one strategy (got {text!r})")
    installed = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    for text_spec in specs:
        spec = StrategySpec.parse(text_spec)
        if spec.name not in installed:
            raise ConfigError(
                f"--strategies: {spec.name!r} is not an installed strategy, these are: "
                f"{', '.join(installed)} (got {text_spec!r})"
            )
        fields = load_strategy_class(spec.name).Config.model_fields  # a broken plugin: ConfigError
        unknown = [key for key in spec.settings if key not in fields]
        if unknown:
            # Every record would be skipped for it; other refusals depend on budget and length.
            raise ConfigError(
                f"--strategies: {spec.name} has no setting {', '.join(map(repr, unknown))}, its settings "
                f"are {', '.join(fields) or 'none'} (got {text_spec!r})"
            )
    return specs


_TOO_SHORT = re.compile(r"(\d+) tokens \(got 0\)")


def min_prompt_tokens(tokenizer, task: str, seed: int, haystack: str = DEFAULT_HAYSTACK) -> int:
    """The fewest tokens a task's prompt can have with this tokenizer: its instruction, needles and
    question around no context (passkey: one filler sentence). A shorter target would silently give
    a longer prompt (passkey) or fail halfway through a run (the others)."""
    if task == "passkey":
        return len(tokenizer(passkey_prompt(tokenizer, 0, 0.5, seed).text)["input_ids"])
    try:
        GENERATORS[task](tokenizer, 0, 0.5, seed, haystack=haystack)
    except ValueError as exc:  # tasks._fit: "... question, N tokens (got 0)"
        match = _TOO_SHORT.search(str(exc))
        if match is None:
            raise
        return int(match.group(1))
    return 0


def check_lengths(
    tokenizer,
    tasks: Sequence[str],
    lengths: Sequence[int],
    samples: int,
    seed: int,
    haystack: str = DEFAULT_HAYSTACK,
) -> None:
    """Refuse lengths a task cannot build, with the samples' own seeds (keys vary in length)."""
    for task in tasks:
        for length in lengths:
            need = max(
                min_prompt_tokens(tokenizer, task, sample_seed(seed, task, length, i), haystack)
                for i in range(samples)
            )
            if length < need:
                raise ConfigError(
                    f"--lengths: {task} needs at least {need} tokens with this model's tokenizer "
                    f"(got {length})"
                )


def _check_out(out: str) -> None:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out: must be a directory, not a file (got {out!r})")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"--out: must be a directory that can be created, {exc.strerror} (got {out!r})"
        ) from None


def run_eval(args: argparse.Namespace) -> EvalResult:
    # Everything that can be checked without the model is, first: loading it is the slow part.
    if not args.no_plots:  # a core install without the eval extra: say so now, not after the run
        check_plotting(skip="pass --no-plots")
    check_model_arg(args.model)
    strategies = check_strategies(args.strategies)
    checked = local_tokenizer(args.model)
    if checked is not None:
        check_lengths(checked, args.tasks, args.lengths, args.samples, args.seed, args.haystack)
    device = check_device(args.device)
    _check_out(args.out)
    model, tokenizer = load_model_arg(args.model)
    if device is not None or args.dtype:
        import torch

        model = model.to(device=device, dtype=getattr(torch, args.dtype) if args.dtype else None)
    if checked is None:  # a Hub download or the first SmolLM2 conversion: its tokenizer came with it
        check_lengths(tokenizer, args.tasks, args.lengths, args.samples, args.seed, args.haystack)
    result = evaluate(
        model,
        tokenizer,
        strategies=strategies,
        budgets=args.budgets,
        tasks=args.tasks,
        lengths=args.lengths,
        samples=args.samples,
        seed=args.seed,
        out=args.out,
        model_name=args.model,
        fidelity_steps=args.fidelity_steps,
        max_new_tokens=args.max_new_tokens,
        plots=not args.no_plots,
        haystack=args.haystack,
        batch=args.batch,
    )
    print(result.summary, end="")
    print(f"{result.computed} record(s) computed, {result.reused} reused; files:")
    for f in result.files:
        print(f"  {f}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kvpress_like.eval`` / ``benchmarks/accuracy.py``: the same as ``kvpress-like eval``."""
    import sys

    from kvpress_like.cli import main as cli_main

    return cli_main(["eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
