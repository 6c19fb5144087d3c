"""Shared fixtures: random-weight tiny models of every supported family, and the real SmolLM2."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 256
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    initializer_range=0.2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# A wide init makes random models sensitive to positions and far from uniform attention.
# Sliding windows are small on purpose, so that prompts of a few dozen tokens exercise them.
FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**COMMON, sliding_window=24)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=16)),
    "phi3": lambda: Phi3ForCausalLM(Phi3Config(**COMMON)),
    # Gemma3 scales embeddings by sqrt(hidden): its default init already gives varied tokens.
    "gemma3": lambda: Gemma3ForCausalLM(
        Gemma3TextConfig(
            **{**COMMON, "initializer_range": 0.02},
            head_dim=16,
            sliding_window=12,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        )
    ),
}


# FastKV settings that compress the tiny models' four layers and prompts of a few dozen tokens.
TINY_FASTKV = dict(tsp_layer=1, tsp_rate=0.5, retain_rate=0.25, window=4)


def random_rows(lengths: list[int], seed: int = 3) -> list[list[int]]:
    """Prompts of these lengths, random ids from the tiny models' vocabulary (no special tokens)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=gen).tolist() for n in lengths]


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = FAMILIES[family]()
    model.config._attn_implementation = "sdpa"
    return model.eval()


class CharTokenizer:
    """One token per ASCII character (ids < 128, so within the tiny models' 256), BOS 1, EOS 2."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [ord(c) if 3 <= ord(c) < 128 else ord("?") for c in text]
        return {"input_ids": [self.bos_token_id, *ids] if add_special_tokens else ids}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i < 3))


@pytest.fixture
def fresh_dynamo():
    """No compiled step comes in from an earlier test, and none leaves for a later one."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(params=sorted(FAMILIES))
def family_model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def smollm2():
    from kvpress_like.models import load_smollm2

    return load_smollm2()


def char_tokenizer_fast():
    """A real transformers tokenizer (``PreTrainedTokenizerFast``), one token per character with id
    ``ord(c)`` (3-255), <pad> 0, <s> 1, </s> 2: what streamers and stop strings need."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(i): i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def torchrun(nprocs: int = 2) -> list[str]:
    """The command that launches ``nprocs`` local ranks (gloo on CPU) on a free port."""
    import socket
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nprocs),
            "--master-addr", "127.0.0.1", "--master-port", str(port)]  # fmt: skip
