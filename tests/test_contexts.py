"""Saved contexts: a round trip is bit-exact, continuing a loaded context is continuing the one in
memory (the reference), and every damaged or foreign file is refused with the file and the field.

Bad files are written here with safetensors directly and a checksum re-derived from the format in
``docs/contexts.md`` (not with the library's writer), so the reader is tested against the spec.
"""

from __future__ import annotations

import functools
import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from kvpress_like import Context, ContextFileError, pipeline
from kvpress_like.cache import PackedLayerCache

from conftest import TINY_FASTKV, char_tokenizer_fast, random_rows, tiny_model

ROOT = Path(__file__).parents[1]
SMALL_BUDGETS = {
    "fastkv": TINY_FASTKV,
    "snapkv": dict(retain_rate=0.3, window=4),
    "adakv": dict(retain_rate=0.3, window=4),
    "pyramidkv": dict(retain_rate=0.3, window=4),
    "streamingllm": dict(retain_rate=0.4, window=4, sink_tokens=2),
    "h2o": dict(retain_rate=0.3, window=4),
    "gemfilter": dict(filter_layer=1, retain_rate=0.3, window=4),
    "full": {},
}
HYPOTHESIS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def _model():
    return tiny_model("llama")


@functools.cache
def _pipe(strategy: str = "fastkv", decode: str = "eager"):
    return pipeline(
        _model(), strategy, tokenizer=char_tokenizer_fast(), max_new_tokens=6, stop_on_eos=False,
        decode=decode, **SMALL_BUDGETS[strategy],
    )  # fmt: skip


@functools.cache
def _saved(folder: str) -> tuple[Path, Context]:
    """One saved context of two rows of different lengths, packed layers and a question's tail."""
    context = _pipe().extend(_pipe().compress(random_rows([44, 29], seed=5)), [[7, 8, 9], [10, 11, 12]])
    path = Path(folder) / "two-rows.kvc"
    context.save(path)
    return path, context


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, Context]:
    return _saved(str(tmp_path_factory.mktemp("saved")))


def _spec_checksum(tensors: dict[str, torch.Tensor], text: str) -> str:
    """SHA-256 over one line per tensor, by name: ``name|dtype|shape|`` and the SHA-256 of its raw
    bytes, then the metadata JSON."""
    lines = []
    for name in sorted(tensors):
        tensor = tensors[name].contiguous().clone()
        raw = hashlib.sha256(bytes(tensor.untyped_storage())).hexdigest()
        lines.append(f"{name}|{tensor.dtype}|{list(tensor.shape)}|{raw}\n")
    return hashlib.sha256(("".join(lines) + text).encode()).hexdigest()


def _rewrite(source: Path, target: Path, tensors_edit=None, metadata_edit=None, keep_checksum=False) -> Path:
    with safe_open(source, framework="pt") as file:
        stored = file.metadata()
        tensors = {name: file.get_tensor(name).clone() for name in file.keys()}  # noqa: SIM118
    metadata = json.loads(stored["kvpress_like"])
    if tensors_edit:
        tensors_edit(tensors)
    if metadata_edit:
        metadata_edit(metadata)
    text = json.dumps(metadata)
    checksum = stored["checksum"] if keep_checksum else _spec_checksum(tensors, text)
    tensors = {name: tensor.contiguous() for name, tensor in tensors.items()}
    save_file(tensors, target, metadata={"kvpress_like": text, "checksum": checksum})
    return target


def _tensors_of(context: Context) -> list[tuple[str, torch.Tensor]]:
    out = [("logits", context.last_logits), ("ids", context.ids), ("valid", context.valid)]
    out.append(("next", context.cache.next_positions))
    for i, layer in enumerate(context.cache.layers):
        parts = vars(layer).items()
        out += [(f"{i}.{k}", v) for k, v in parts if isinstance(v, torch.Tensor)]
        if isinstance(layer, PackedLayerCache):
            out += [(f"{i}.tail.{k}", v) for k, v in vars(layer.tail).items()]
    return out


