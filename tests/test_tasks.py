"""Task generators: deterministic, needles where asked, prompts of the target length; scoring."""

from __future__ import annotations

import pytest

from kvpress_like.eval import haystacks, tasks
from kvpress_like.eval.tasks import Sample, length_tolerance, make_samples, recall, score
from kvpress_like.models import cache_dir

from conftest import CharTokenizer


def _real_tokenizer():
    path = cache_dir() / "smollm2-135m-instruct"
    if not (path / "tokenizer.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


TOKENIZERS = [pytest.param(CharTokenizer, id="chars"), pytest.param(_real_tokenizer, id="smollm2")]
GENERATED = ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "fidelity"]


@pytest.fixture(params=TOKENIZERS)
def tokenizer(request):
    tok = request.param()
    if tok is None:
        pytest.skip("SmolLM2 not converted in the cache")
    return tok


@pytest.mark.parametrize("task", tasks.TASKS)
def test_same_seed_same_prompts_other_seed_differs(task):
    tok = CharTokenizer()
    first = make_samples(tok, task, 700, 3, seed=0)
    again = make_samples(tok, task, 700, 3, seed=0)
    other = make_samples(tok, task, 700, 3, seed=1)
    assert first == again
    assert [s.prompt for s in first] != [s.prompt for s in other]
    assert len({s.prompt for s in first}) == 3  # samples within a run differ too
    assert [s.depth for s in first] == [0.0, 0.5, 1.0]


@pytest.mark.parametrize("haystack", ["essays", "code"])
@pytest.mark.parametrize("task", GENERATED)
@pytest.mark.parametrize("target", [800, 1500])
def test_prompts_hit_the_target_length(tokenizer, task, target, haystack):
    for sample in make_samples(tokenizer, task, target, 2, seed=3, haystack=haystack):
        assert sample.haystack == haystack
        n = len(tokenizer(sample.prompt)["input_ids"])
        assert abs(n - target) <= length_tolerance(target), (task, n, target)
        assert sample.metadata["prompt_tokens"] == n


