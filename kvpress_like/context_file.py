"""Compressed contexts on disk: one ``.safetensors`` file of tensors plus JSON metadata.

Tensors (``B`` rows, ``T`` prompt ids, ``V`` logits, ``Hkv`` KV heads, ``D`` head size)::

    last_logits [B, V] float32   ids [B, T] int64   valid [B, T] bool   next_positions [B] int64
    layers.{i}.keys / .values [B, Hkv, S, D], .positions [B, Hkv, S] int64, .valid [B, Hkv, S] bool
        (a dense layer), or for a packed one (rows or heads keep different counts):
    layers.{i}.keys / .values [N, D], .flat_positions [N], .index / .prefix_valid [B, Hkv, S],
    layers.{i}.tail.{keys,values,positions,valid} (entries appended after prefill, dense)

Metadata: ``kvpress_like`` is the JSON of ``Metadata`` below; ``checksum`` is a SHA-256 over one
line per tensor, ``name|dtype|shape|sha256 of its bytes`` (by name), then that JSON. Reading parses
the file with safetensors (no pickle: nothing in a file is executed) and checks all of it before
returning anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

from kvpress_like.atomic import write_atomically
from kvpress_like.cache import LayerCache, PackedLayerCache
from kvpress_like.context_checks import assemble
from kvpress_like.errors import ConfigError, ContextFileError, config_error_from
from kvpress_like.identity import describe_tokenizer
from kvpress_like.results import Context, Stats

if TYPE_CHECKING:
    from kvpress_like.pipeline import Pipeline

logger = logging.getLogger("kvpress_like")

FORMAT = "kvpress_like.context"
FORMAT_VERSION = 1
METADATA_KEY, CHECKSUM_KEY = "kvpress_like", "checksum"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelRecord(_Record):
    name_or_path: str
    config_hash: str
    weights_fingerprint: str
    config: dict[str, Any]


class TokenizerRecord(_Record):
    name_or_path: str
    size: int
    vocab_hash: str
    class_: str = Field(alias="class")


class StrategyRecord(_Record):
    name: str
    settings: dict[str, Any]


class Metadata(_Record):
    format: Literal["kvpress_like.context"]
    format_version: int
    library_version: str
    saved_at: str  # ISO 8601, UTC
    model: ModelRecord
    tokenizer: TokenizerRecord
    strategy: StrategyRecord
    rows: int = Field(ge=1)
    prompt_tokens: list[int]  # tokens per row so far: each row's next position
    layouts: list[Literal["dense", "packed"]]  # per layer
    kept: list[list[list[int]]]  # valid entries [layer][row][KV head]
    stats: Stats


# ---- writing ------------------------------------------------------------------------------------


def _layer_tensors(prefix: str, layer: LayerCache | PackedLayerCache) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, value in vars(layer).items():
        if isinstance(value, LayerCache):
            out.update(_layer_tensors(f"{prefix}.{name}", value))
        else:
            out[f"{prefix}.{name}"] = value
    return out


def _tensors(context: Context) -> dict[str, torch.Tensor]:
    """Every tensor of the file, as contiguous CPU copies (cache views may share storage or be
    broadcast; safetensors stores neither)."""
    tensors = {
        "last_logits": context.last_logits,
        "ids": context.ids,
        "valid": context.valid,
        "next_positions": context.cache.next_positions,
    }
    for i, layer in enumerate(context.cache.layers):
        tensors.update(_layer_tensors(f"layers.{i}", layer))
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}


def _tensor_digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def checksum(tensors: dict[str, torch.Tensor], metadata_json: str) -> str:
    """SHA-256 over one line per tensor, by name, ``name|dtype|shape|sha256 of its bytes``, then the
    metadata JSON. The tensors are hashed on several threads (hashlib releases the GIL)."""
    names = sorted(tensors)
    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        digests = pool.map(_tensor_digest, (tensors[name].cpu() for name in names))
        lines = [
            f"{name}|{tensors[name].dtype}|{list(tensors[name].shape)}|{digest}\n"
            for name, digest in zip(names, digests, strict=True)
        ]
    return hashlib.sha256(("".join(lines) + metadata_json).encode()).hexdigest()


def _library_version() -> str:
    try:
        return version("kvpress-like")
    except PackageNotFoundError:  # run from a source tree
        return "unknown"


def save_context(context: Context, path: str | Path) -> Path:
    """Write ``context`` to ``path`` atomically: a temporary file in the same folder, flushed to
    disk, then renamed; an interrupted write leaves no file at ``path`` (at most a hidden
    ``.{name}.*.partial``, removed when the error is a Python exception)."""
    path = Path(path)
    if not isinstance(context, Context):
        raise ConfigError(f"context: must be a Context from Pipeline.compress (got {type(context).__name__})")
    if not context.origin:
        raise ConfigError("context: must come from Pipeline.compress or Context.load (it has no origin)")
    heads = context.cache.layers[0].valid.shape[1]
    total = context.origin["model"]["config"]["num_key_value_heads"]
    if heads != total:
        raise ConfigError(
            f"context: must hold every KV head to be saved (got {heads} of {total}: a tensor-parallel "
            "rank's share; saving those is not supported)"
        )
    if path.is_dir():
        raise ConfigError(f"path: must be a file name, not a folder (got {str(path)!r})")
    if not path.parent.is_dir():
        raise ConfigError(f"path: its folder must exist (got {str(path)!r})")
    tensors = _tensors(context)
    layers = context.cache.layers
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": _library_version(),
        "saved_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **context.origin,
        "rows": context.last_logits.shape[0],
        "prompt_tokens": context.cache.next_positions.tolist(),
        "layouts": ["packed" if isinstance(lc, PackedLayerCache) else "dense" for lc in layers],
        "kept": [lc.valid.sum(dim=-1).tolist() for lc in layers],
        "stats": asdict(context.stats),
    }
    text = json.dumps(metadata, sort_keys=True)
    _write_atomically(path, tensors, {METADATA_KEY: text, CHECKSUM_KEY: checksum(tensors, text)})
    return path


def _write_atomically(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    def write(partial: Path) -> None:
        try:
            save_file(tensors, partial, metadata=metadata)
        except Exception as exc:  # safetensors reports a failed write (a full disk) as its own error
            raise OSError(f"{path}: the context could not be written: {exc}") from exc

    write_atomically(path, write)


# ---- reading ------------------------------------------------------------------------------------


def _open(path: Path, tensors: bool = True) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The file's metadata and (when asked) tensors, on the CPU."""
    if not path.is_file():
        raise ContextFileError(f"{path}: no such file")
    try:
        with safe_open(path, framework="pt", device="cpu") as file:
            metadata = file.metadata() or {}
            names = file.keys() if tensors else []
            return metadata, {name: file.get_tensor(name) for name in names}
    except Exception as exc:  # safetensors' own error types differ between versions
        raise ContextFileError(
            f"{path}: must be a complete safetensors file (it is truncated or damaged: {exc})"
        ) from None


