"""The README's Python example and config example run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvpress_like import Pipeline

README = (Path(__file__).parents[1] / "README.md").read_text()


def _block(language: str, starts_with: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)
    return next(b for b in blocks if b.startswith(starts_with))


@pytest.mark.slow
def test_python_example_runs(capsys, smollm2):
    exec(compile(_block("python", "from kvpress_like import pipeline"), "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3
    assert "[200]" in printed[0] and "[100.0]" in printed[0]
    assert all("60494" in line for line in printed)  # seed 0's passkey, found every time


@pytest.mark.slow
def test_streaming_and_pipeline_task_examples_run(capsys, smollm2):
    """After the first example (model, tokenizer, prompt), the streaming and task examples run: the
    streamer prints exactly the generated text, the task answers both questions."""
    scope: dict = {}
    exec(compile(_block("python", "from kvpress_like import pipeline"), "README.md", "exec"), scope)
    capsys.readouterr()
    exec(compile(_block("python", "from transformers import GenerationConfig"), "README.md", "exec"), scope)
    printed = capsys.readouterr().out
    assert printed.strip() == scope["streamed"].text.strip() and scope["streamed"].text
    exec(compile(_block("python", "import kvpress_like"), "README.md", "exec"), scope)
    answers = eval(capsys.readouterr().out.strip())
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_config_example_is_valid(tmp_path):
    from conftest import tiny_model

    path = tmp_path / "fastkv.yaml"
    path.write_text(_block("yaml", "# fastkv.yaml"))
    model = tiny_model("llama")
    pipe = Pipeline.from_config(path, model, tsp_layer=1, max_new_tokens=16)
    assert pipe.strategy.config.retain_rate == 0.1 and pipe.generation.max_new_tokens == 16


@pytest.mark.slow
def test_saved_context_example_runs(capsys, smollm2, tmp_path, monkeypatch):
    """The saved-context example, after the first one: the loaded context answers as the first
    example's in-memory context does (greedy), and the file is where the example says."""
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_block("python", "from kvpress_like import pipeline"), "README.md", "exec"), scope)
    capsys.readouterr()
    exec(compile(_block("python", "from kvpress_like import Context"), "README.md", "exec"), scope)
    printed = capsys.readouterr().out.strip()
    want = scope["pipe"].generate(context=scope["pipe"].compress(scope["prompt"].text)).text
    assert printed == want.strip() and (tmp_path / "passkey.kvc").is_file()