def assert_same_context(got: Context, want: Context) -> None:
    assert [type(a) for a in got.cache.layers] == [type(b) for b in want.cache.layers]
    for (name, a), (_, b) in zip(_tensors_of(got), _tensors_of(want), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), name
    assert got.stats == want.stats


# ---- round trip -------------------------------------------------------------------------------------


@HYPOTHESIS
@given(
    strategy=st.sampled_from(sorted(SMALL_BUDGETS)),
    lengths=st.lists(st.integers(24, 56), min_size=1, max_size=3),
    question=st.integers(0, 5),
)
@example(strategy="full", lengths=[30], question=0)  # dense layers
@example(strategy="adakv", lengths=[50, 30], question=2)  # packed layers with a tail
def test_round_trip_is_bit_exact(tmp_path_factory, strategy, lengths, question):
    pipe = _pipe(strategy)
    context = pipe.compress(random_rows(lengths, seed=sum(lengths)))
    if question:
        context = pipe.extend(context, [list(range(3, 3 + question))] * len(lengths))
    path = context.save(tmp_path_factory.mktemp("rt") / "c.kvc")
    loaded = Context.load(path, _pipe("snapkv"))  # another strategy's pipeline on the same model
    assert_same_context(loaded, context)
    assert loaded.origin["strategy"]["name"] == strategy


def test_both_layouts_occur_and_survive(tmp_path):
    dense = _pipe("full").compress(random_rows([30]))
    packed = _pipe("adakv").compress(random_rows([50, 30]))
    assert not any(isinstance(lc, PackedLayerCache) for lc in dense.cache.layers)
    assert all(isinstance(lc, PackedLayerCache) for lc in packed.cache.layers)
    for i, context in enumerate((dense, packed)):
        assert_same_context(Context.load(context.save(tmp_path / f"{i}.kvc"), _pipe()), context)


# ---- continuing from a loaded context -----------------------------------------------------------------


@pytest.mark.parametrize("decode", ["eager", "static"])
@pytest.mark.parametrize("lengths", [[45], [52, 31]])
def test_loaded_continues_exactly_as_in_memory(tmp_path, decode, lengths):
    maker, reader = _pipe("fastkv", decode), _pipe("snapkv", decode)
    context = maker.compress(random_rows(lengths, seed=9))
    loaded = Context.load(context.save(tmp_path / "c.kvc"), reader)
    assert maker.generate(context=context).token_ids == reader.generate(context=loaded).token_ids
    questions = [[[20, 21]] * len(lengths), [[30, 31, 32, 33]] * len(lengths), [[40]] * len(lengths)]
    before = [t.clone() for _, t in _tensors_of(loaded)]
    for question in questions:  # many questions in turn, each from the same context
        want = maker.generate(question, context=context, do_sample=True, seed=3).token_ids
        assert reader.generate(question, context=loaded, do_sample=True, seed=3).token_ids == want
    assert all(torch.equal(a, b) for a, (_, b) in zip(before, _tensors_of(loaded), strict=True))


def test_load_onto_a_device_and_move(tmp_path):
    context = _pipe().compress(random_rows([40]))
    loaded = Context.load(context.save(tmp_path / "c.kvc"), _pipe(), device="cpu")
    assert loaded.source == _pipe().source and loaded.last_logits.device.type == "cpu"
    assert loaded.to("cpu").source["device"] == "cpu"


# ---- bad files ----------------------------------------------------------------------------------------


def _refused(path: Path, *expected: str, pipe=None) -> str:
    with pytest.raises(ContextFileError) as info:
        Context.load(path, pipe or _pipe())
    message = str(info.value)
    assert str(path) in message
    for part in expected:
        assert part in message, message
    return message


def test_other_model_config_weights_or_tokenizer_are_refused(saved, tmp_path):
    path, _ = saved
    other_config = pipeline(tiny_model("qwen2"), "full", tokenizer=char_tokenizer_fast())
    _refused(path, "model:", "model_type is 'llama', here 'qwen2'", pipe=other_config)
    other_weights = pipeline(tiny_model("llama", seed=1), "full", tokenizer=char_tokenizer_fast())
    _refused(path, "model:", "other weights", pipe=other_weights)
    wider = char_tokenizer_fast()
    wider.add_tokens(["<extra>"])
    _refused(path, "tokenizer:", "vocabulary", pipe=pipeline(_model(), "full", tokenizer=wider))


