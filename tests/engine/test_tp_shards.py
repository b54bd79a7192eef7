"""Tensor parallelism's loading and checks, in one process: each TP rank reads exactly its shard of every split
tensor (bytes read per checkpoint tensor, against the file's own tensor sizes), and what TP cannot run is
refused naming the field."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from moelink.engine.config.checkpoint_headers import text_model_name
from moelink.engine.config.model import ModelConfig
from moelink.engine.config.parallel import ParallelConfig
from moelink.engine.config.tensor_parallel import check_tensor_parallel
from moelink.engine.rank.loader import checkpoint_index, load_model
from moelink.kernels.ops import ReferenceKernels

from tests.helpers.gpt_oss_checkpoints import save_gpt_oss
from tests.helpers.m2_checkpoints import save_m2_checkpoint

CPU = torch.device("cpu")


class _LoadOnlyTP:
    """A TP rank's place without a process group: loading runs no collective."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size


def _file_bytes(path: str, prefix: str = "") -> dict[str, int]:
    """Bytes of each checkpoint tensor, under the name the text model reads it by (a multimodal checkpoint's
    other towers left out)."""
    out = {}
    for real, f in checkpoint_index(path).items():
        name = text_model_name(real, prefix) if prefix else real
        if name is None:
            continue
        with safe_open(str(f), framework="pt") as st:
            t = st.get_slice(real)
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


# Also whole on every rank in the families of tests/ep/test_tp_families.py: DSA's indexer (every rank selects the
# same positions; GLM-5's layer sharing the last selection has none), GLM-5's a-projection biases (with their
# whole weights), gated DeltaNet's norm weight (one [V] every head shares), Qwen3-Next's shared expert gate. Halved
# there: MiniMax-M2's all-heads q/k norm weights (each rank's heads' part), gated DeltaNet's every projection, conv
# channels, dt_bias and A_log (its head groups), DeepSeek-V2-Lite's q_proj (by head; kv_a whole).
FAMILY_WHOLE = (".indexer.", "q_a_proj.bias", "kv_a_proj_with_mqa.bias", "linear_attn.norm.weight",
                "shared_expert_gate.weight")
FAMILIES = {"qwen3_next": "hf", "qwen3_5_moe": "hf", "dsv2_lite": "hf", "dsv32": "hf", "glm5": "hf", "minimax": "m2"}


@pytest.mark.parametrize("which", ["qwen3", "dsv3", "mixtral", "gpt_oss", *FAMILIES])
def test_each_rank_reads_its_shard(tiny_model, hf_tiny_model, tmp_path, which):
    path = {"qwen3": lambda: tiny_model("qwen3_e6k3"), "dsv3": lambda: hf_tiny_model("dsv3_lora"),
            "mixtral": lambda: tiny_model("mixtral_e5k3"),
            "gpt_oss": lambda: save_gpt_oss(tmp_path, num_hidden_layers=2),
            "minimax": lambda: save_m2_checkpoint(tmp_path, "minimax", num_hidden_layers=2)}.get(
                which, lambda: hf_tiny_model(which))()
    cfg = ModelConfig.from_pretrained(path, "float64")
    full = _file_bytes(path, cfg.text_weights_prefix)
    reads = []
    for rank in range(2):
        got: dict[str, int] = {}
        load_model(cfg, ReferenceKernels(), CPU, tp=_LoadOnlyTP(rank, 2), read_bytes=got)
        reads.append(got)
    names = set(reads[0]) | set(reads[1])
    assert names == set(full), set(full) ^ names  # every tensor read by some rank
    whole = [n for n in names if (n.endswith(REPLICATED) and not (which == "minimax" and "_norm." in n))
             or any(w in n for w in FAMILY_WHOLE)
             or (which == "mixtral" and n.endswith(("k_proj.weight", "v_proj.weight")))]
    if which in FAMILIES:  # the pieces these families shard their own way are among the halved ones
        halved = set(names) - set(whole)
        assert any(n.endswith({"qwen3_next": "in_proj_qkvz.weight", "qwen3_5_moe": "conv1d.weight",
                               "dsv2_lite": "self_attn.q_proj.weight", "dsv32": "q_b_proj.weight",
                               "glm5": "kv_b_proj.weight", "minimax": "q_norm.weight"}[which]) for n in halved)
    for name in names:
        if name in whole:
            assert reads[0][name] == reads[1][name] == full[name], name
        elif name.endswith("down_proj_bias"):
            assert reads[0][name] == full[name] and name not in reads[1], name
        else:  # half each, never the other rank's half
            assert reads[0][name] == reads[1][name] == full[name] // 2, name
    # DSA's indexers (wq_b: 16 heads of 12-16 from the q latent) are whole on every rank: a larger share here.
    assert sum(reads[0].values()) < (0.65 if which in ("dsv32", "glm5") else 0.6) * sum(full.values())


def test_tp_refusals(tiny_model, hf_tiny_model):
    with pytest.raises(ValueError, match="tensor_parallel_size=2 is invalid with expert_parallel_size=3"):
        ParallelConfig(expert_parallel_size=3, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size=0 is invalid"):
        ParallelConfig(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="ep_rejoin=True .*tensor_parallel_size=2"):
        ParallelConfig(expert_parallel_size=4, tensor_parallel_size=2, ep_rejoin=True)
    # Elastic EP stays on under TP (a loss takes its TP group out); rejoin is off by default there.
    par = ParallelConfig(expert_parallel_size=4, tensor_parallel_size=2)
    assert par.elastic_ep is True and par.rejoin_enabled is False
    assert ParallelConfig(expert_parallel_size=4).rejoin_enabled is True
    cfg = ModelConfig.from_pretrained(tiny_model("qwen3_e6k3"), "float64")  # 4 heads
    with pytest.raises(ValueError, match="num_attention_heads=4 is not a multiple of 3"):
        check_tensor_parallel(cfg, 3)
    # The families sharded their own way still refuse sizes that do not divide, naming the field.
    dsa = ModelConfig.from_pretrained(hf_tiny_model("dsv32"), "float64")
    check_tensor_parallel(dsa, 2)
    with pytest.raises(ValueError, match="num_attention_heads=4 is not a multiple of 3"):
        check_tensor_parallel(dsa, 3)
    hybrid = ModelConfig.from_pretrained(hf_tiny_model("qwen3_next"), "float64")  # 2 q/k heads of linear attention
    check_tensor_parallel(hybrid, 2, experts_split=True)
    with pytest.raises(ValueError, match=r"linear_num_key_heads=2 \(gated DeltaNet\) is not a multiple of 4"):
        check_tensor_parallel(hybrid, 4)


@pytest.mark.parametrize("name,split,fused", [("qwen3_fp8", False, False), ("dsv3_fp8", False, False),
                                              ("qwen3_fp8", True, False), ("qwen3_fp8", True, True),
                                              ("dsv3_fp8", True, False), ("dsv3_fp8_noq", False, False)])
def test_fp8_rank_reads_its_rows_and_block_scales(fp8_tiny, name, split, fused):
    """FP8 block-scaled linears under TP 2: each rank reads half of every split weight and half of its
    weight_scale_inv (the block rows, or block columns, of its shard); DeepSeek-V3's q_b / kv_b by head, its
    a-projections whole (without q LoRA: q_proj by head, its block scales' block rows with it, kv_a whole). Experts in EP 2 (shared experts whole), or (`split`) every expert's and shared expert's
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
