"""The ``eval`` extra: what ships with the package, and what a core install without the extra does.

A core install is simulated in a subprocess whose eval-only packages (those of the ``eval`` extra
that the core does not require; today matplotlib) cannot be imported: ``sys.modules[name] = None``
makes every ``import name`` raise ImportError, as a missing package would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def _dist(requirement: str) -> str:
    """The canonical distribution name of a requirement (``Foo_Bar[x]>=1`` -> ``foo-bar``)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group()).lower()


def _eval_only_modules() -> list[str]:
    """The top-level import names of the eval extra's distributions that the core does not need."""
    only = {_dist(r) for r in PROJECT["optional-dependencies"]["eval"]} - {
        _dist(r) for r in PROJECT["dependencies"]
    }
    return sorted(
        module for module, dists in packages_distributions().items() if any(_dist(d) in only for d in dists)
    )


def _without_eval_extra(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where the eval-only packages cannot be imported."""
    prelude = f"import sys\nfor _name in {_eval_only_modules()!r}:\n    sys.modules[_name] = None\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return subprocess.run(
        [sys.executable, "-c", prelude + code],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )


# ---- packaging ----------------------------------------------------------------------------------


def test_eval_extra_is_part_of_dev_and_brings_matplotlib():
    extras = PROJECT["optional-dependencies"]
    assert "matplotlib" in {_dist(r) for r in extras["eval"]}
    # The README's `pip install -e ".[dev]"` must install everything the tests need.
    assert {_dist(r) for r in extras["eval"]} <= {_dist(r) for r in extras["dev"]}
    assert "matplotlib" in _eval_only_modules()


def test_package_data_ships_every_data_file_and_the_typing_marker():
    """Every file under a package's data folder matches a package-data pattern (or it would be
    missing from a wheel); the patterns are checked against the files, not the other way round."""
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]
    shipped = {
        f"{package.replace('.', '/')}/{pattern}" for package, globs in patterns.items() for pattern in globs
    }
    folder = ROOT / "kvpress_like/eval/data"
    files = [p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    data = [p.relative_to(ROOT).as_posix() for p in files]
    assert "kvpress_like/eval/data/passkey.yaml" in data and sum(p.endswith(".txt") for p in data) >= 40
    for path in [*data, "kvpress_like/py.typed"]:
        assert any(fnmatch(path, pattern) for pattern in shipped), f"{path} would not ship"
    assert (ROOT / "kvpress_like/py.typed").is_file()


def test_the_haystacks_and_passkey_text_are_found_through_the_package():
    from kvpress_like.eval import passkey
    from kvpress_like.eval.haystacks import HAYSTACKS

    essays, code = HAYSTACKS["essays"].texts, HAYSTACKS["code"].texts
    assert len(essays) >= 40 and all(essays) and sum(map(len, essays)) > 500_000
    assert not any("\n" in text or "  " in text for text in essays)  # prose: whitespace collapsed
    assert len(code) >= 10 and sum(map(len, code)) > 400_000
    assert all("\n    def " in text or "\ndef " in text for text in code)  # source as written
    assert set(passkey._template()) == {"intro", "needle", "question", "filler"}


# ---- a core install: eval refuses plots it cannot draw, the rest works --------------------------


def test_eval_without_matplotlib_refuses_at_once_naming_the_extra(tmp_path):
    done = _without_eval_extra(
        "import kvpress_like.cli as cli\n"
        "code = cli.main(['eval', '--model', 'tiny', '--strategies', 'full', '--out', 'out'])\n"
        "print(code, sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "2 []\n"  # refused before any model work: torch was never imported
    assert done.stderr == (
        'error: plots: need matplotlib, which is not installed: pip install "kvpress-like[eval]", '
        "or pass --no-plots\n"
    )
    assert not (tmp_path / "out").exists()


def test_eval_no_plots_and_the_api_without_matplotlib(tmp_path):
    """``evaluate(plots=True)`` refuses before any model work, ``--no-plots`` runs; and the core
    (``kvpress_like.pipeline``) does not import the harness at all."""
    done = _without_eval_extra(
        "import pytest\n"
        "import kvpress_like.pipeline\n"
        "assert not [m for m in sys.modules if m.startswith('kvpress_like.eval')], 'the core imports eval'\n"
        "import kvpress_like.cli as cli, kvpress_like.models as models\n"
        "from kvpress_like.errors import ConfigError\n"
        "from kvpress_like.eval.harness import evaluate\n"
        "from conftest import CharTokenizer, tiny_model\n"
        "with pytest.raises(ConfigError) as refused:\n"
        "    evaluate(None, CharTokenizer(), strategies=['full'], budgets=[0.1], out='api')\n"
        "assert str(refused.value) == ('plots: need matplotlib, which is not installed: '\n"
        "    'pip install \"kvpress-like[eval]\", or pass plots=False'), refused.value\n"
        "models.load_model = lambda name: (tiny_model('llama'), CharTokenizer())\n"
        "sys.exit(cli.main(['eval', '--model', 'tiny', '--strategies', 'full,fastkv', '--budgets', '0.5',\n"
        "    '--tasks', 'passkey', '--lengths', '700', '--samples', '1', '--max-new-tokens', '2',\n"
        "    '--out', 'out', '--no-plots']))\n",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "api").exists()
    assert "| fastkv | 0.5 | 700 |" in done.stdout and "2 record(s) computed, 0 reused" in done.stdout
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["environment.json", "records.jsonl", "summary.md"]


def test_the_demo_path_needs_no_eval_only_package(tmp_path):
    """`kvpress-like demo` (its modules, the parser, the passkey prompt and the run itself), with a
    tiny random model in place of SmolLM2 and a one-token-per-character tokenizer."""
    done = _without_eval_extra(
        "import kvpress_like.cli as cli, kvpress_like.models as models\n"
        "from kvpress_like.eval.passkey import found_key, passkey_prompt\n"
        "from conftest import CharTokenizer, tiny_model\n"
        "prompt = passkey_prompt(CharTokenizer(), 600, 0.5, seed=0)\n"
        "assert prompt.key in prompt.text and found_key(f'it is {prompt.key}.', prompt.key)\n"
        "assert 500 < len(CharTokenizer()(prompt.text)['input_ids']) <= 600\n"
        "models.load_smollm2 = lambda: (tiny_model('llama'), CharTokenizer())\n"
        "sys.exit(cli.main(['demo', '--tokens', '600', '--max-new-tokens', '2']))\n",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("SmolLM2-135M-Instruct, passkey ")
    assert "KV kept per layer" in done.stdout and "fastkv" in done.stdout
