"""Tensor parallelism's model-side checks, the flags' half of the feature (docs/tensor-parallelism.md): what a TP
group of N ranks cannot split yet is refused before the model is built.

`check_tp_layout` checks ParallelConfig's TP fields (the groups' place in the world, what TP does not compose with);
`check_tensor_parallel` refuses, one ValueError naming the field and the family, a model whose heads, intermediate
sizes or (FP8) block boundaries a group cannot divide. The split itself (a rank's attention view, its linears'
shards, its vocab rows and expert channels, the group's collectives) is the package engine/tp/.
"""
from __future__ import annotations

from ..models.compressed_attention_config import CompressedAttentionConfig
from ..models.shared_compressed_attention_config import SharedCompressedAttentionConfig
from .fp4_experts import published_expert_dtype
from ..models.gqa_config import GQAConfig
from ..models.mla_config import MLAConfig
from ..models.gated_deltanet_config import LinearAttentionConfig
from ..models.mamba1_config import Mamba1Config
from ..models.mamba2_config import Mamba2Config
from ..models.short_conv_config import ShortConvConfig

# The quantization formats TP runs: float and FP8 block-scaled linears load sharded (each rank reads its rows or
# columns and their block scales); MXFP4 (gpt-oss), INT4 (compressed-tensors, GPTQ, AWQ: Kimi K2.5's experts) and
# NVFP4 (ModelOpt) quantize the routed experts, which EP places whole (expert_parallel_size a multiple of tp): they
# cannot split by intermediate size (EXPERT_SPLIT_FORMATS).
TP_FORMATS = (None, "fp8", "mxfp4", "int4", "nvfp4")
EXPERT_SPLIT_FORMATS = (None, "fp8")


def check_tp_layout(par) -> bool:
    """ParallelConfig's TP fields (`par`), checked: a TP group is tensor_parallel_size consecutive ranks of one node;
    the world is a whole number of groups. Returns the elastic_ep the config keeps.
    What TP does not compose with yet is refused here, naming the flag (rejoin: a lost rank takes its whole TP
    group out, and a replacement rejoins one rank, not a group). Two-batch overlap composes: the
    group's ranks split every step alike (engine/rank/step_plan.py)."""
    t, n = par.tensor_parallel_size, par.expert_parallel_size
    if not isinstance(t, int) or isinstance(t, bool) or t < 1:
        raise ValueError(f"tensor_parallel_size={t!r} is invalid (--tensor-parallel-size / -tp): must be a "
                         "positive integer.")
    if t == 1:
        return par.elastic_ep
    if n > 1 and n % t:
        raise ValueError(f"tensor_parallel_size={t} is invalid with expert_parallel_size={n}: the world "
                         f"(expert_parallel_size ranks) is a whole number of TP groups, so {t} must divide {n}.")
    size = par.ep_nvlink_domain_size
    if size is not None and size % t:
        raise ValueError(f"tensor_parallel_size={t} is invalid with ep_nvlink_domain_size={size}: a TP group "
                         f"stays inside one node (NVLink domain), so {t} must divide the {size} GPUs of a node.")
    if par.ep_rejoin:
        raise ValueError(f"ep_rejoin=True (--ep-rejoin) is not supported with tensor_parallel_size={t} yet: "
                         "a lost rank takes its whole TP group out, and a rejoin admits one rank, not a group; "
                         "run without --ep-rejoin.")
    # Elastic EP under TP: a TP group cannot go on without one of its ranks, so a loss takes the whole group out
    # and the other groups serve on (engine/cluster/elastic.py); with one group there is nothing to go on with and
    # a loss fails the engine fast. Rejoin stays off (rejoin_enabled).
    return par.elastic_ep


