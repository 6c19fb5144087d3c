"""Tensor parallelism on CPU: two gloo ranks launched by ``torchrun`` (``tests/tp_worker.py``)
shard tiny Llama and Qwen3 models in two by their own plans; every built-in strategy gives the
unsharded model's tokens (greedy and sampled, eager and static decode) and keeps, per KV head,
the unsharded model's positions; a decode step's kernel layers give the plain layers'
hidden states on the shards; the output head's vocabulary is split as the models' own plan
says. A strategy choosing tokens from its own rank's heads only is refused by name."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from kvpress_like.errors import UnsupportedModelError
from kvpress_like.parallel import output_head_plan, tensor_parallel_plan

from conftest import tiny_model, torchrun

WORKER = Path(__file__).with_name("tp_worker.py")


def run_worker(out: Path, *args: str) -> list[dict]:
    command = [*torchrun(2), str(WORKER), "--out", str(out), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_two_gloo_ranks_match_the_unsharded_model(tmp_path):
    reports = run_worker(tmp_path)
    for report in reports:
        assert report["world"] == 2
        cases = report["cases"]
        assert {c["strategy"] for c in cases} >= {"fastkv", "snapkv", "adakv"}
        for case in cases:
            assert case["local_kv_heads"] == 1, case  # 2 KV heads split in two
            assert case["tokens_equal"] and case["kept_equal"], case
        # Decode layers on the projection kernels' path: q, k and v in one launch of this
        # rank's shards, placed back as the plan's hooks expect.
        expected = {"equal": True, "compiled_equal": True, "qkv_groups": 1}
        assert report["kernel_layers"] == {family: expected for family in ("llama", "qwen3")}
        # the output head's vocabulary (256) split in two, by the models' own plan
        assert report["head_rows"] == {"llama": 128, "qwen3": 128}
        assert "tensor-parallel rank's share" in report["save_refusal"], report["save_refusal"]
        assert "RankLocalFastKV" in report["refusal"] and "every tensor-parallel rank" in report["refusal"]
    # the ranks agree with each other too (not only each with its own reference)
    assert [c["tokens"] for c in reports[0]["cases"]] == [c["tokens"] for c in reports[1]["cases"]]


def test_compiled_prefill_traces_the_sharded_layers_and_keeps_the_same_tokens(tmp_path):
    """``prefill="compiled"`` on the sharded model (torch.compile through DTensor) against the
    unsharded model's eager prefill: same tokens, same kept positions per KV head."""
    args = ("--families", "llama", "--strategies", "fastkv,adakv", "--decode", "eager")
    for report in run_worker(tmp_path, *args, "--prefill", "compiled"):
        assert [c["strategy"] for c in report["cases"]] == ["fastkv", "adakv"]
        for case in report["cases"]:
            assert case["tokens_equal"] and case["kept_equal"], case


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("lengths", ["61,37", "61"])
def test_two_nccl_ranks_match_the_unsharded_model_in_every_decode_mode(tmp_path, lengths):
    """Two GPUs, NCCL: eager, static and compiled decode (the step on its own CUDA graphs; at
    batch 1 its all-reduces on the one-shot kernel) give the unsharded model's tokens."""
    args = ("--device", "cuda", "--families", "llama", "--strategies", "fastkv,adakv")
    reports = run_worker(tmp_path, *args, "--decode", "eager,static,compiled", "--lengths", lengths)
    for report in reports:
        for case in report["cases"]:
            assert case["tokens_equal"] and case["kept_equal"], case
    assert [c["tokens"] for c in reports[0]["cases"]] == [c["tokens"] for c in reports[1]["cases"]]


def test_a_tied_or_uneven_output_head_stays_whole():
    """The embedding shares a tied head's weight and must stay whole; a vocabulary that does not
    divide over the ranks is not split either. An untied, even one is (the gloo test above)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import COMMON

    assert list(output_head_plan(tiny_model("llama"), 2)) == ["lm_head"]
    tied = LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=True))
    assert output_head_plan(tied, 2) == {}
    assert output_head_plan(tiny_model("llama"), 3) == {}  # 256 rows over 3 ranks


def test_a_plan_that_does_not_split_heads_is_refused():
    with pytest.raises(UnsupportedModelError, match="colwise_gather_output"):
        tensor_parallel_plan(tiny_model("phi3"))


def test_the_plan_covers_every_projection_of_every_layer():
    model = tiny_model("qwen3")
    plan = tensor_parallel_plan(model)
    layers = model.config.num_hidden_layers
    assert len(plan) == 7 * layers  # q, k, v, o, gate, up, down; the norms stay replicated
    styles = {name.split(".", 2)[-1]: type(style).__name__ for name, style in plan.items()}
    assert styles["self_attn.o_proj"] == "RowwiseParallel" == styles["mlp.down_proj"]
    assert styles["self_attn.k_proj"] == "ColwiseParallel"
    assert torch.distributed.is_available()
