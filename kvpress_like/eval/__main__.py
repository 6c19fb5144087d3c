"""``python -m kvpress_like.eval ARGS``: the same as ``kvpress-like eval ARGS``."""

from kvpress_like.eval.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
