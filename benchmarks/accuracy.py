"""Accuracy benchmark: the same harness as ``kvpress-like eval`` (see ``kvpress_like/eval/harness.py``).

    python benchmarks/accuracy.py --model smollm2 --strategies full,fastkv,snapkv \
        --budgets 0.1,0.2 --lengths 1024 --samples 4 --tasks passkey,niah_single,fidelity --out /tmp/eval
"""

from __future__ import annotations

import sys

from kvpress_like.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
