"""What a run's records were made with (``environment.json`` next to ``records.jsonl``), so that
two runs can be compared, and a resumed run never mixes records made differently."""

from __future__ import annotations

import json
import logging
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from kvpress_like.errors import ConfigError

logger = logging.getLogger("kvpress_like")

# Records made with another value of these differ numerically: never mixed in one folder.
MUST_MATCH = ("model", "dtype", "device_type")


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _commit() -> str:
    """The library's git commit (``+dirty`` with uncommitted changes), or "unknown" outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True)  # fmt: skip
    except OSError:
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment(model: Any, model_name: str) -> dict[str, str]:
    import torch
    import transformers

    weight = model.get_input_embeddings().weight
    return {
        "model": model_name,
        "dtype": str(weight.dtype).removeprefix("torch."),
        "device_type": weight.device.type,
        "device": torch.cuda.get_device_name(weight.device)
        if weight.device.type == "cuda"
        else platform.processor() or platform.machine(),
        "library_version": _version("kvpress-like"),
        "commit": _commit(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def record_environment(out: Path, current: dict[str, str]) -> None:
    """Write ``environment.json``; refuse to add records to a folder whose records were made with
    another model, dtype or device type; log when only the library differs. A resumed run whose
    environment differs otherwise keeps the earlier one(s) under ``earlier``."""
    path = out / "environment.json"
    if path.exists():
        before = json.loads(path.read_text())
        differs = [
            f"{key} {before.get(key)!r}, here {current[key]!r}"
            for key in MUST_MATCH
            if before.get(key) != current[key]
        ]
        if differs:
            raise ConfigError(
                f"--out: its records were made with {'; '.join(differs)}; use another folder so that "
                f"the two runs' records stay apart (got {str(out)!r})"
            )
        if before.get("commit") != current["commit"]:
            logger.warning("%s: records so far came from kvpress_like %s, this run is %s",
                           out, before.get("commit"), current["commit"])  # fmt: skip
        earlier = before.pop("earlier", [])
        if before != current:  # what made the records so far stays on record, oldest first
            current = {**current, "earlier": [*earlier, before]}
        elif earlier:
            current = {**current, "earlier": earlier}
    path.write_text(json.dumps(current, indent=1) + "\n")
