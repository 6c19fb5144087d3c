"""Keep-everything settings must reproduce the full cache and plain ``model.generate``."""

from __future__ import annotations

import pytest
import torch

from kvpress_like import pipeline

NEW_TOKENS = 8
KEEP_ALL = {"full": {}, "fastkv": {"tsp_rate": 1.0, "retain_rate": 1.0, "window": 4}}
# fp32 on CPU: our SDPA calls see the same numbers as transformers' in a different grouping.
LOGIT_TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def _batch(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """Left-padded ids and mask for rows of the given lengths, and the rows themselves."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, 256, (len(lengths), width), generator=gen)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, width - n :] = 1
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask, [ids[i, width - n :].tolist() for i, n in enumerate(lengths)]


@pytest.mark.parametrize("strategy", sorted(KEEP_ALL))
@pytest.mark.parametrize("lengths", [[40], [40, 33, 15]], ids=["batch1", "batch3-left-padded"])
def test_keep_everything_matches_generate(family_model, strategy, lengths):
    ids, mask, rows = _batch(lengths)
    expected = family_model.generate(
        ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
    )[:, ids.shape[1] :]
    assert len(set(expected.flatten().tolist())) > 2, "degenerate reference: the test would prove little"

    pipe = pipeline(
        family_model, strategy, max_new_tokens=NEW_TOKENS, stop_on_eos=False, **KEEP_ALL[strategy]
    )
    out = pipe(rows)
    assert out.token_ids == expected.tolist()
    assert out.stats.tokens_per_layer == [lengths] * family_model.config.num_hidden_layers

    with torch.no_grad():
        reference_logits = family_model(ids, attention_mask=mask).logits[:, -1].float()
    context = pipe.compress(rows)
    torch.testing.assert_close(context.last_logits, reference_logits, **LOGIT_TOLERANCE)


def test_full_cache_bytes_are_counted(family_model):
    """cache_bytes_full is what every prompt token costs in every layer: check it by hand."""
    cfg = family_model.config
    _, _, rows = _batch([30, 20])
    out = pipeline(family_model, "full", max_new_tokens=1)(rows)
    head_dim = family_model.model.layers[0].self_attn.head_dim
    per_token = cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2 * 4  # K and V, fp32
    assert out.stats.cache_bytes_full == 50 * per_token
    if cfg.model_type not in ("mistral", "gemma3_text"):  # sliding layers keep only their window
        assert out.stats.cache_bytes_kept == 50 * per_token
