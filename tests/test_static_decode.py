"""Decoding on static buffers (the path CUDA graphs capture) matches the eager layer loop."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from kvpress_like import pipeline
from kvpress_like.decode import BUCKET

from conftest import TINY_FASTKV, random_rows, tiny_model

CONTEXT = torch.randint(3, 256, (60,), generator=torch.Generator().manual_seed(7)).tolist()
ROWS = [CONTEXT, CONTEXT[:37], CONTEXT[10:50]]
STRATEGIES = {
    "full": {},
    "fastkv": TINY_FASTKV,
    "adakv": dict(retain_rate=0.25, window=4),  # per-head budgets: packed, uneven lengths per head
}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("family", ["llama", "gemma3", "mistral"])
def test_static_buffers_decode_like_the_eager_loop(family, strategy):
    pipe = pipeline(tiny_model(family), strategy, max_new_tokens=8, stop_on_eos=False, **STRATEGIES[strategy])
    assert pipe(ROWS, decode="static").token_ids == pipe(ROWS, decode="eager").token_ids


def test_a_bucket_is_reused_across_prompts_and_continuations():
    model = tiny_model("llama")
    pipe = pipeline(model, "fastkv", max_new_tokens=6, stop_on_eos=False, **STRATEGIES["fastkv"])
    first = pipe(ROWS, decode="static").token_ids
    context = pipe.compress(ROWS)
    again = pipe.generate(context=context, decode="static").token_ids
    assert again == first
    continued = pipe.generate([[5, 6], [7], [8, 9, 10]], context=context, decode="static").token_ids
    assert continued == pipe.generate([[5, 6], [7], [8, 9, 10]], context=context, decode="eager").token_ids
    assert list(pipe._decoders.decoders) == [(3, BUCKET, False)]  # one set of buffers served all three calls


def buffer_refs(pipe, key) -> list[weakref.ref]:
    """Weak references to the static buffers of one of ``pipe``'s decoders."""
    return [weakref.ref(t) for layer in pipe._decoders.decoders[key].layers for t in vars(layer).values()]


def held_bytes(refs: list[weakref.ref]) -> int:
    """Bytes still held by the storages of those buffers that are alive."""
    return sum(t.untyped_storage().nbytes() for ref in refs if (t := ref()) is not None)


@pytest.fixture
def without_cycle_collector():
    """Python's cycle collector off: what is given back must be given back when it is dropped."""
    enabled = gc.isenabled()
    gc.collect()  # earlier tests' garbage, so that it cannot trigger a collection in this one
    gc.disable()
    yield
    if enabled:
        gc.enable()


def test_only_the_most_recently_used_decoders_are_kept(without_cycle_collector):
    """Each decoder holds a whole static cache: a pipeline serving many batch sizes or lengths
    keeps the last few and gives the others' memory back at once."""
    from kvpress_like.decode import KEPT_DECODERS

    pipe = pipeline(tiny_model("llama"), "full", max_new_tokens=3, stop_on_eos=False, decode="static")
    first = None
    for batch in range(1, KEPT_DECODERS + 3):
        pipe([[5, 6, 7, 8]] * batch)
        if first is None:
            first = buffer_refs(pipe, (1, BUCKET, False))
            assert held_bytes(first) > 0
    pipe([[5, 6, 7, 8]] * 3)  # reused, and now the most recent
    assert len(pipe._decoders.decoders) == KEPT_DECODERS
    assert list(pipe._decoders.decoders)[-1] == (3, BUCKET, False)
    assert (1, BUCKET, False) not in pipe._decoders.decoders
    assert held_bytes(first) == 0


@pytest.mark.parametrize("decode", ["static", "compiled"])
def test_closing_a_pipeline_gives_its_decoders_memory_back_at_once(decode, without_cycle_collector):
    """After ``close`` no byte of the decoders' buffers is held, without waiting for Python's cycle
    collector: a compiled step's leftovers refer to the buffers it traced, and a decoder refers to
    itself through its step. The pipeline decodes again afterwards, on new buffers."""
    pipe = pipeline(tiny_model("llama"), "full", max_new_tokens=3, stop_on_eos=False, decode=decode)
    prompts = random_rows([30, 30], seed=8)
    expected = pipe(prompts, decode="eager").token_ids
    assert pipe(prompts).token_ids == expected
    refs = buffer_refs(pipe, (2, BUCKET, decode == "compiled"))
    assert held_bytes(refs) > 0
    pipe.close()
    assert held_bytes(refs) == 0
    assert pipe(prompts).token_ids == expected


