"""``kvpress-like``: the demo on the embedded model, any model from a config file, and the strategy list."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from kvpress_like.arguments import (
    bounded,
    check_device,
    check_model_arg,
    csv,
    load_model_arg,
    read_prompt_file,
)
from kvpress_like.errors import ConfigError

# Nothing heavy at module level: ``kvpress-like --help`` must not import torch or transformers
# (seconds); every command imports what it needs when it runs.

logger = logging.getLogger("kvpress_like")

EXIT_USER_ERROR = 2  # as argparse uses for usage errors


class ArgumentParser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error of the CLI (``--help`` shows the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


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


def _check_settings(strategy: str, settings: dict[str, Any], generation: dict[str, Any]) -> None:
    """Validate a strategy, its settings and the generation settings as a pipeline will, before a
    model is loaded (which is the slow part)."""
    from transformers import GenerationConfig

    from kvpress_like.config import EngineConfig
    from kvpress_like.plugins import strategy_config
    from kvpress_like.settings import engine_config, generation_config, split_generation

    strategy_config(strategy, settings)
    engine_kw, generation_kw = split_generation(generation)
    engine_config(EngineConfig(), engine_kw)
    generation_config(GenerationConfig(), generation_kw)


# ---- commands -----------------------------------------------------------------------------------


def demo(args: argparse.Namespace) -> None:
    _check_settings(args.strategy, {}, {})  # before the model loads (the first run converts it)

    from kvpress_like.eval.passkey import found_key, passkey_prompt
    from kvpress_like.models import load_smollm2
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
    from kvpress_like.config import load_config

    # Every input is checked before the model loads, which is the slow part.
    overrides = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
    if args.config:
        cfg = load_config(args.config)
        strategy, settings, generation = cfg.strategy, cfg.settings, {**cfg.generation, **overrides}
    else:
        strategy, settings, generation = args.strategy, {}, overrides
    text = read_prompt_file(args.prompt_file)
    check_model_arg(args.model)
    _check_settings(strategy, settings, generation)  # imports torch: after the quick checks
    model, tokenizer = load_model_arg(args.model)

    from transformers import TextStreamer

    from kvpress_like.pipeline import Pipeline, pipeline

    if args.config:
        pipe = Pipeline.from_config(args.config, model, tokenizer=tokenizer, **overrides)
    else:
        pipe = pipeline(model, strategy, tokenizer=tokenizer, **overrides)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if tokenizer else None
    out = pipe(text, streamer=streamer)  # the answer is printed as it is generated
    if streamer is None:
        print(out.token_ids[0])
    print()
    print(_side_by_side({Path(args.config).name if args.config else strategy: stats_rows(out.stats)}))


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


def _pipeline_of(args: argparse.Namespace, device=None, **engine: Any):
    """The pipeline ``--model`` and ``--config`` (else ``--strategy``) ask for, checked before the
    model loads; on ``device`` when given; ``engine`` settings on top."""
    from kvpress_like.config import load_config

    cfg = load_config(args.config) if args.config else None
    strategy, settings = (cfg.strategy, cfg.settings) if cfg else (args.strategy, {})
    check_model_arg(args.model)
    _check_settings(strategy, settings, {})
    model, tokenizer = load_model_arg(args.model)
    if device is not None:
        model = model.to(device)

    from kvpress_like.pipeline import Pipeline, pipeline

    if cfg:
        return Pipeline.from_config(args.config, model, tokenizer=tokenizer, **engine)
    return pipeline(model, strategy, tokenizer=tokenizer, **engine)


def warmup(args: argparse.Namespace) -> None:
    """Compile the decode step for these batch sizes and save torch.compile's artifacts."""
    import time

    from kvpress_like import compile_cache

    output = Path(args.output)
    if output.is_dir() or not output.parent.is_dir():
        raise ConfigError(f"-o: must name a file in an existing folder (got {args.output!r})")
    device = check_device(args.device)
    pipe = _pipeline_of(args, device, **({"prefill": args.prefill} if args.prefill else {}))
    for batch in args.batches:
        start = time.perf_counter()
        compile_cache.warm_up(pipe, [batch], args.prompt_tokens, sampling=args.sampling)
        print(f"batch {batch}: first calls {time.perf_counter() - start:.1f} s")
    print(f"{output}: {compile_cache.save(output) / 2**20:.1f} MiB of compile artifacts; load them "
          f"with compile_cache={str(output)!r} (or `compile_cache: {output}` in a config file)")  # fmt: skip


def compress(args: argparse.Namespace) -> None:
    """Prefill and compress a document once, and save the context to a file."""
    text = read_prompt_file(args.document, "document")
    output = Path(args.output)
    if output.is_dir() or not output.parent.is_dir():
        raise ConfigError(f"-o: must name a file in an existing folder (got {args.output!r})")
    pipe = _pipeline_of(args)
    context = pipe.compress(text)
    context.save(output)
    stats = context.stats
    on_disk = output.stat().st_size
    print(
        f"{output}: {stats.prompt_tokens[0]} tokens, {_size(on_disk)} on disk; a full cache takes "
        f"{_size(stats.cache_bytes_full)} ({stats.cache_bytes_full / on_disk:.1f}x the file), "
        f"{pipe.origin['strategy']['name']} kept {_size(stats.cache_bytes_kept)} of keys and values"
    )


