"""The command line: every mistake a user can make is one ``error: ...`` line and exit status 2,
found before a model loads where it can be; ``--debug`` shows the traceback; ``--help`` is quick."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvpress_like
from kvpress_like import models
from kvpress_like.cli import main
from kvpress_like.eval.cli import check_lengths, min_prompt_tokens
from kvpress_like.eval.tasks import TASKS, make_samples

from conftest import CharTokenizer, tiny_model

ROOT = Path(__file__).parents[1]


def _hf_char_tokenizer():
    """CharTokenizer's ids as a real (saveable) Hugging Face tokenizer: one token per character."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {chr(i): i for i in range(32, 127)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    """A tiny random Llama and its tokenizer, saved as ``--model`` expects them."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    _hf_char_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture
def cli(capsys):
    """Run ``kvpress-like ARGS`` in-process: (exit status, stderr)."""

    def call(*argv: str) -> tuple[int, str]:
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse: usage errors and --help
            code = exc.code
        return code, capsys.readouterr().err

    return call


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a model is loaded: these inputs must be refused before that."""

    def refuse(name):
        raise AssertionError(f"model {name!r} was loaded")

    monkeypatch.setattr(models, "load_model", refuse)


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def files(tmp_path) -> Path:
    (tmp_path / "prompt.txt").write_text("What is the capital of France? Answer in one word.")
    (tmp_path / "ok.yaml").write_text("strategy: fastkv\nsettings:\n  tsp_layer: 1\n")
    (tmp_path / "empty.txt").write_text(" \n\n")
    (tmp_path / "folder.yaml").mkdir()
    return tmp_path


# ---- 1. one line, exit status 2 -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        (
            "bad.yaml",
            "strategy: fastkv\nsettings:\n  tsp_rate: 0.2\n   window: 4\n",
            ["valid YAML", "mapping values are not allowed here", "line 4, column 10"],
        ),
        (
            "flow.yml",
            "strategy: fastkv\nsettings: {tsp_rate: 0.2\n",
            ["valid YAML", "while parsing a flow mapping from line 2, column 11", "line 3, column 1"],
        ),
        (
            "bad.toml",
            'strategy = "fastkv"\n[settings\ntsp_rate = 0.2\n',
            ["valid TOML", "Expected ']' at the end of a table declaration", "line 2, column 10"],
        ),
        ("value.toml", "strategy = fastkv\n", ["valid TOML", "Invalid value", "line 1, column 12"]),
        ("open.toml", 'strategy = "fastkv', ["valid TOML", "Unterminated string", "line 1, column 19"]),
    ],
)
def test_malformed_config_is_one_line_with_file_line_and_column(cli, no_model, files, name, text, expected):
    (files / name).write_text(text)
    code, err = cli("run", "--model", "m", "--config", str(files / name), "--prompt-file", "p")
    line = one_error_line(err)
    assert code == 2
    assert str(files / name) in line
    for fragment in expected:
        assert fragment in line


@pytest.mark.parametrize(
    ("config", "prompt", "expected"),
    [
        ("missing.yaml", "prompt.txt", "config file: must exist (got '{d}/missing.yaml')"),
        ("folder.yaml", "prompt.txt", "config file: must be a file, not a directory (got '{d}/folder.yaml')"),
        ("ok.yaml", "missing.txt", "--prompt-file: must exist (got '{d}/missing.txt')"),
        ("ok.yaml", "folder.yaml", "--prompt-file: must be a file, not a directory (got '{d}/folder.yaml')"),
        ("ok.yaml", "empty.txt", "--prompt-file: must not be empty (got '{d}/empty.txt')"),
    ],
)
def test_bad_files_are_one_line(cli, no_model, files, config, prompt, expected):
    code, err = cli(
        "run", "--model", "m", "--config", str(files / config), "--prompt-file", str(files / prompt)
    )
    assert one_error_line(err) == "error: " + expected.format(d=files)
    assert code == 2


@pytest.mark.parametrize("which", ["config", "prompt"])
def test_unreadable_files_are_one_line(cli, no_model, files, monkeypatch, which):
    # chmod 000 does not stop root (tests may run as root): make the read itself fail instead.
    unreadable = files / ("ok.yaml" if which == "config" else "prompt.txt")
    read_text = Path.read_text

    def deny(self, *args, **kwargs):
        if self == unreadable:
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", deny)
    code, err = cli(
        "run", "--model", "m", "--config", str(files / "ok.yaml"), "--prompt-file", str(files / "prompt.txt")
    )
    line = one_error_line(err)
    assert code == 2
    assert "must be readable, Permission denied" in line and str(unreadable) in line


def test_binary_prompt_file_is_one_line(cli, no_model, files):
    (files / "blob.txt").write_bytes(b"\xff\xfe\x00 not text")
    code, err = cli("run", "--model", "m", "--prompt-file", str(files / "blob.txt"))
    assert "--prompt-file: must be UTF-8 text" in one_error_line(err) and code == 2


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("{d}/nope", "--model: must be an existing model directory (got '{d}/nope')"),
        ("./no/such/model", "--model: must be an existing model directory (got './no/such/model')"),
        ("{d}/folder.yaml", "--model: must be a directory holding a model, it has no config.json"),
        ("{d}/prompt.txt", "--model: must be a model directory or a Hub id, not a file"),
    ],
)
def test_bad_model_paths_are_refused_before_loading(cli, no_model, files, model, expected):
    code, err = cli("run", "--model", model.format(d=files), "--prompt-file", str(files / "prompt.txt"))
    assert expected.format(d=files) in one_error_line(err)
    assert code == 2


def test_a_model_transformers_cannot_load_names_the_option(cli, files):
    broken = files / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # no model_type: transformers raises ValueError
    code, err = cli("run", "--model", str(broken), "--prompt-file", str(files / "prompt.txt"))
    line = one_error_line(err)
    assert code == 2
    assert line.startswith("error: --model: must name a model transformers can load, Unrecognized model")
    assert line.endswith(f"(got {str(broken)!r})")


def test_usage_errors_are_one_line(cli):
    code, err = cli("run", "--model", "m", "--prompt-file", "p", "--max-new-tokens", "0")
    assert code == 2
    assert one_error_line(err) == (
        "error: kvpress-like run: argument --max-new-tokens: must be an integer >= 1 (got 0) "
        "(see kvpress-like run --help)"
    )
    code, err = cli("nonsense")
    assert code == 2 and "invalid choice: 'nonsense'" in one_error_line(err)
    code, err = cli("demo", "--depth", "half")
    assert code == 2 and "argument --depth: must be a number in [0, 1] (got 'half')" in one_error_line(err)


def test_debug_shows_the_traceback(cli, no_model, files):
    code, err = cli("--debug", "run", "--model", "m", "--config", str(files / "x.toml"), "--prompt-file", "p")
    assert code == 2
    assert err.startswith("Traceback (most recent call last):")
    assert "kvpress_like.errors.ConfigError: config file: must exist" in err


def _console_script() -> list[str]:
    found = shutil.which("kvpress-like")
    return [found] if found else [sys.executable, "-m", "kvpress_like.cli"]


def test_console_script_exit_status_and_stderr(tmp_path):
    argv = ["run", "--model", "m", "--config", str(tmp_path / "none.yaml"), "--prompt-file", "p"]
    done = subprocess.run([*_console_script(), *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"error: config file: must exist (got '{tmp_path}/none.yaml')\n"
    debug = subprocess.run([*_console_script(), "--debug", *argv], capture_output=True, text=True, timeout=60)
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr


# ---- 2. a prompt too short for the budget: what to change ---------------------------------------


def test_prompt_too_short_for_the_budget_gets_a_hint(cli, model_dir, files):
    (files / "tight.yaml").write_text(
        "strategy: fastkv\nsettings:\n  tsp_layer: 1\n  retain_rate: 0.1\n  window: 8\n"
    )
    prompt = str(files / "prompt.txt")
    code, err = cli(
        "run", "--model", model_dir, "--config", str(files / "tight.yaml"), "--prompt-file", prompt
    )
    assert code == 2 and "Traceback" not in err
    [line] = [x for x in err.splitlines() if x.startswith("error:")]  # transformers' load bar aside
    assert line.startswith("error: fastkv.window: must not exceed the retain budget; retain_rate=0.1 of a ")
    assert line.endswith("; use a longer prompt, a higher retain_rate or a smaller window")
    code, err = cli(
        "run", "--model", model_dir, "--strategy", "snapkv", "--prompt-file", str(files / "prompt.txt")
    )
    [line] = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2 and "snapkv.window" in line and "use a longer prompt" in line


def test_run_still_runs(cli, model_dir, files, capsys):
    (files / "long.txt").write_text("The quick brown fox jumps over the lazy dog. " * 3)
    (files / "roomy.yaml").write_text(
        "strategy: fastkv\nsettings:\n  tsp_layer: 1\n  retain_rate: 0.5\n  window: 4\n"
        "generation:\n  max_new_tokens: 2\n"
    )
    config, prompt = str(files / "roomy.yaml"), str(files / "long.txt")
    code = main(["run", "--model", model_dir, "--config", config, "--prompt-file", prompt])
    assert code == 0 and "KV kept per layer" in capsys.readouterr().out


# ---- 3. eval: bad arguments are refused before the model loads ---------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--budgets", "0"], "argument --budgets: must be a number in (0, 1] (got 0)"),
        (["--budgets", "0.1,1.5"], "argument --budgets: must be a number in (0, 1] (got 1.5)"),
        (["--budgets", "-0.2"], "(got -0.2)"),
        (["--budgets", ","], "argument --budgets: must list at least one value"),
        (["--samples", "0"], "argument --samples: must be an integer >= 1 (got 0)"),
        (["--fidelity-steps", "0"], "argument --fidelity-steps: must be an integer >= 1 (got 0)"),
        (["--max-new-tokens", "-3"], "argument --max-new-tokens: must be an integer >= 1 (got -3)"),
        (["--lengths", "0"], "argument --lengths: must be an integer >= 1 (got 0)"),
        (["--lengths", "1k"], "argument --lengths: must be an integer >= 1 (got '1k')"),
        (["--budgets", "ten"], "argument --budgets: must be a number in (0, 1] (got 'ten')"),
        (["--tasks", "passkey,nope"], "argument --tasks: must be among passkey, niah_single"),
        (
            ["--strategies", "full,nope"],
            "--strategies: 'nope' is not an installed strategy, these are: adakv,",
        ),
        (["--strategies", "snapkv:windw=4"], "--strategies: snapkv has no setting 'windw', its settings are"),
        (["--strategies", "snapkv:window"], "strategies: settings must be KEY=VALUE after the name"),
        (["--strategies", ","], "--strategies: must name at least one strategy"),
        (["--device", "gpu0"], "--device: must be a torch device such as cpu, cuda or cuda:1 (got 'gpu0')"),
        *(
            [(["--device", "cuda"], "--device: must name a CUDA device; this machine has none")]
            if not torch.cuda.is_available()
            else []
        ),
    ],
)
def test_eval_refuses_bad_arguments_before_loading(cli, no_model, tmp_path, args, expected):
    code, err = cli("eval", "--model", "tiny", "--out", str(tmp_path / "out"), *args)
    assert expected in one_error_line(err)
    assert code == 2
    assert not (tmp_path / "out").exists()


def test_eval_refuses_lengths_its_tasks_cannot_build(cli, no_model, model_dir, tmp_path):
    minimum = max(
        min_prompt_tokens(CharTokenizer(), "niah_multiquery", seed) for seed in range(100)
    )  # a bound for the check below: keys and numbers vary a little with the sample's seed
    code, err = cli("eval", "--model", model_dir, "--lengths", "20", "--out", str(tmp_path))
    line = one_error_line(err)
    assert code == 2 and line.startswith("error: --lengths: passkey needs at least ")
    assert line.endswith(" tokens with this model's tokenizer (got 20)")
    code, err = cli(
        "eval", "--model", model_dir, "--tasks", "passkey,niah_multiquery", "--lengths", "1000,400",
        "--out", str(tmp_path),
    )  # fmt: skip
    need = int(one_error_line(err).split("needs at least ")[1].split()[0])
    assert "niah_multiquery" in err and "(got 400)" in err and 400 < need <= minimum


@pytest.mark.parametrize("task", TASKS)
def test_lengths_are_refused_exactly_when_a_task_cannot_build_them(task):
    tok, refused = CharTokenizer(), []
    near = min_prompt_tokens(tok, task, seed=0)
    for length in range(max(1, near - 60), near + 60, 5):
        try:
            check_lengths(tok, [task], [length], samples=2, seed=0)
        except kvpress_like.ConfigError as exc:
            assert f"--lengths: {task} needs at least" in str(exc)
            refused.append(length)
        if task == "passkey":  # builds its shortest prompt instead, longer than asked
            built = [s.metadata["prompt_tokens"] for s in make_samples(tok, task, length, 2, 0)]
            assert (max(built) > length) == (length in refused)
        else:
            try:
                make_samples(tok, task, length, 2, 0)
            except ValueError:
                assert length in refused
            else:
                assert length not in refused
    assert refused or task == "fidelity"


def test_eval_out_must_be_a_folder(cli, no_model, tmp_path):
    (tmp_path / "file").write_text("")
    code, err = cli("eval", "--model", "tiny", "--strategies", "full", "--out", str(tmp_path / "file"))
    assert code == 2 and "--out: must be a directory, not a file" in one_error_line(err)


# ---- 4. --help without torch --------------------------------------------------------------------


def test_help_imports_neither_torch_nor_transformers():
    code = (
        "import contextlib, io, sys\n"
        "import kvpress_like.cli as cli\n"
        "for argv in (['--help'], ['eval', '--help'], ['run', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "        cli.main(argv)\n"
        "    assert 'usage: kvpress-like' in out.getvalue(), argv\n"
        "import kvpress_like, kvpress_like.errors, kvpress_like.config\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_lazy_package_exports_what_it_did():
    import importlib

    importlib.import_module("kvpress_like.pipeline")  # binds the submodule on the package ...
    from kvpress_like import pipeline

    assert callable(pipeline) and pipeline.__module__ == "kvpress_like.pipeline"  # ... not shadowing it
    for name in kvpress_like.__all__:
        assert getattr(kvpress_like, name) is not None
    assert set(kvpress_like.__all__) <= set(dir(kvpress_like))
    with pytest.raises(AttributeError):
        kvpress_like.nonesuch  # noqa: B018
