"""The transformers task "kvpress-like" (``kvpress_like/transformers_task.py``): one compression of
a context, several answers, the same tokens as the library API called directly with the same text
split (and, keeping everything, as ``model.generate`` on the whole templated prompt); registered
whichever of kvpress_like and transformers is imported first, without importing transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import kvpress_like
from kvpress_like.errors import ConfigError

from conftest import TINY_FASTKV, tiny_model

ROOT = Path(__file__).parents[1]

# One user turn of this template is HEAD + message + TAIL (written out by hand: the reference).
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
HEAD, TAIL = "<|user|>\n", "</s>\n<|assistant|>\n"
SEP = "\n\n"  # the task's default separator between context and question
CONTEXT = "Ada keeps the red key in the blue box; Bob keeps the green key under the old oak tree. " * 2
QUESTIONS = ["Where is the red key?", "Who has a key?", "Why?"]


def char_tokenizer(template: str | None = None):
    """A real Hugging Face tokenizer, one token per character (ids 4-255 are chr(id)), BOS 1 added."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {chr(i): i for i in range(4, 256)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    hf.chat_template = template
    return hf


# ---- the registration, in fresh interpreters --------------------------------------------------------

# Each order imports transformers.pipelines (about 10 s): both start with this module's first test
# and run beside the in-process tests; the last tests read what they printed.
ORDERS = {
    "kvpress_like first": "import kvpress_like\nfrom transformers import pipeline\n",
    "transformers first": "from transformers import pipeline\nimport kvpress_like\n",
}
CHECK = """
from conftest import tiny_model
from test_hf_task import char_tokenizer
task = pipeline("kvpress-like", model=tiny_model("llama"), tokenizer=char_tokenizer(), strategy="full",
                device="cpu")
answer = task("Some context.", question="A question?", max_new_tokens=3, return_details=True)
print(json.dumps({
    "class": type(task).__name__,
    "new tokens": len(answer["token_ids"]),
    "finder left": [type(f).__name__ for f in sys.meta_path if "Register" in type(f).__name__],
    "loader": type(sys.modules["transformers.pipelines"].__loader__).__name__,
}))
"""