def ask(args: argparse.Namespace) -> None:
    """Questions, in turn, to a saved context: each continues the document, which stays as it was."""
    overrides = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
    check_model_arg(args.model)
    _check_settings("full", {}, overrides)

    from kvpress_like.context_file import read_metadata

    made = read_metadata(args.context)  # a file that is no context is refused before the model loads
    logger.info("%s: %d tokens, made with %s", args.context, made.prompt_tokens[0], made.strategy.name)
    model, tokenizer = load_model_arg(args.model)

    from transformers import TextStreamer

    from kvpress_like.pipeline import Context, pipeline

    # Continuing a context compresses nothing: the strategy that made it is in the file.
    pipe = pipeline(model, "full", tokenizer=tokenizer, **overrides)
    context = Context.load(args.context, pipe)
    for question in args.questions:
        print(f"> {question}")
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if tokenizer else None
        out = pipe.generate(question, context=context, streamer=streamer)
        print() if streamer else print(out.token_ids[0])


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
    parser = ArgumentParser(prog="kvpress-like", description=__doc__)
    parser.add_argument(
        "--debug", action="store_true", help="on an error, show the full traceback instead of one line"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "demo", help="passkey retrieval on SmolLM2-135M-Instruct: a strategy next to the full cache"
    )
    p.add_argument("--strategy", default="fastkv")
    p.add_argument("--tokens", type=bounded(int, 1), default=1000, help="prompt length in tokens")
    p.add_argument(
        "--depth", type=bounded(float, 0, 1), default=0.5, help="needle depth, 0 (start) to 1 (end)"
    )
    p.add_argument("--seed", type=int, default=0, help="chooses the passkey")
    p.add_argument("--max-new-tokens", type=bounded(int, 1), default=12)
    p.set_defaults(func=demo)

    p = sub.add_parser("run", help="run any model on a prompt file")
    p.add_argument("--model", required=True, help="HF name or path, or 'smollm2'")
    p.add_argument("--config", help="YAML or TOML pipeline config")
    p.add_argument("--strategy", default="fastkv", help="used when no --config is given")
    p.add_argument("--prompt-file", required=True)
    p.add_argument("--max-new-tokens", type=bounded(int, 1))
    p.set_defaults(func=run)

    p = sub.add_parser("compress", help="prefill and compress a document once, save the context to a file")
    p.add_argument("document", help="text file of the document")
    p.add_argument("-o", "--output", required=True, help="context file to write (e.g. doc.kvc)")
    p.add_argument("--model", default="smollm2", help="HF name or path, or 'smollm2' (default)")
    p.add_argument("--config", help="YAML or TOML pipeline config (its strategy and settings)")
    p.add_argument("--strategy", default="fastkv", help="used when no --config is given")
    p.set_defaults(func=compress)

    p = sub.add_parser(
        "warmup", help="compile the decode step ahead for some batch sizes, save the compile artifacts"
    )
    p.add_argument("-o", "--output", required=True, help="artifacts file to write (e.g. decode.compile)")
    p.add_argument("--model", default="smollm2", help="HF name or path, or 'smollm2' (default)")
    p.add_argument("--config", help="YAML or TOML pipeline config (its strategy and settings)")
    p.add_argument("--strategy", default="fastkv", help="used when no --config is given")
    p.add_argument("--device", help="where the model runs, e.g. cuda (default: where it loads, cpu)")
    p.add_argument("--batches", type=csv(bounded(int, 1)), default=[1], help="batch sizes, e.g. 1,8,32")
    p.add_argument("--prompt-tokens", type=bounded(int, 1), default=1024, help="random prompt length")
    p.add_argument(
        "--prefill", choices=["eager", "compiled"], help="prefill mode (default: the config's, else eager)"
    )
    p.add_argument("--sampling", action="store_true", help="also the step that samples (top-k, top-p)")
    p.set_defaults(func=warmup)

    p = sub.add_parser("ask", help="ask questions of a saved context, one after the other")
    p.add_argument("context", help="context file from `kvpress-like compress`")
    p.add_argument("questions", nargs="+", help="each continues the document as plain text")
    p.add_argument("--model", default="smollm2", help="the model that compressed it (default 'smollm2')")
    p.add_argument("--max-new-tokens", type=bounded(int, 1))
    p.set_defaults(func=ask)

    p = sub.add_parser("strategies", help="list installed strategies")
    p.set_defaults(func=strategies)

    p = sub.add_parser("config-reference", help="print the settings of every strategy (docs/config.md)")
    p.set_defaults(func=config_reference)

    # kvpress_like.eval.cli imports neither torch nor transformers (nor matplotlib) at module level.
    from kvpress_like.eval.cli import add_eval_parser, add_merge_parser

    add_eval_parser(sub)
    add_merge_parser(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; an error the user can fix is one ``error: ...`` line and exit status 2."""
    args = build_parser().parse_args(argv)
    from kvpress_like.errors import KvpressLikeError

    try:
        args.func(args)
    # OSError: files the user named (an --out folder that cannot be made, a full disk, ...).
    except (KvpressLikeError, OSError) as exc:
        if args.debug:
            traceback.print_exc()
        else:
            print(f"error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
