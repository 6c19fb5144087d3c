"""torch.compile's artifacts in a file, so that a fresh process (another server replica, the next
session on a fresh GPU machine) skips most of the compile of the decode step.

``warm_up`` runs a pipeline's compiled paths once per batch size; ``save`` writes what this process
compiled (``torch.compiler.save_cache_artifacts``: inductor's graphs, Triton kernels and tuning
results) atomically; ``load`` hot-loads such a file before the first compile
(``EngineConfig.compile_cache`` does it when a pipeline is built). Dynamo still traces the step in
the new process; the artifacts spare inductor's code generation and kernel tuning. Artifacts made
with another torch, GPU or model shape are simply not hits.

The file is torch's own format, which unpickles what it holds: load only files you made, as you
would run only code you trust.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from kvpress_like.atomic import write_atomically
from kvpress_like.errors import ConfigError

logger = logging.getLogger("kvpress_like")
_loaded: set[Path] = set()  # files hot-loaded in this process (once each)
_lock = threading.Lock()


def load(path: str | Path) -> bool:
    """Hot-load a file written by ``save`` (once per process); False when it does not exist yet."""
    path = Path(path).resolve()
    with _lock:
        if path in _loaded:
            return True
        if not path.is_file():
            logger.info("compile_cache %s does not exist yet: compiling from scratch", path)
            return False
        try:  # torch raises many kinds of errors for a foreign file, or logs why and returns None
            info, reason = torch.compiler.load_cache_artifacts(path.read_bytes()), "torch could not read it"
        except Exception as exc:
            info, reason = None, f"{type(exc).__name__}: {exc}"
        if info is None:
            raise ConfigError(
                f"compile_cache: must be a file written by `kvpress-like warmup` or compile_cache.save, "
                f"{reason} (got {str(path)!r})"
            )
        _loaded.add(path)
        return True


def save(path: str | Path) -> int:
    """Write this process's compile artifacts to ``path`` (atomically); returns their size."""
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None or not artifacts[0]:
        raise ConfigError(f"compile_cache: nothing was compiled in this process to save (got {str(path)!r})")
    data = artifacts[0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda partial: partial.write_bytes(data))
    return len(data)


def warm_up(
    pipe, batches: Sequence[int], prompt_tokens: int, new_tokens: int = 4, sampling: bool = False
) -> None:
    """Compile the pipeline's decode step (and its prefill, when compiled) for each batch size, on
    random prompts of ``prompt_tokens``; with ``sampling``, the step that samples too."""
    vocab = pipe.model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    for batch in batches:
        ids = torch.randint(0, vocab, (batch, prompt_tokens), generator=generator)
        settings = dict(max_new_tokens=new_tokens, stop_on_eos=False, decode="compiled")
        pipe(ids, do_sample=False, **settings)
        if sampling:
            pipe(ids, do_sample=True, top_k=50, top_p=0.9, seed=0, **settings)
