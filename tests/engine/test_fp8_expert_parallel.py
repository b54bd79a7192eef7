"""FP8 experts under expert parallelism: a rank reads only its experts' weights AND scales (per-expert and
fused layouts, redundant replicas included, online quantization too, widths that are not a multiple of the
block), holding exactly the single-rank rows.
tests/ep/test_ep_fp8.py runs an EP 2 engine on Ray against one rank."""
from __future__ import annotations

import pytest
import torch

from moelink.comm.backends import make_all_to_all
from moelink.engine.config.model import ModelConfig
from moelink.engine.rank.loader import load_model
from moelink.kernels.fp8 import FP8_DTYPE
from moelink.kernels.ops import ReferenceKernels
from moelink.moe.layer import ExpertParallel
from moelink.moe.placement import ExpertPlacement

from tests.helpers.fp8_checkpoints import BLOCK

CPU = torch.device("cpu")
_PARAMS = ("w13_EFD", "w2_EDI", "w13_scale_inv_EFD", "w2_scale_inv_EDI")


def _ep(placement: ExpertPlacement, rank: int) -> ExpertParallel:
    return ExpertParallel(rank, placement.ep_size, placement, make_all_to_all("none", None, 0, 1, "cpu"),
                          placement.to_tensors("cpu"))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == FP8_DTYPE else t


# The *_ragged checkpoints' experts are not a multiple of the block wide (up rows padded to a block boundary
# per expert, or stacked as the fused tensor's scales say): a rank's rows are still the single rank's.
@pytest.mark.parametrize("name,fused,online", [("dsv3_fp8", False, False), ("qwen3_fp8", True, False),
                                               ("qwen3_fp8", False, True), ("dsv3_fp8_ragged", False, False),
                                               ("qwen3_fp8_ragged", True, False), ("qwen3_fp8_ragged", False, True)])
def test_rank_reads_its_experts_weights_and_scales(fp8_tiny, name, fused, online):
    src, dst, _ = fp8_tiny(name, fused)
    cfg = (ModelConfig.from_pretrained(src, "float32", quantization="fp8", fp8_block_size=BLOCK) if online
           else ModelConfig.from_pretrained(dst, "float32"))
    whole = load_model(cfg, ReferenceKernels(), CPU)
    # 6 experts + 2 replicas (experts 0 and 5) over 2 ranks: rank 0 holds 0, 1, 2, 5; rank 1 holds 3, 4, 5, 0.
    placement = ExpertPlacement(num_experts=6, ep_size=2, replicas=[0, 5])
    for rank in range(2):
        local = placement.experts_on_rank(rank)
        model = load_model(cfg, ReferenceKernels(), CPU, _ep(placement, rank))
        names = model.weight_plan(None if not fused else [f"model.layers.{i}.mlp.experts.gate_up_proj"
                                                           for i in cfg.sparse_layers])
        other = [e for e in range(6) if e not in local]
        assert not any(f".experts.{e}." in n for n in names for e in other)
        for i in cfg.sparse_layers:
            mine, full = model.layers[i].moe, whole.layers[i].moe
            assert mine.expert_format.name == "fp8" and mine.w13_EFD.dtype == FP8_DTYPE
            for p in _PARAMS:
                assert torch.equal(_bits(getattr(mine, p)), _bits(getattr(full, p)[local])), (rank, i, p)


def test_weight_bytes_per_format_match_the_tensors_and_the_planner(fp8_tiny):
    """The start-up report counts with planner.weight_bytes (what `moelink plan --precision fp8` prices): its
    total equals the bytes the rank's tensors really take, FP8 or float."""
    from moelink.engine.rank.weight_memory import describe_memory, weight_bytes_by_format
    from moelink.planner.kernels import WEIGHT_BYTES

    src, dst, _ = fp8_tiny("dsv3_fp8")
    placement = ExpertPlacement(num_experts=6, ep_size=2, replicas=[0])
    for path in (src, dst):
        model = load_model(ModelConfig.from_pretrained(path, "float32"), ReferenceKernels(), CPU, _ep(placement, 0))
        by_format = weight_bytes_by_format(model)
        real = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
        assert sum(by_format.values()) == real
        assert ("fp8" in by_format) == (path == dst)
        assert "weights" in describe_memory(by_format, 10, 16, 1 << 20)
    assert WEIGHT_BYTES["fp8"] == 1 + 4 / (128 * 128) and WEIGHT_BYTES["bf16"] == 2