def _python(code: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


@pytest.fixture(scope="module", autouse=True)
def import_orders():
    runs = {order: _python(f"import json, sys\n{imports}{CHECK}") for order, imports in ORDERS.items()}
    # Beside them, torch's second thread would mostly wait for a core (the tiny model gains nothing
    # from it): several times slower on two cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield runs
    torch.set_num_threads(threads)
    for run in runs.values():
        if run.poll() is None:
            run.kill()
            run.communicate()


def test_import_kvpress_like_imports_neither_torch_nor_transformers():
    done = _python(
        "import sys, kvpress_like\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
        "print(type(sys.meta_path[0]).__name__)"
    )
    out, err = done.communicate(timeout=60)
    assert done.returncode == 0, err
    assert out.split() == [
        "[]",
        "_RegisterTaskAfterImport",
    ]  # the registration waits for transformers.pipelines


# ---- in-process: the task against the library API and model.generate ----------------------------


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def make_task(model, tokenizer, strategy, **settings):
    from transformers import pipeline

    return pipeline(
        "kvpress-like", model=model, tokenizer=tokenizer, strategy=strategy, device="cpu", **settings
    )


# layout -> (tokenizer's template, the task's chat_template keyword)
LAYOUTS = {"template": (TEMPLATE, None), "template off": (TEMPLATE, False), "no template": (None, None)}


def split(layout: str, tok, question: str) -> tuple[list[int] | str, str]:
    """The reference split: what to compress (ids, or text the library tokenizes itself) and the
    question's text."""
    if LAYOUTS[layout] == (TEMPLATE, None):
        return tok(HEAD + CONTEXT, add_special_tokens=False)["input_ids"], SEP + question + TAIL
    return CONTEXT, SEP + question


def whole_prompt(layout: str, tok, question: str) -> list[int]:
    if LAYOUTS[layout] == (TEMPLATE, None):
        message = [{"role": "user", "content": CONTEXT + SEP + question}]
        text = tok.apply_chat_template(message, tokenize=False, add_generation_prompt=True)
        assert text == HEAD + CONTEXT + SEP + question + TAIL  # the hand-written split is the template's
        return tok(text, add_special_tokens=False)["input_ids"]
    return tok(CONTEXT + SEP + question)["input_ids"]


@contextmanager
def embedding_widths(model):
    """Token counts of every call to the model's embedding (prefill, question, each decode step)."""
    widths: list[int] = []
    handle = model.model.embed_tokens.register_forward_hook(
        lambda mod, args, out: widths.append(args[0].shape[-1])
    )
    try:
        yield widths
    finally:
        handle.remove()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_answers_are_the_library_apis_from_one_compression(model, layout):
    template, chat_template = LAYOUTS[layout]
    tok = char_tokenizer(template)
    task = make_task(model, tok, "fastkv", **TINY_FASTKV)
    with embedding_widths(model) as widths:
        answers = task(
            CONTEXT, questions=QUESTIONS, chat_template=chat_template, max_new_tokens=6, return_details=True
        )

    lib = kvpress_like.pipeline(model, "fastkv", tokenizer=tok, **TINY_FASTKV)
    compressed, _ = split(layout, tok, "")
    context = lib.compress(compressed)
    expected = [lib.generate(split(layout, tok, q)[1], context=context, max_new_tokens=6) for q in QUESTIONS]
    assert [a["token_ids"] for a in answers] == [g.ids for g in expected]
    assert [a["answer"] for a in answers] == [g.text for g in expected]

    [context_tokens] = context.stats.prompt_tokens
    question_tokens = [g.stats.prompt_tokens[0] for g in expected]
    # The context is prefilled once, each question once; the rest are decode steps of one token.
    assert sorted(w for w in widths if w > 1) == sorted([context_tokens, *question_tokens])
    stats = answers[0]["context_stats"]
    assert stats.prompt_tokens == [context_tokens] and max(stats.kv_kept_per_layer)[0] < context_tokens


@pytest.mark.parametrize("layout", LAYOUTS)
def test_keeping_everything_answers_as_model_generate_on_the_whole_prompt(model, layout):
    template, chat_template = LAYOUTS[layout]
    tok = char_tokenizer(template)
    task = make_task(model, tok, "full", chat_template=chat_template)
    answers = task(CONTEXT, questions=QUESTIONS[:2], max_new_tokens=8, return_details=True)
    for question, answer in zip(QUESTIONS[:2], answers, strict=True):
        ids = torch.tensor([whole_prompt(layout, tok, question)])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        assert answer["token_ids"] == out[0, ids.shape[1] :].tolist()
    one = task(CONTEXT, question=QUESTIONS[0], max_new_tokens=8, return_details=True)
    assert one["token_ids"] == answers[0]["token_ids"]  # question=: one result, not a list


def test_a_prompt_alone_is_plain_generation(model):
    tok = char_tokenizer(TEMPLATE)
    task = make_task(model, tok, "fastkv", **TINY_FASTKV)
    lib = kvpress_like.pipeline(model, "fastkv", tokenizer=tok, **TINY_FASTKV)
    out = task(CONTEXT, max_new_tokens=6, return_details=True)
    expected = lib.generate(CONTEXT, max_new_tokens=6)  # the library lays out the template itself
    assert set(out) == {"generated_text", "token_ids", "stats"}
    assert (out["generated_text"], out["token_ids"]) == (expected.text, expected.ids)
    plain = task(CONTEXT, max_new_tokens=6, chat_template=False, return_details=True)
    assert plain["token_ids"] == lib.generate(tok(CONTEXT)["input_ids"], max_new_tokens=6).ids


def test_generation_keywords_pass_through(model):
    tok = char_tokenizer(TEMPLATE)
    task = make_task(model, tok, "fastkv", max_new_tokens=3, **TINY_FASTKV)  # a default for every call
    lib = kvpress_like.pipeline(model, "fastkv", tokenizer=tok, max_new_tokens=3, **TINY_FASTKV)
    compressed, question = split("template", tok, QUESTIONS[0])
    context = lib.compress(compressed)

    sampled = task(
        CONTEXT, question=QUESTIONS[0], do_sample=True, temperature=0.7, seed=5, return_details=True
    )
    expected = lib.generate(question, context=context, do_sample=True, temperature=0.7, seed=5)
    assert sampled["token_ids"] == expected.ids
    default = task(CONTEXT, question=QUESTIONS[0], return_details=True)
    assert default["token_ids"] == lib.generate(question, context=context).ids
    with pytest.raises(ConfigError, match="max_new_tokens"):  # the library's own check
        task(CONTEXT, question=QUESTIONS[0], max_new_tokens=0)
    results = task([CONTEXT, CONTEXT[:40]], question=QUESTIONS[0])  # several contexts: one result each
    assert [set(r) for r in results] == [{"answer"}, {"answer"}]


def test_mistakes_are_config_errors_before_model_work(model):
    task = make_task(model, char_tokenizer(TEMPLATE), "full")
    with pytest.raises(ConfigError, match="question, questions: give one"):
        task(CONTEXT, question="a", questions=["b"])
    with pytest.raises(ConfigError, match="context: must be a non-empty string"):
        task(123, question="a")
    with pytest.raises(ConfigError, match="batch_size"):
        task(CONTEXT, question="a", batch_size=2)
    plain = make_task(model, char_tokenizer(None), "full")
    with pytest.raises(ConfigError, match="chat_template: the tokenizer has no chat template"):
        plain(CONTEXT, question="a", chat_template=True)
    shouting = make_task(model, char_tokenizer("{{ messages[0]['content'] | upper }}"), "full")
    with pytest.raises(ConfigError, match="chat_template: must place the user's message once"):
        shouting(CONTEXT, question="a")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (dict(max_new_tokens=0), "generation.max_new_tokens: Input should be greater than or equal to 1"),
        (dict(eos_token_id=9999), "generation.eos_token_id: must be in [0, 256)"),
        (dict(num_beams=3), "generation.num_beams"),
    ],
)
def test_a_bad_generation_setting_fails_before_the_context_is_compressed(model, setting, message):
    calls = []
    handle = model.model.embed_tokens.register_forward_hook(lambda *args: calls.append(1))
    try:
        task = make_task(model, char_tokenizer(TEMPLATE), "full")
        with pytest.raises(ConfigError) as caught:
            task(CONTEXT, questions=["a?", "b?"], **setting)
    finally:
        handle.remove()
    assert message in str(caught.value) and calls == []


# ---- the registration's results (started by ``import_orders`` with the module) -----------------


@pytest.mark.parametrize("order", ORDERS)
def test_registered_whichever_is_imported_first(import_orders, order):
    out, err = import_orders[order].communicate(timeout=180)
    assert import_orders[order].returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result == {
        "class": "KVPressLikeTask",
        "new tokens": result["new tokens"],
        "finder left": [],  # the one-shot finder left sys.meta_path ...
        "loader": "SourceFileLoader",  # ... and transformers.pipelines kept its own loader
    }
    assert 1 <= result["new tokens"] <= 3