def test_symbolic_capacity_compiles_one_step_for_every_bucket(monkeypatch, fresh_dynamo):
    """With the capacity axis symbolic, prompts in three buckets share one compiled step (without
    it, the second bucket compiles again) and decode like the eager loop."""
    from torch._dynamo.utils import counters

    from kvpress_like import decode

    monkeypatch.setattr(decode, "SYMBOLIC_CAPACITY", True)
    counters.clear()
    pipe = pipeline(tiny_model("llama"), "full", max_new_tokens=3, stop_on_eos=False, decode="compiled")
    tokens = torch.randint(3, 256, (2 * BUCKET + 20,), generator=torch.Generator().manual_seed(3)).tolist()
    for length in (20, BUCKET + 20, 2 * BUCKET + 20):
        prompt = tokens[:length]
        assert pipe([prompt]).token_ids == pipe([prompt], decode="eager").token_ids
    assert [key[1] for key in pipe._decoders.decoders] == [BUCKET, 2 * BUCKET, 3 * BUCKET]
    assert counters["stats"]["unique_graphs"] == 1


def test_symbolic_batch_compiles_one_step_for_every_batch_above_one(monkeypatch, fresh_dynamo):
    """Batches of 2, 3 and 5 rows share one compiled step (each its own buffers) and decode like
    the eager loop; batch 1 adds at most one more (dynamo specialises a size of 1)."""
    from torch._dynamo.utils import counters

    from kvpress_like import decode

    monkeypatch.setattr(decode, "SYMBOLIC_BATCH", True)
    counters.clear()
    pipe = pipeline(tiny_model("llama"), "adakv", retain_rate=0.3, window=4, max_new_tokens=4,
                    stop_on_eos=False, decode="compiled")  # fmt: skip
    prompts = random_rows([40, 33, 52, 47, 29], seed=6)
    for batch in (2, 3, 5):
        assert pipe(prompts[:batch]).token_ids == pipe(prompts[:batch], decode="eager").token_ids
    assert counters["stats"]["unique_graphs"] == 1
    assert [key[0] for key in pipe._decoders.decoders] == [2, 3, 5]
    assert pipe(prompts[:1]).token_ids == pipe(prompts[:1], decode="eager").token_ids
    assert counters["stats"]["unique_graphs"] <= 2


def test_static_decode_releases_the_compressed_layers_it_copied(monkeypatch):
    """The kept entries are not held twice while decoding, nor while the buffers are made: each
    layer's buffers are made as the one before was copied in and its compressed layer dropped (a
    caller's context is cloned and stays whole)."""
    import weakref

    from kvpress_like.decode import StaticDecoder

    copied, held = [], []  # held: (layers with buffers + compressed layers left) at each new buffer
    original_load, original_buffers = StaticDecoder.load, StaticDecoder._buffers

    def load(self, cache, release=False):
        copied.extend(weakref.ref(layer.dense().keys) for layer in cache.layers)
        self.watched = cache
        original_load(self, cache, release)
        assert all(layer is None for layer in cache.layers)

    def buffers(self, index):
        made = original_buffers(self, index)
        held.append(len(self.layers) + sum(layer is not None for layer in self.watched.layers))
        return made

    monkeypatch.setattr(StaticDecoder, "load", load)
    monkeypatch.setattr(StaticDecoder, "_buffers", buffers)
    pipe = pipeline(
        tiny_model("llama"), "snapkv", retain_rate=0.5, window=4, max_new_tokens=4, decode="static"
    )
    prompts = random_rows([50, 37], seed=1)
    context = pipe.compress(prompts)
    before = [layer.dense().keys.clone() for layer in context.cache.layers]
    out = pipe.generate(context=context)
    assert out.token_ids == pipe.generate(context=context, decode="eager").token_ids
    assert all(
        torch.equal(a, layer.dense().keys) for a, layer in zip(before, context.cache.layers, strict=True)
    )
    assert copied and all(ref() is None for ref in copied)
    layers = len(context.cache.layers)
    assert held and set(held) == {layers}  # never a layer both compressed and in its buffers


