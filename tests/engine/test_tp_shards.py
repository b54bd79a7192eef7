"""Tensor parallelism's loading and checks, in one process: each TP rank reads exactly its shard of every split
tensor (bytes read per checkpoint tensor, against the file's own tensor sizes), and what TP cannot run is
refused naming the field."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from moelink.engine.config.model import ModelConfig, ParallelConfig
from moelink.engine.config.tensor_parallel import check_tensor_parallel
from moelink.engine.rank.loader import checkpoint_index, load_model
from moelink.kernels.ops import ReferenceKernels

CPU = torch.device("cpu")


class _LoadOnlyTP:
    """A TP rank's place without a process group: loading runs no collective."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size


def _file_bytes(path: str) -> dict[str, int]:
    out = {}
    for name, f in checkpoint_index(path).items():
        with safe_open(str(f), framework="pt") as st:
            t = st.get_slice(name)
            n = 1
            for d in t.get_shape():
                n *= d
            out[name] = n * {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1}[t.get_dtype()]
    return out


# Split by TP (each rank reads 1/2): attention projections, dense MLP, embedding and LM head; whole on every rank:
# norms, router, the MLA a-projections, shared experts; experts: every one at EP 1 (placement is the EP plan's).
SPLIT = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "q_b_proj.weight", "kv_b_proj.weight",
         "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "embed_tokens.weight", "lm_head.weight",
         "sinks", "q_proj.bias", "k_proj.bias", "v_proj.bias")


@pytest.mark.parametrize("which", ["qwen3", "dsv3", "mixtral"])
def test_each_rank_reads_its_shard(tiny_model, hf_tiny_model, which):
    path = {"qwen3": lambda: tiny_model("qwen3_e6k3"), "dsv3": lambda: hf_tiny_model("dsv3_lora"),
            "mixtral": lambda: tiny_model("mixtral_e5k3")}[which]()
    cfg = ModelConfig.from_pretrained(path, "float64")
    full = _file_bytes(path)
    reads = []
    for rank in range(2):
        got: dict[str, int] = {}
        load_model(cfg, ReferenceKernels(), CPU, tp=_LoadOnlyTP(rank, 2), read_bytes=got)
        reads.append(got)
    split = [n for n in reads[0] if n.endswith(SPLIT) and ".shared_experts." not in n and ".experts." not in n]
    assert split, "no tensor was split"
    for name, n in reads[0].items():
        if name in split and not (which == "mixtral" and name.endswith(("k_proj.weight", "v_proj.weight"))):
            assert n == full[name] // 2 == reads[1][name], name  # half each, never the other rank's half
        elif name in split:  # one kv head, replicated: each rank reads it whole
            assert n == full[name] == reads[1][name], name
        else:
            assert n == full[name] == reads[1][name], name
    assert sum(reads[0].values()) < sum(full[n] for n in reads[0])


def test_tp_refusals(tiny_model, hf_tiny_model):
    with pytest.raises(ValueError, match="tensor_parallel_size=2 is invalid with expert_parallel_size=3"):
        ParallelConfig(expert_parallel_size=3, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size=0 is invalid"):
        ParallelConfig(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="ep_rejoin=True .*tensor_parallel_size=2"):
        ParallelConfig(expert_parallel_size=4, tensor_parallel_size=2, ep_rejoin=True)
    assert ParallelConfig(expert_parallel_size=4, tensor_parallel_size=2).elastic_ep is False
    cfg = ModelConfig.from_pretrained(tiny_model("qwen3_e6k3"), "float64")  # 4 heads
    with pytest.raises(ValueError, match="num_attention_heads=4 is not a multiple of 3"):
        check_tensor_parallel(cfg, 3, "gqa")
    with pytest.raises(ValueError, match="DeepSeek-V4 is not sharded yet"):
        check_tensor_parallel(cfg, 2, "dsv4")
    dsa = ModelConfig.from_pretrained(hf_tiny_model("dsv32"), "float64")
    with pytest.raises(ValueError, match="DeepSeek Sparse Attention"):
        check_tensor_parallel(dsa, 2, "mla")
