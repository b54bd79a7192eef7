"""INT4 (compressed-tensors, Kimi K2.5's experts, in its multimodal checkpoint) and NVFP4 (ModelOpt) routed experts under tensor parallelism
(docs/tensor-parallelism.md): at `-tp 2 -ep 2` the packed experts are placed whole by EP (each rank reads its own
experts' words and scales), the float attention and dense layers split over the TP group, and greedy tokens equal
transformers' on the dequantized weights (Ray, CPU ranks, gloo, float64). Split by intermediate size
(expert_parallel_size 1) they are refused, naming the flag that places them in EP."""
from __future__ import annotations

import random

import pytest
import torch

from moelink.engine import LLM
from moelink.engine.config.model import ModelConfig
from moelink.engine.config.tensor_parallel import check_tensor_parallel

from tests.helpers import int4_checkpoints, nvfp4_checkpoints
from tests.helpers.fp8_checkpoints import hf_greedy_with
from tests.helpers.parity import assert_same, engine_greedy
from tests.helpers.tp_load import LoadOnlyTP

NEW = 4
KW = dict(dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=64, block_size=8)


def _int4(tmp_path) -> tuple[str, str]:
    """Kimi K2.5 as published (its multimodal checkpoint: the text model under `language_model.`) around a tiny
    DeepSeek-V3 (MLA, shared expert, a dense layer) with symmetric INT4 experts in groups of 32; the DeepSeek-V3
    files are the oracle (transformers decompresses them: tests/ep/test_ep_int4.py)."""
    dsv3 = int4_checkpoints.int4_checkpoint(int4_checkpoints.save_tiny(tmp_path / "float", "dsv3"), tmp_path / "int4",
                                            True, 32, "experts")
    return int4_checkpoints.kimi_k25_checkpoint(dsv3, tmp_path / "k25"), dsv3


def _nvfp4(tmp_path) -> tuple[str, str]:
    """Qwen3-MoE with NVFP4 experts (a dense layer, 2 kv heads), and its dequantized float64 twin."""
    path = nvfp4_checkpoints.nvfp4_checkpoint(nvfp4_checkpoints.save_tiny(tmp_path / "float", "qwen3"),
                                              tmp_path / "nvfp4")
    return path, nvfp4_checkpoints.dequantized_copy(path, tmp_path / "deq")


FORMATS = {"int4": _int4, "nvfp4": _nvfp4}


def _tp2_ep2_equals_transformers(path: str, oracle: str) -> None:
    from transformers import AutoModelForCausalLM

    rng = random.Random(5)
    ps = [[rng.randrange(nvfp4_checkpoints.VOCAB) for _ in range(rng.randint(1, 30))] for _ in range(3)]
    hf = AutoModelForCausalLM.from_pretrained(oracle, dtype=torch.float64, experts_implementation="eager")
    want = hf_greedy_with(hf.to(torch.float64).eval(), ps, NEW)
    llm = LLM(path, tensor_parallel_size=2, expert_parallel_size=2, **KW)
    try:
        assert_same(engine_greedy(llm, ps, max_new=NEW), want, ps)
        assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
    finally:
        llm.engine.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_tp2_ep2_matches_transformers(local_ray, tmp_path, fmt):
    _tp2_ep2_equals_transformers(*FORMATS[fmt](tmp_path))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_split_experts_refused(tmp_path, fmt):
    path, _ = FORMATS[fmt](tmp_path)
    cfg = ModelConfig.from_pretrained(path, "float64")
    check_tensor_parallel(cfg, 2)  # experts in EP: runs
    with pytest.raises(ValueError, match=f"{fmt} experts split over a TP group.*--expert-parallel-size 2"):
        check_tensor_parallel(cfg, 2, experts_split=True)


def _all_linears(fmt: str, tmp_path) -> tuple[str, str]:
    """Every projection quantized (ModelOpt's default NVFP4 recipe; an INT4 "all linears" release), on a Qwen3-MoE
    whose widths split over 2 ranks into whole groups (hidden, dense intermediate and o_proj's input 64: 32 a rank)."""
    src = int4_checkpoints.save_tiny(tmp_path / "float", "qwen3")
    if fmt == "int4":
        path = int4_checkpoints.int4_checkpoint(src, tmp_path / "int4", True, 32, "all")
        return path, path
    path = nvfp4_checkpoints.nvfp4_checkpoint(src, tmp_path / "nvfp4", scope="all")
    return path, nvfp4_checkpoints.dequantized_copy(path, tmp_path / "deq")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_tp2_ep2_all_linears_quantized_matches_transformers(local_ray, tmp_path, fmt):
    """The attention's and dense MLP's quantized linears dequantized at load from the rank's shard: q/k/v and
    gate/up by rows, o_proj and down_proj by input columns (each rank its columns' packed values and scales)."""
    _tp2_ep2_equals_transformers(*_all_linears(fmt, tmp_path))


def test_quantized_row_parallel_linear_needs_whole_groups(tmp_path):
    """A row-parallel linear quantized in groups along its input columns splits only into whole groups: the tiny
    NVFP4 Qwen3's dense intermediate 48 halves into 24 columns, not whole groups of 16: refused at load, naming
    the tensor."""
    from moelink.engine.rank.loader import load_model
    from moelink.kernels.ops import ReferenceKernels
    from moelink.moe.layer import ExpertParallel
    from moelink.moe.placement import ExpertPlacement

    path = nvfp4_checkpoints.nvfp4_checkpoint(nvfp4_checkpoints.save_tiny(tmp_path / "float", "qwen3"),
                                              tmp_path / "nvfp4", scope="all")
    cfg = ModelConfig.from_pretrained(path, "float64")
    placement = ExpertPlacement(num_experts=cfg.num_experts, ep_size=2)
    ep = ExpertParallel(0, 2, placement, None, placement.to_tensors(torch.device("cpu")))  # loading only
    with pytest.raises(ValueError, match=r"mlp\.down_proj\.weight' is quantized in groups of 16 .* whole groups"):
        load_model(cfg, ReferenceKernels(), torch.device("cpu"), ep=ep, tp=LoadOnlyTP(0, 2))