def check_tensor_parallel(cfg, size: int, experts_split: bool = False) -> None:
    """Refuse, naming the field, a model that a TP group of `size` cannot split: heads, intermediate sizes and
    (FP8) block boundaries must divide; families and formats not sharded yet are named. experts_split: the experts
    split by intermediate size over the group too (expert_parallel_size 1: engine/tp/experts.py)."""
    if size == 1:
        return

    def bad(what: str) -> ValueError:
        return ValueError(f"tensor_parallel_size={size} (--tensor-parallel-size / -tp) is not supported for "
                          f"{cfg.architecture}: {what}")

    quant = cfg.quantization
    method = getattr(quant, "method", None)
    if method not in TP_FORMATS:
        raise bad(f"weights in {method!r} do not load sharded; run with -tp 1.")
    block = getattr(quant, "block", None) if method == "fp8" else None
    if experts_split and cfg.sparse_layers:
        _check_split_experts(cfg, size, method, quant, bad)
    if isinstance(cfg.attention, CompressedAttentionConfig):
        _check_compressed_attention(cfg, size, block, bad)
        return
    for layer in range(cfg.num_layers):
        a = cfg.attention_for(layer)
        if isinstance(a, Mamba1Config):
            raise bad("its Mamba1 layers are not sharded yet; run with -tp 1.")
        if isinstance(a, Mamba2Config):
            raise bad("its Mamba2 layers are not sharded yet; run with -tp 1.")
        if isinstance(a, ShortConvConfig):
            raise bad("its short-conv layers are not sharded yet; run with -tp 1.")
        if isinstance(a, LinearAttentionConfig):  # a rank holds whole q/k head groups (their value heads with them)
            if a.num_k_heads % size:
                raise bad(f"linear_num_key_heads={a.num_k_heads} (gated DeltaNet) is not a multiple of {size}.")
            continue
        if a.num_heads % size:
            raise bad(f"num_attention_heads={a.num_heads} is not a multiple of {size}.")
        if isinstance(a, GQAConfig):
            k = a.num_kv_heads
            if k % size and size % k:
                raise bad(f"num_key_value_heads={k} neither divides nor is a multiple of {size}.")
        elif isinstance(a, SharedCompressedAttentionConfig):  # a rank's heads feed exactly its output groups
            if a.o_groups % size:
                raise bad(f"o_groups={a.o_groups} is not a multiple of {size}.")
        elif not isinstance(a, MLAConfig):
            raise bad(f"{a.kind} attention is not sharded yet.")
    if cfg.intermediate_size % size and len(cfg.sparse_layers) < cfg.num_layers:
        raise bad(f"intermediate_size={cfg.intermediate_size} (the dense MLP) is not a multiple of {size}.")
    if block is not None:
        bn, bk = block
        widths = {"intermediate_size": cfg.intermediate_size}
        for name, width in widths.items():
            if (width // size) % bn or (width // size) % bk:
                raise bad(f"{name}={width} split {size} ways is not a whole number of FP8 blocks {list(block)}.")
        for layer in range(cfg.num_layers):
            a = cfg.attention_for(layer)
            if isinstance(a, LinearAttentionConfig):  # float only (engine/models/gated_deltanet.py)
                continue
            if isinstance(a, SharedCompressedAttentionConfig):  # dequantized at load from the blocks covering a shard
                continue
            if isinstance(a, GQAConfig):  # a gated q_proj holds each head's gate rows beside its query rows
                rows = {"q heads": a.num_heads // size * a.head_dim * (2 if a.output_gate else 1),
                        "kv heads": max(1, a.num_kv_heads // size) * a.head_dim,
                        "o_proj columns": a.num_heads // size * a.value_head_dim}
            else:
                q_name = "q_b_proj heads" if a.q_lora_rank is not None else "q_proj heads"
                rows = {q_name: a.num_heads // size * a.qk_head_dim,
                        "kv_b_proj heads": a.num_heads // size * (a.qk_nope_head_dim + a.v_head_dim),
                        "o_proj columns": a.num_heads // size * a.v_head_dim}
            for name, r in rows.items():
                if r % bn or (name == "o_proj columns" and r % bk):
                    raise bad(f"layer {layer}'s {name} per rank ({r}) is not a whole number of FP8 blocks "
                              f"{list(block)}.")


def _check_split_experts(cfg, size: int, method, quant, bad) -> None:
    """The experts split by intermediate size over the group (expert_parallel_size 1): each rank's channels of
    the routed and shared experts a whole share (and whole FP8 blocks); packed expert formats refused."""
    ep_hint = f"pass --expert-parallel-size {size} (or a multiple) to place the experts in EP instead."
    if cfg.moe_intermediate_size % size:
        raise bad(f"moe_intermediate_size={cfg.moe_intermediate_size} is not a multiple of {size}, so the experts "
                  f"cannot split over the TP group; {ep_hint}")
    shared = cfg.moe.shared_expert_intermediate_size or cfg.moe_intermediate_size * cfg.moe.n_shared_experts
    if shared % size:
        raise bad(f"the shared experts' intermediate size {shared} is not a multiple of {size}; {ep_hint}")
    if method not in EXPERT_SPLIT_FORMATS:
        raise bad(f"{method} experts split over a TP group (expert_parallel_size=1) are not built; {ep_hint}")
    # packed e2m1 in groups of 32 along K, held packed (engine/config/fp4_experts.py): beside FP8 linears only
    if method == "fp8" and published_expert_dtype(cfg.hf_config) == "fp4":
        raise bad(f"quantization_config.expert_dtype='fp4' experts split over a TP group (expert_parallel_size=1) "
                  f"are not built; {ep_hint}")
    if method == "fp8":
        w, (bn, bk) = cfg.moe_intermediate_size // size, quant.block
        if w % bn or w % bk or (shared // size) % bn or (shared // size) % bk:
            raise bad(f"moe_intermediate_size={cfg.moe_intermediate_size} split {size} ways is not a whole "
                      f"number of FP8 blocks {list(quant.block)} per rank; {ep_hint}")


def _check_compressed_attention(cfg, size: int, block, bad) -> None:
    """Compressed attention (DeepSeek-V4's) split over the group: heads and output groups (wo_a) divide; under its
    published FP8 format a rank's wq_b rows and wo_b columns are whole blocks (wo_a's rows need not be: its scales are
    held in finer rows, engine/models/deepseek_v4/weights.py)."""
    for layer in range(cfg.num_layers):
        a = cfg.attention_for(layer)
        if a.num_heads % size:
            raise bad(f"num_attention_heads={a.num_heads} is not a multiple of {size}.")
        if a.o_groups % size:
            raise bad(f"o_groups={a.o_groups} is not a multiple of {size}: the grouped output projection (wo_a) "
                      "splits by whole groups.")
        if block is not None:
            bn, bk = block
            rows, cols = a.num_heads // size * a.head_dim, a.o_groups // size * a.o_lora_rank
            if rows % bn:
                raise bad(f"layer {layer}'s wq_b rows per rank ({rows}: num_attention_heads / {size} x head_dim) are "
                          f"not a whole number of FP8 blocks {list(block)} (quantization_config.weight_block_size).")
            if cols % bk:
                raise bad(f"layer {layer}'s wo_b columns per rank ({cols}: o_groups / {size} x o_lora_rank) are not "
                          f"a whole number of FP8 blocks {list(block)} (quantization_config.weight_block_size).")


__all__ = ["EXPERT_SPLIT_FORMATS", "TP_FORMATS", "check_tensor_parallel", "check_tp_layout"]
