"""Decoding after eviction must use true positions (prompt length + step), not the cache length."""

from __future__ import annotations

import torch

from kvpress_like import hookimpl, pipeline

from conftest import tiny_model

PROMPT, EVICTED, NEW_TOKENS = 40, range(5, 15), 8


class EvictBlock:
    """Keeps every KV entry except the tokens at positions 5..14, in every layer and head."""

    @hookimpl
    def retain(self, layer, scores):
        evicted = (layer.positions >= EVICTED.start) & (layer.positions < EVICTED.stop)
        return (layer.valid & ~evicted)[:, None].expand(-1, layer.keys.shape[1], -1)


def _teacher_forced_greedy(model, tokens: list[int], position_shift: int) -> list[int]:
    """Greedy tokens of a plain transformers forward in which the decode queries cannot see the
    evicted tokens, and their positions are shifted by ``position_shift``."""
    total = len(tokens)
    mask = torch.ones(total, total, dtype=torch.bool).tril()
    mask[PROMPT:, EVICTED.start : EVICTED.stop] = False
    positions = torch.arange(total)
    positions[PROMPT:] -= position_shift
    with torch.no_grad():
        logits = model(
            torch.tensor([tokens]), attention_mask=mask[None, None], position_ids=positions[None]
        ).logits
    return logits[0, PROMPT - 1 :].argmax(-1).tolist()


def test_decode_after_eviction_uses_true_positions():
    model = tiny_model("llama")
    prompt = torch.randint(3, 256, (PROMPT,), generator=torch.Generator().manual_seed(3)).tolist()
    pipe = pipeline(model, "full", plugins=[EvictBlock()], max_new_tokens=NEW_TOKENS, stop_on_eos=False)
    out = pipe(prompt)
    assert out.stats.kv_kept_per_layer[0] == [PROMPT - len(EVICTED)]

    # The reference must feed what we generated (teacher forcing) so every step is compared.
    sequence = prompt + out.ids[:-1]
    assert out.ids == _teacher_forced_greedy(model, sequence, position_shift=0)
    # The same reference with positions taken from the compressed length disagrees, so the
    # assertion above would catch a pipeline that numbered decode steps that way.
    assert out.ids != _teacher_forced_greedy(model, sequence, position_shift=len(EVICTED))