def test_newer_format_and_not_a_context_are_refused(saved, tmp_path):
    path, _ = saved
    newer = _rewrite(path, tmp_path / "v2.kvc", metadata_edit=lambda m: m.update(format_version=2))
    _refused(newer, "format_version", "at most 1", "upgrade")
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, plain)
    _refused(plain, "format", "not a kvpress_like context")
    _refused(tmp_path / "absent.kvc", "no such file")


def _valid_slot(tensors: dict[str, torch.Tensor], layer: int = 0) -> tuple:
    """(row, head, slot) of the first valid dense entry of a layer's tail, or of its prefix index."""
    return tuple(tensors[f"layers.{layer}.tail.valid"].nonzero()[0].tolist())


BAD_TENSORS = {
    "missing": (lambda t: t.pop("layers.1.values"), ["'layers.1.values'", "missing"]),
    "extra": (lambda t: t.update(extra=torch.zeros(1)), ["'extra'", "must not be"]),
    "shape": (lambda t: t.update({"layers.0.keys": t["layers.0.keys"][:, :-1]}), ["layers.0.keys", "shape"]),
    "dtype": (lambda t: t.update({"layers.2.values": t["layers.2.values"].double()}), ["dtype", "float32"]),
    "logits dtype": (lambda t: t.update(last_logits=t["last_logits"].half()), ["last_logits", "dtype"]),
    "position past the row": (
        lambda t: t["layers.0.tail.positions"].__setitem__(_valid_slot(t), 10_000),
        ["layers.0", "must lie in [0"],
    ),
    "position repeated": (
        lambda t: t["layers.3.flat_positions"].__setitem__(1, t["layers.3.flat_positions"][0]),
        ["layers.3.flat_positions", "increase"],
    ),
    "nan key": (lambda t: t["layers.1.keys"].__setitem__(0, float("nan")), ["layers.1.keys", "finite"]),
    "inf value in tail": (
        lambda t: t["layers.2.tail.values"].__setitem__(_valid_slot(t, 2), float("inf")),
        ["layers.2.tail.values", "finite"],
    ),
    "index": (
        lambda t: t["layers.0.index"].__setitem__(tuple((t["layers.0.index"] > 0).nonzero()[0]), 0),
        ["layers.0.index"],
    ),
    "ids out of vocabulary": (lambda t: t["ids"].__setitem__((0, -1), 999), ["'ids'", "vocabulary"]),
    "lengths": (lambda t: t["next_positions"].__setitem__(0, 3), ["next_positions"]),
}


@pytest.mark.parametrize("case", sorted(BAD_TENSORS))
def test_bad_tensors_are_refused(saved, tmp_path, case):
    path, _ = saved
    edit, expected = BAD_TENSORS[case]
    _refused(_rewrite(path, tmp_path / "bad.kvc", tensors_edit=edit), *expected)


def test_checksum_catches_an_edit_that_keeps_the_file_well_formed(saved, tmp_path):
    path, _ = saved
    nudge = lambda t: t["layers.0.keys"].__setitem__(0, t["layers.0.keys"][0] + 1e-3)  # noqa: E731
    _refused(_rewrite(path, tmp_path / "x.kvc", nudge, keep_checksum=True), "checksum", "damaged")


@HYPOTHESIS
@given(data=st.data())
def test_truncated_files_are_refused(saved, tmp_path_factory, data):
    path, _ = saved
    raw = path.read_bytes()
    cut = data.draw(st.integers(0, len(raw) - 1), label="cut")
    target = tmp_path_factory.mktemp("cut") / "c.kvc"
    target.write_bytes(raw[:cut])
    _refused(target)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_flipped_bits_anywhere_are_refused(saved, tmp_path_factory, data):
    path, _ = saved
    raw = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    # half the flips in the header (lengths, JSON, metadata, checksum), half in the tensors
    where = data.draw(st.one_of(st.integers(0, header - 1), st.integers(header, len(raw) - 1)), label="at")
    raw[where] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    target = tmp_path_factory.mktemp("flip") / "c.kvc"
    target.write_bytes(bytes(raw))
    _refused(target)