def test_passkey_length_within_one_filler_sentence(tokenizer):
    filler = len(tokenizer(" " + tasks._template_filler(), add_special_tokens=False)["input_ids"])
    for target in (600, 1500):
        sample = tasks.make_passkey(tokenizer, target, 0.5, seed=1)
        assert target - filler <= len(tokenizer(sample.prompt)["input_ids"]) <= target


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_niah_needle_sits_at_the_requested_depth(tokenizer, depth):
    sample = tasks.make_niah_single(tokenizer, 2000, depth, seed=7)
    start, end = sample.metadata["context_span"]
    needle_at = sample.metadata["needle_offsets"][0]
    context = sample.prompt[start:end]
    needle = f"One of the special magic numbers for {sample.metadata['keys'][0]} is: {sample.answers[0]}."
    assert sample.prompt[needle_at:].startswith(needle)

    def count(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    # Token offset of the needle within the context, over the context's own tokens (needle excluded).
    before = count(sample.prompt[start:needle_at])
    total = count(context.replace(needle, ""))
    assert abs(before / total - depth) <= 0.03, (before, total, depth)
    # Character offset, likewise.
    assert abs(sample.metadata["needle_depths"][0] - depth) <= 0.03


@pytest.mark.parametrize("task", ["niah_multikey", "niah_multivalue", "niah_multiquery", "vt"])
@pytest.mark.parametrize("depth", [0.2, 0.6])
def test_the_asked_needle_is_at_depth_and_all_needles_are_in(task, depth):
    sample = tasks.GENERATORS[task](CharTokenizer(), 1500, depth, seed=5)
    assert abs(sample.metadata["needle_depths"][0] - depth) <= 0.03
    for answer in sample.answers:
        assert answer in sample.prompt[: sample.metadata["context_span"][1]]
    if task == "vt":  # the chain starts at depth and every later link comes after it
        assert sample.metadata["needle_offsets"] == sorted(sample.metadata["needle_offsets"])


def test_passkey_needle_depth():
    tok = CharTokenizer()
    for depth in (0.0, 0.3, 0.5, 0.8, 1.0):
        sample = tasks.make_passkey(tok, 2000, depth, seed=2)
        intro = len("There is an important info hidden inside a lot of irrelevant text.")
        key_at = sample.metadata["needle_offsets"][0]
        share = (key_at - intro) / (len(sample.prompt) - intro)
        assert abs(share - depth) <= 0.15, (share, depth)  # filler comes in ~90-character sentences


def test_multi_tasks_have_several_answers_and_keys():
    tok = CharTokenizer()
    mk = tasks.make_niah_multikey(tok, 1000, 0.5, seed=0)
    assert len(mk.answers) == 1 and len(mk.metadata["keys"]) == 4
    for key in mk.metadata["keys"]:
        assert key in mk.prompt
    assert mk.metadata["queries"][0] in mk.prompt[mk.metadata["context_span"][1] :]
    mv = tasks.make_niah_multivalue(tok, 1000, 0.5, seed=0)
    assert len(mv.answers) == 4 and len(set(mv.answers)) == 4
    mq = tasks.make_niah_multiquery(tok, 1000, 0.5, seed=0)
    assert len(mq.answers) == 4 and all(q in mq.prompt[-300:] for q in mq.metadata["queries"])
    vt = tasks.make_vt(tok, 1000, 0.5, seed=0)
    assert len(vt.answers) == 5 and f"VAR {vt.answers[0]} = {vt.metadata['value']}." in vt.prompt


def _sample(task, answers):
    return Sample(task, 0, "", tuple(answers), 100, 0.5, 0)


def test_scoring_on_hand_made_answers():
    passkey = _sample("passkey", ["12345"])
    assert score(passkey, " 12345. Remember it.") == 1.0
    assert score(passkey, " 54321, no: 12345") == 0.0  # the first 5-digit number counts
    assert score(passkey, "no idea") == 0.0

    single = _sample("niah_single", ["4537623"])
    assert score(single, " 4537623.") == 1.0
    assert score(single, " 45376231") == 0.0  # a longer number is not the answer
    assert score(single, " 453762") == 0.0

    multi = _sample("niah_multivalue", ["1111111", "2222222", "3333333", "4444444"])
    assert score(multi, "1111111, 3333333 and 9999999") == 0.5
    assert score(multi, "4444444 3333333 2222222 1111111") == 1.0
    assert score(_sample("niah_multiquery", ["1234567", "7654321"]), "7654321") == 0.5

    vt = _sample("vt", ["HWLPX", "BOMUK", "FHRWU", "ZNBGJ", "QKTYS"])
    assert score(vt, " HWLPX, BOMUK, FHRWU, ZNBGJ, QKTYS") == 1.0
    assert score(vt, " HWLPX BOMUK and XQKTYS") == 0.4  # part of a longer name does not count
    assert recall("", ()) == 0.0
    with pytest.raises(ValueError):
        score(_sample("fidelity", []), "text")


def test_too_short_a_target_is_refused():
    with pytest.raises(ValueError, match="target_tokens"):
        tasks.make_niah_multiquery(CharTokenizer(), 300, 0.5, seed=0)


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="task"):
        make_samples(CharTokenizer(), "nope", 100, 1, 0)


@pytest.mark.parametrize("task", ["niah_multikey", "vt", "fidelity"])
def test_code_haystack_is_whole_source_lines_with_needles_on_lines_of_their_own(task):
    """Take the needle lines out of a code prompt's context: what is left is consecutive lines of
    the shipped standard-library files, as written (indentation kept)."""
    sample = tasks.GENERATORS[task](CharTokenizer(), 3000, 0.4, seed=11, haystack="code")
    start, end = sample.metadata.get("context_span", (0, len(sample.prompt)))
    context = sample.prompt[start:end]
    needles = [sample.prompt[o:].split("\n", 1)[0] for o in sample.metadata.get("needle_offsets", [])]
    for needle in needles:
        assert f"\n{needle}\n" in f"\n{context}\n"  # a line of its own
    lines = [line for line in context.split("\n") if line not in needles]
    source = "\n".join(haystacks.HAYSTACKS["code"].texts * 2)
    assert len(lines) > 50 and "\n".join(lines) in source


def test_a_fast_tokenizers_cut_is_within_a_token_of_the_longest_prefix():
    tok = _real_tokenizer()
    if tok is None:
        pytest.skip("SmolLM2 not converted in the cache")

    def count(text):
        return len(tok(text, add_special_tokens=False)["input_ids"])

    text = haystacks.HAYSTACKS["code"].texts[0][:1200] + " " + haystacks.HAYSTACKS["essays"].texts[0][:1200]
    for n in (37, 200, 411):
        longest = max(end for end in range(len(text) + 1) if count(text[:end]) <= n)  # by definition
        cut = haystacks._longest_prefix(tok, text, n, haystacks._token_ends(tok, text))
        assert count(text[:cut]) <= n and cut <= longest
        assert count(text[:cut]) >= n - 1 and count(text[:longest]) - count(text[:cut]) <= 1
