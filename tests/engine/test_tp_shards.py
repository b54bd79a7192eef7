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

from tests.helpers.gpt_oss_checkpoints import save_gpt_oss

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


# Whole on every rank: norms, the router, o_proj's bias (added once, after the all-reduce), MLA's a-projections (the latent is every head's), the correction bias; a
# single kv head (Mixtral) is replicated. Everything else (attention projections, sinks and biases, dense MLP,
# embedding, LM head, and at expert_parallel_size 1 every expert's and shared expert's channels) is read half by
# each rank; gpt-oss's expert down bias by the group's first rank only.
REPLICATED = ("norm.weight", "layernorm.weight", ".gate.weight", "router.weight", "router.bias", "q_a_proj.weight",
              "kv_a_proj_with_mqa.weight", "e_score_correction_bias", "o_proj.bias")


@pytest.mark.parametrize("which", ["qwen3", "dsv3", "mixtral", "gpt_oss"])
def test_each_rank_reads_its_shard(tiny_model, hf_tiny_model, tmp_path, which):
    path = {"qwen3": lambda: tiny_model("qwen3_e6k3"), "dsv3": lambda: hf_tiny_model("dsv3_lora"),
            "mixtral": lambda: tiny_model("mixtral_e5k3"),
            "gpt_oss": lambda: save_gpt_oss(tmp_path, num_hidden_layers=2)}[which]()
    cfg = ModelConfig.from_pretrained(path, "float64")
    full = _file_bytes(path)
    reads = []
    for rank in range(2):
        got: dict[str, int] = {}
        load_model(cfg, ReferenceKernels(), CPU, tp=_LoadOnlyTP(rank, 2), read_bytes=got)
        reads.append(got)
    names = set(reads[0]) | set(reads[1])
    assert names == set(full), set(full) ^ names  # every tensor read by some rank
    whole = [n for n in names if n.endswith(REPLICATED)
             or (which == "mixtral" and n.endswith(("k_proj.weight", "v_proj.weight")))]
    for name in names:
        if name in whole:
            assert reads[0][name] == reads[1][name] == full[name], name
        elif name.endswith("down_proj_bias"):
            assert reads[0][name] == full[name] and name not in reads[1], name
        else:  # half each, never the other rank's half
            assert reads[0][name] == reads[1][name] == full[name] // 2, name
    assert sum(reads[0].values()) < 0.6 * sum(full.values())


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


@pytest.mark.parametrize("name,split,fused", [("qwen3_fp8", False, False), ("dsv3_fp8", False, False),
                                              ("qwen3_fp8", True, False), ("qwen3_fp8", True, True),
                                              ("dsv3_fp8", True, False)])
def test_fp8_rank_reads_its_rows_and_block_scales(fp8_tiny, name, split, fused):
    """FP8 block-scaled linears under TP 2: each rank reads half of every split weight and half of its
    weight_scale_inv (the block rows, or block columns, of its shard); DeepSeek-V3's q_b / kv_b by head, its
    a-projections whole. Experts in EP 2 (shared experts whole), or (`split`) every expert's and shared expert's
    channels halved, their block scales with them (`fused`: experts.gate_up_proj's gate and up runs read apart)."""
    from moelink.moe.layer import ExpertParallel
    from moelink.moe.placement import ExpertPlacement

    _, path, _ = fp8_tiny(name, fused=fused, block=(8, 8))
    cfg = ModelConfig.from_pretrained(path, "float64")
    full = _file_bytes(path)
    reads = []
    for rank in range(2):
        placement = ExpertPlacement(num_experts=cfg.num_experts, ep_size=2)
        ep = ExpertParallel(rank, 2, placement, None, placement.to_tensors(CPU))  # loading only: no all-to-all
        ep = None if split else ep
        got: dict[str, int] = {}
        load_model(cfg, ReferenceKernels(), CPU, ep=ep, tp=_LoadOnlyTP(rank, 2), read_bytes=got)
        reads.append(got)
    whole = REPLICATED + tuple(r.replace(".weight", ".weight_scale_inv") for r in REPLICATED)
    halved = [n for n in reads[0] if (split or (".experts." not in n and ".shared_experts." not in n))
              and not n.endswith(whole)
              and n.endswith(("proj.weight", "proj.weight_scale_inv", "embed_tokens.weight", "lm_head.weight",
                              "experts.gate_up_proj", "experts.down_proj", "_proj_scale_inv"))]
    assert not split or any(".experts." in n and "down_proj" in n and n.endswith("scale_inv") for n in halved)
    assert any(n.endswith("o_proj.weight_scale_inv") for n in halved) and any(".mlp.down_proj." in n for n in halved)
    for name in halved:
        assert reads[0][name] == reads[1][name] == full[name] // 2, name
