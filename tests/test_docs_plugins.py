"""docs/plugins.md: the walkthrough runs; the packaged plugin is found by name; broken plugins warn."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import pytest
import torch

from kvpress_like import hookimpl, list_strategies, pipeline
from kvpress_like.plugins import ENTRY_POINT_GROUP, describe_strategies

from conftest import tiny_model

DOC = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text()
PROMPT = torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(11)).tolist()


def test_the_walkthrough_runs_and_keeps_its_budget():
    namespace: dict = {}
    exec(
        compile("\n".join(re.findall(r"```python\n(.*?)```", DOC, flags=re.S)), "plugins.md", "exec"),
        namespace,
    )
    out = namespace["try_it"](tiny_model("llama"), PROMPT)
    assert out.stats.kv_kept_per_layer == [[10.0]] * 4  # 25% of 40 tokens


def test_the_keynorm_distribution_is_found_by_name_and_keeps_the_lowest_norms():
    source = {info.name: info.source for info in describe_strategies()}
    assert source["keynorm"].startswith("kvpress-like-keynorm")
    model = tiny_model("qwen3")
    pipe = pipeline(model, "keynorm", retain_rate=0.25, window=4)
    kept = pipe.compress(PROMPT).cache.layers[0]

    # Reference: layer 0's keys (as its attention receives them: k_norm and RoPE applied), recorded
    # by a score-only plugin on the full strategy; per head the 4 recent tokens + the 6 lowest norms.
    seen = {}
    full = pipeline(model, "full", plugins=[_Recorder(seen)])
    full.compress(PROMPT)
    norms = seen["keys"][0].float().norm(dim=-1)  # [Hkv, 40]
    for head, row in enumerate(norms):
        older = sorted(range(36), key=lambda i: (row[i].item(), i))[:6]
        assert kept.positions[0, head].tolist() == [*sorted(older), 36, 37, 38, 39]


class _Recorder:
    def __init__(self, seen: dict) -> None:
        self.seen = seen

    @hookimpl
    def score(self, layer):
        if layer.layer_idx == 0:
            self.seen["keys"] = layer.keys.clone()


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        ("raise ImportError('missing dependency xyz')", "missing dependency xyz"),
        (
            "from kvpress_like import Strategy, hookimpl\n"
            "class Broken(Strategy):\n"
            "    @hookimpl\n"
            "    def retain(self, layer, scores, extra):\n"
            "        return None\n",
            "extra",
        ),
        ("Broken = 42\n", "must be a kvpress_like.Strategy subclass"),
    ],
    ids=["import-error", "wrong-hook-signature", "not-a-strategy"],
)
def test_a_broken_plugin_warns_by_name_and_the_others_still_work(
    tmp_path, monkeypatch, caplog, module, expected
):
    (tmp_path / "broken_plugin.py").write_text(module)
    dist = tmp_path / "broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nbroken = broken_plugin:Broken\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with caplog.at_level(logging.WARNING, logger="kvpress_like"):
            names = list_strategies()
        [line] = [r.getMessage() for r in caplog.records if "'broken'" in r.getMessage()]
        assert "broken-plugin 0.1" in line and "skipped" in line and expected in line
        assert "broken" not in names and {"full", "fastkv", "keynorm"} <= set(names)
        assert pipeline(tiny_model("llama"), "fastkv", window=4, retain_rate=0.5)(PROMPT).ids
    finally:
        sys.modules.pop("broken_plugin", None)