def test_a_refused_load_changes_nothing(saved, tmp_path):
    path, context = saved
    want = _pipe().generate(context=context).token_ids
    before = path.read_bytes()
    _rewrite(path, tmp_path / "bad.kvc", metadata_edit=lambda m: m.update(format_version=9))
    with pytest.raises(ContextFileError):
        Context.load(tmp_path / "bad.kvc", _pipe())
    assert path.read_bytes() == before and _pipe().generate(context=context).token_ids == want


# ---- writing ------------------------------------------------------------------------------------------

WRITER = """
import resource, signal, sys
sys.path.insert(0, {tests!r})
from conftest import random_rows, tiny_model
from kvpress_like import pipeline
context = pipeline(tiny_model("llama"), "full").compress(random_rows([200, 150]))
# Python ignores SIGXFSZ (the write then fails with an error); "killed" restores the default
signal.signal(signal.SIGXFSZ, signal.SIG_DFL if sys.argv[1] == "killed" else signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # the file cannot be written whole
context.save(sys.argv[2])
"""


@pytest.mark.parametrize("how", ["killed", "error"])
def test_an_interrupted_save_leaves_the_old_file_or_none(tmp_path, how):
    script = WRITER.format(tests=str(ROOT / "tests"))
    fresh, existing = tmp_path / "fresh.kvc", tmp_path / "existing.kvc"
    existing.write_bytes(b"an earlier context")
    for target in (fresh, existing):
        done = subprocess.run([sys.executable, "-c", script, how, str(target)], capture_output=True)
        if how == "killed":
            assert done.returncode == -signal.SIGXFSZ, done.stderr.decode()
        else:
            assert done.returncode == 1 and b"OSError" in done.stderr, done.stderr.decode()
    assert not fresh.exists()
    assert existing.read_bytes() == b"an earlier context"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    if how == "error":
        assert leftovers == []
    assert all(name.startswith(".") for name in leftovers)  # a killed writer leaves a hidden one


def test_save_refuses_bad_targets_before_writing(tmp_path, saved):
    _, context = saved
    with pytest.raises(ValueError, match="path: must be a file name"):
        context.save(tmp_path)
    with pytest.raises(ValueError, match="its folder must exist"):
        context.save(tmp_path / "absent" / "c.kvc")
    assert list(tmp_path.iterdir()) == []


# ---- the command-line pair --------------------------------------------------------------------------


def test_cli_compress_then_ask_matches_the_pipeline(smollm2, tmp_path, capsys):
    from kvpress_like.cli import main
    from kvpress_like.eval.passkey import _template, passkey_prompt

    model, tokenizer = smollm2
    question = _template()["question"]
    document = passkey_prompt(tokenizer, 1000, 0.5, seed=4).text.removesuffix(question)
    (tmp_path / "doc.txt").write_text(document)
    output = tmp_path / "doc.kvc"
    assert main(["compress", str(tmp_path / "doc.txt"), "-o", str(output)]) == 0
    printed = capsys.readouterr().out
    assert f"{output.stat().st_size / 2**20:.2f} MiB on disk" in printed, printed

    pipe = pipeline(model, "fastkv", tokenizer=tokenizer, max_new_tokens=8)
    context = pipe.compress(document)
    answers = [pipe.generate(q, context=context).text for q in (question, " Repeat the pass key:")]
    assert main(["ask", str(output), question, " Repeat the pass key:", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    assert printed.index(answers[0].strip()) < printed.index("> " + " Repeat the pass key:"), printed
    assert answers[1].strip() in printed.split("Repeat the pass key:")[-1], printed


def test_cli_ask_refuses_a_bad_file_in_one_line(tmp_path, capsys):
    from kvpress_like.cli import main

    (tmp_path / "bad.kvc").write_bytes(b"not a context")
    assert main(["ask", str(tmp_path / "bad.kvc"), "question?"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "bad.kvc" in err and len(err.splitlines()) == 1, err