def _format(path: Path, stored: dict[str, str]) -> tuple[dict[str, Any], str]:
    """The metadata as JSON and as text, once it is known to be a context of a readable version."""
    text = stored.get(METADATA_KEY)
    try:
        raw = json.loads(text) if text is not None else None
    except json.JSONDecodeError as exc:
        raise ContextFileError(f"{path}: metadata.{METADATA_KEY}: must be JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ContextFileError(
            f"{path}: metadata.{METADATA_KEY}.format: must be {FORMAT!r}; not a kvpress_like context file"
        )
    found = raw.get("format_version")
    if not isinstance(found, int) or found < 1:
        raise ContextFileError(f"{path}: metadata.format_version: must be a positive integer (got {found!r})")
    if found > FORMAT_VERSION:
        raise ContextFileError(
            f"{path}: metadata.format_version: must be at most {FORMAT_VERSION}, the newest this "
            f"kvpress_like reads (got {found}, written by kvpress_like {raw.get('library_version')}); "
            "upgrade kvpress-like"
        )
    return raw, text


def _validated(path: Path, raw: dict[str, Any]) -> Metadata:
    try:
        return Metadata.model_validate(raw)
    except ValidationError as exc:
        raise ContextFileError(f"{path}: {config_error_from(exc, 'metadata')}") from None


def read_metadata(path: str | Path) -> Metadata:
    """A context file's metadata, without reading its tensors (quick: for a look before a model
    is loaded). ``Context.load`` checks the rest, checksum included."""
    path = Path(path)
    stored, _ = _open(path, tensors=False)
    return _validated(path, _format(path, stored)[0])


def _check_identity(path: Path, meta: Metadata, pipe: Pipeline) -> None:
    """Refuse a context another model (config or weights) or tokenizer made."""
    mine, made = pipe.origin["model"], meta.model
    if made.config_hash != mine["config_hash"]:
        differs = [
            f"{key} is {made.config.get(key)!r}, here {value!r}"
            for key, value in mine["config"].items()
            if made.config.get(key) != value
        ]
        raise ContextFileError(
            f"{path}: model: must be this pipeline's model; the context was made by "
            f"{made.name_or_path or '(unnamed)'!r} with another config: {'; '.join(differs) or made.config}"
        )
    if made.weights_fingerprint != mine["weights_fingerprint"]:
        raise ContextFileError(
            f"{path}: model: must be this pipeline's model; the context was made by "
            f"{made.name_or_path or '(unnamed)'!r}, same architecture but other weights (fingerprint "
            f"{made.weights_fingerprint}, here {mine['weights_fingerprint']})"
        )
    if made.name_or_path != mine["name_or_path"]:
        logger.info("context %s was made by the same model loaded as %r", path, made.name_or_path)
    tok = pipe.origin["tokenizer"]
    if meta.tokenizer.vocab_hash != tok["vocab_hash"]:
        theirs = describe_tokenizer(meta.tokenizer.model_dump(by_alias=True))
        raise ContextFileError(
            f"{path}: tokenizer: must be this pipeline's tokenizer; the context was made with {theirs}, "
            f"here {describe_tokenizer(tok)}"
        )


def load_context(path: str | Path, pipe: Pipeline, device: torch.device | str | None = None) -> Context:
    """A saved context, checked whole against ``pipe``'s model and tokenizer, on ``device``."""
    from kvpress_like.pipeline import Pipeline  # not at the top: pipeline imports this module's callers

    if not isinstance(pipe, Pipeline):
        raise ConfigError(f"pipe: must be a Pipeline (got {type(pipe).__name__})")
    path = Path(path)
    target = torch.device(device) if device is not None else pipe.adapter.device
    stored, tensors = _open(path)
    raw, text = _format(path, stored)
    expected = checksum(tensors, text)
    if stored.get(CHECKSUM_KEY) != expected:
        raise ContextFileError(
            f"{path}: metadata.checksum: must match the file's contents (got {stored.get(CHECKSUM_KEY)!r}, "
            f"contents hash to {expected!r}); the file is damaged"
        )
    meta = _validated(path, raw)
    _check_identity(path, meta, pipe)
    tensors = {name: tensor.to(target) for name, tensor in tensors.items()}  # checked there: a GPU is quick
    cache, logits, ids, valid = assemble(path, meta, tensors, pipe.adapter)
    origin = meta.model_dump(by_alias=True, include={"model", "tokenizer", "strategy"})
    context = Context(cache, logits, meta.stats, pipe.source, ids, valid, origin)
    return context.to(target)  # names the device in the context's source
