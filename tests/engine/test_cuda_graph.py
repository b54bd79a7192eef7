"""Decode CUDA graphs (engine/rank/cuda_graph.py): which sizes are captured, and bad input.

The padded static-buffer path itself runs in tests/kernels/test_decode_graphs.py
(it needs the Triton interpreter, which that folder's conftest switches on).
"""
from __future__ import annotations

import pytest
import torch

from moelink.engine import EngineArgs
from moelink.engine.config.graph_config import CudaGraphConfig, default_graph_sizes


# -- configuration ---------------------------------------------------------------------------------------------
def test_default_sizes_cover_every_batch_up_to_max_num_seqs():
    sizes = default_graph_sizes(256)
    assert sizes[:5] == (1, 2, 4, 8, 16) and sizes[-1] == 256
    assert list(sizes) == sorted(set(sizes))
    assert default_graph_sizes(3) == (1, 2, 3)
    assert default_graph_sizes(100)[-1] == 100 and default_graph_sizes(4096)[-1] == 512
    # Padding waste stays bounded: the next size is never more than 2x (small) or +32 (large) away.
    for a, b in zip(sizes, sizes[1:]):
        assert b <= max(2 * a, a + 32)


def test_resolve_is_off_on_cpu_and_with_enforce_eager():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert CudaGraphConfig.resolve(False, None, 64, cpu).batch_sizes == ()
    assert CudaGraphConfig.resolve(True, None, 64, cuda).batch_sizes == ()
    assert CudaGraphConfig.resolve(False, None, 64, cuda).batch_sizes == default_graph_sizes(64)
    assert CudaGraphConfig.resolve(False, [8, 1, 2], 64, cuda).batch_sizes == (1, 2, 8)
    assert not CudaGraphConfig.resolve(False, [1], 64, cpu).enabled


@pytest.mark.parametrize("sizes, match", [
    ([0], "positive integer"), ([-4], "positive integer"), ([True], "positive integer"), ([2.0], "positive integer"),
    ([4, 4], "distinct"), ([1, 512], "above max_num_seqs=64"),
])
def test_bad_sizes_are_refused_naming_the_field(sizes, match):
    with pytest.raises(ValueError, match=match) as e:
        CudaGraphConfig.resolve(False, sizes, 64, torch.device("cpu"))
    assert "cuda_graph_sizes" in str(e.value)


def test_engine_args_refuse_a_non_list(tiny_model):
    with pytest.raises(ValueError, match="cuda_graph_sizes=8 is invalid"):
        EngineArgs(model=tiny_model("qwen3_e6k3"), cuda_graph_sizes=8)
    with pytest.raises(ValueError, match="cuda_graph_sizes contains 0"):
        EngineArgs(model=tiny_model("qwen3_e6k3"), cuda_graph_sizes=[0], device="cpu").create_engine_config()


def test_cli_flags_reach_engine_args():
    from moelink.engine.api.cli import build_parser, engine_args_from

    ns = build_parser().parse_args(["generate", "m", "--prompt", "x", "--cuda-graph-sizes", "1", "2", "8"])
    assert engine_args_from(ns).cuda_graph_sizes == [1, 2, 8] and not engine_args_from(ns).enforce_eager
    ns = build_parser().parse_args(["generate", "m", "--prompt", "x", "--enforce-eager"])
    assert engine_args_from(ns).enforce_eager and engine_args_from(ns).cuda_graph_sizes is None


def test_enforce_eager_must_be_a_bool_and_empty_sizes_mean_eager():
    with pytest.raises(ValueError, match="enforce_eager='yes' is invalid"):
        CudaGraphConfig.resolve("yes", None, 64, torch.device("cuda"))
    assert not CudaGraphConfig.resolve(False, [], 64, torch.device("cuda")).enabled
    with pytest.raises(ValueError, match="cuda_graph_sizes=.* is invalid"):
        CudaGraphConfig([1, 2])  # the dataclass itself takes a tuple; resolve() converts lists
