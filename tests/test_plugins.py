"""Strategies come from entry points; each pipeline owns its plugin manager; plugins stack."""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

import pytest
import torch

from kvpress_like import hookimpl, list_strategies, pipeline
from kvpress_like.plugins import ENTRY_POINT_GROUP

from conftest import tiny_model

PROMPT = torch.randint(3, 256, (50,), generator=torch.Generator().manual_seed(9)).tolist()


def test_builtins_are_registered_through_the_entry_point_group():
    registered = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert registered["fastkv"] == "kvpress_like.strategies.fastkv:FastKV"
    assert registered["full"] == "kvpress_like.strategies.full:Full"
    assert {"fastkv", "full"} <= set(list_strategies())


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """A real third-party distribution on sys.path: a module plus dist-info with an entry point."""
    (tmp_path / "keep_oldest_plugin.py").write_text(
        "import torch\n"
        "from pydantic import Field\n"
        "from kvpress_like import Strategy, StrategyConfig, hookimpl\n\n"
        "class KeepOldestConfig(StrategyConfig):\n"
        "    tokens: int = Field(10, ge=1)\n\n"
        "class KeepOldest(Strategy):\n"
        '    """Keeps the first tokens of the prompt in every layer."""\n'
        "    Config = KeepOldestConfig\n\n"
        "    @hookimpl\n"
        "    def retain(self, layer, scores):\n"
        "        keep = layer.valid & (layer.positions < self.config.tokens)\n"
        "        return keep[:, None].expand(-1, layer.keys.shape[1], -1)\n"
    )
    dist = tmp_path / "keep_oldest_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: keep-oldest-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\nkeep_oldest = keep_oldest_plugin:KeepOldest\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("keep_oldest_plugin", None)


def test_a_third_party_strategy_is_found_by_name(installed_plugin):
    assert list_strategies()["keep_oldest"] == "Keeps the first tokens of the prompt in every layer"
    out = pipeline(tiny_model("llama"), "keep_oldest", tokens=12, max_new_tokens=2)(PROMPT)
    assert out.stats.kv_kept_per_layer == [[12.0]] * 4


class KeyNormScore:
    """Scores keys by negative L2 norm (a stand-in for any score-only plugin); records layer 0's keys."""

    def __init__(self) -> None:
        self.calls = 0
        self.layer0_keys = None

    @hookimpl
    def score(self, layer):
        self.calls += 1
        if layer.layer_idx == 0:
            self.layer0_keys = layer.keys.clone()
        return -layer.keys.float().norm(dim=-1)


def test_a_score_only_plugin_steers_fastkv_and_stays_in_its_pipeline():
    model = tiny_model("llama")
    settings = dict(tsp_layer=1, tsp_rate=0.5, retain_rate=0.3, window=4, max_new_tokens=2)
    plugin = KeyNormScore()
    stacked = pipeline(model, "fastkv", plugins=[plugin], **settings)
    plain = pipeline(model, "fastkv", **settings)

    kept_stacked = stacked.compress(PROMPT).cache.layers[0].positions[0]  # [Hkv, 15]
    kept_plain = plain.compress(PROMPT).cache.layers[0].positions[0]
    assert plugin.calls == 4
    assert not torch.equal(kept_stacked, kept_plain)

    # FastKV's retain on the plugin's scores: the 4 most recent tokens plus the 11 smallest key
    # norms among the rest (budget 0.3 * 50 = 15), per KV head, computed here by hand.
    norms = plugin.layer0_keys[0].float().norm(dim=-1)  # [Hkv, 50]
    for head, row in enumerate(norms):
        older = sorted(range(46), key=lambda i: (row[i].item(), i))[:11]
        assert kept_stacked[head].tolist() == [*sorted(older), 46, 47, 48, 49]

    plain.compress(PROMPT)
    assert plugin.calls == 4  # the plain pipeline never asks the other pipeline's plugin
