"""flash-attn is detected at run time and never required: which package serves which GPU, and that
absent, broken or unsuitable cases leave prefill to SDPA. Throwaway modules on ``sys.path`` play the
installed packages (the real ones cannot be installed on these machines)."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from kvpress_like import flash


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on ``sys.path`` to write packages into; detection caches are cleared around it."""
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("flash_attn", "flash_attn_interface"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    flash.causal_kernel.cache_clear()
    yield tmp_path
    flash.causal_kernel.cache_clear()


def _install(site, name: str, body: str = "def flash_attn_func(*args, **kwargs):\n    return 'called'\n"):
    (site / f"{name}.py").write_text(textwrap.dedent(body))


def test_nothing_installed_means_sdpa(site):
    assert flash.causal_kernel(9) is None and flash.causal_kernel(8) is None


def test_fa3_serves_hopper_and_fa2_only_older_gpus(site):
    _install(site, "flash_attn")
    _install(site, "flash_attn_interface")
    assert flash.causal_kernel(9).__module__ == "flash_attn_interface"
    assert flash.causal_kernel(8).__module__ == "flash_attn"
    assert flash.causal_kernel(10) is None


def test_fa2_is_not_used_on_hopper(site):
    _install(site, "flash_attn")
    assert flash.causal_kernel(9) is None  # cuDNN through SDPA is faster there


def test_a_broken_install_is_skipped(site):
    _install(site, "flash_attn_interface", "raise OSError('undefined symbol: built for another torch')\n")
    _install(site, "flash_attn", "x = 1\n")  # importable, but no flash_attn_func
    assert flash.causal_kernel(9) is None and flash.causal_kernel(8) is None


def test_cpu_and_fp32_inputs_stay_with_sdpa(site):
    _install(site, "flash_attn")
    q = torch.randn(1, 4, 8, 16)
    k = torch.randn(1, 2, 8, 16)
    assert flash.causal_attention(q, k, k, 0.25) is None
    assert flash.causal_attention(q.bfloat16(), k.bfloat16(), k.bfloat16(), 0.25) is None  # on CPU