def test_idle_decoders_make_room_for_a_prefill_least_recently_used_first(
    monkeypatch, without_cycle_collector
):
    """On a device short of memory, a prefill drops idle decoders, the least recently used first,
    until the call's full cache would fit, and a new decoder drops the rest; tokens are unchanged."""
    pipe = pipeline(tiny_model("llama"), "full", max_new_tokens=3, stop_on_eos=False, decode="static")
    prompt = CONTEXT[:40]
    expected = pipe([prompt] * 3, decode="eager").token_ids
    pipe([prompt])
    pipe([prompt] * 2)
    oldest = buffer_refs(pipe, (1, BUCKET, False))
    per_token = pipe.adapter.cache_bytes_per_token()
    monkeypatch.setattr(pipe.adapter, "free_memory", lambda: 3 * 40 * per_token - 1)  # a byte short
    pipe.compress([prompt] * 3)
    assert list(pipe._decoders.decoders) == [(2, BUCKET, False)]  # dropping the oldest was enough
    assert held_bytes(oldest) == 0
    # The new tokens' cache fits (the call is not refused), a new decoder's buffers do not.
    monkeypatch.setattr(pipe.adapter, "free_memory", lambda: 3 * 3 * per_token)
    assert pipe([prompt] * 3).token_ids == expected
    assert list(pipe._decoders.decoders) == [(3, BUCKET, False)]


def test_a_growing_decode_keeps_the_decoder_it_reads_from_under_memory_pressure(monkeypatch):
    from kvpress_like import decode

    monkeypatch.setattr(decode, "BUCKET", 16)  # 16-slot buckets, 16 new slots first: grows 32 -> 48
    monkeypatch.setattr(decode, "NEW_SLOTS", 16)
    pipe = pipeline(tiny_model("llama"), "full", max_new_tokens=40, stop_on_eos=False, decode="static")
    prompt = CONTEXT[:4]
    expected = pipe([prompt], decode="eager").token_ids
    per_token = pipe.adapter.cache_bytes_per_token()
    monkeypatch.setattr(pipe.adapter, "free_memory", lambda: 40 * per_token)  # 48 slots do not fit
    assert pipe([prompt]).token_ids == expected
    assert list(pipe._decoders.decoders) == [(1, 32, False), (1, 48, False)]


def test_a_growing_decode_keeps_the_decoder_it_reads_from_when_the_pool_holds_one(monkeypatch):
    """With room for one decoder, a decode that outgrows its bucket makes the next one while it still
    reads (and takes over) the first: the bound drops idle decoders only, so the first is not
    closed under it."""
    from kvpress_like import decode

    monkeypatch.setattr(decode, "KEPT_DECODERS", 1)
    monkeypatch.setattr(decode, "BUCKET", 16)  # 16-slot buckets, 16 new slots first: grows 32 -> 48
    monkeypatch.setattr(decode, "NEW_SLOTS", 16)
    pipe = pipeline(tiny_model("llama"), "full", max_new_tokens=40, stop_on_eos=False, decode="static")
    prompt = CONTEXT[:4]
    assert pipe([prompt]).token_ids == pipe([prompt], decode="eager").token_ids
    assert list(pipe._decoders.decoders) == [(1, 32, False), (1, 48, False)]


def test_a_call_the_idle_decoders_would_crowd_out_is_served_not_refused(monkeypatch):
    """A device whose memory only the pool's decoders use: with two idle decoders the new tokens'
    cache does not fit, so the call would be refused; dropping the older one makes room."""
    from kvpress_like.decode import decoder_bytes

    pipe = pipeline(tiny_model("llama"), "full", max_new_tokens=600, stop_on_eos=False, decode="static")
    prompt = CONTEXT[:40]
    expected = pipe([prompt], decode="eager").token_ids
    pipe([prompt], max_new_tokens=3)
    pipe([prompt] * 2, max_new_tokens=3)
    held = lambda: sum(decoder_bytes(pipe.adapter, *key[:2]) for key in pipe._decoders.decoders)  # noqa: E731
    per_token = pipe.adapter.cache_bytes_per_token()
    capacity = 768  # 40 prompt entries + 600 new slots in 256-slot buckets
    # Free: the new decoder's buffers less the older idle decoder's; the 600 new tokens' cache does
    # not fit that, and the new decoder fits once the older one is dropped.
    device = held() + decoder_bytes(pipe.adapter, 1, capacity) - decoder_bytes(pipe.adapter, 1, BUCKET)
    monkeypatch.setattr(pipe.adapter, "free_memory", lambda: device - held())
    assert device - held() < 600 * per_token
    assert pipe([prompt]).token_ids == expected
    assert list(pipe._decoders.decoders) == [(2, BUCKET, False), (1, capacity, False)]
