"""Compile cases of the fused decode kernels (benchmarks/compile_report.py's `decode` family): the GQA and MLA
attention inputs (norms, rotary, paged-KV / latent write) and router top-k at the engine's model shapes, bf16 and
fp8 caches, and SiLU·mul; the shared machinery (Recorder, shapes) is benchmarks/compile_cases.py's."""
from __future__ import annotations

from typing import Any

import torch

from .compile_cases import Recorder

# (model, experts, top-k, logits' dtype, route_topk's keywords) of the router cases.
ROUTERS: list[tuple[str, int, int, torch.dtype, dict[str, Any]]] = [
    ("qwen3-30b-a3b", 128, 8, torch.bfloat16, dict(renormalize=True)),
    ("deepseek-v2-lite", 64, 6, torch.float32, {}),
    ("deepseek-v2", 160, 6, torch.float32, dict(method="group_limited_greedy", n_group=8, topk_group=3)),
    ("deepseek-v3", 256, 8, torch.float32, dict(method="noaux_tc", renormalize=True, scale=2.5, n_group=8,
                                                topk_group=4))]


def _compile_fused_inputs(rec: Recorder, quick: bool) -> None:
    """The decode attention input in one launch (kernels/triton_qkv_rope_kv.py: norm, q/k/v GEMV, rope_write_kv)
    and its output in one more (kernels/triton_linear_norm.py: o_proj GEMV, residual add, norm) at batch 1 and 4
    of Qwen3-30B-A3B (D 2048, 32/4 heads of 128, q/k norm; also its FP8 checkpoint's e4m3 projections), gpt-oss-120b
    (D 2880, 64/8 heads of 64, qkv bias) and GLM-4.5-Air (D 4096, 96/8 heads of 128, rotary over 64, qkv bias): the
    block of rows and the grid as an H100's 132 SMs pick them."""
    from moelink.kernels.triton_linear_norm import token_counters, triton_linear_add_rms_norm
    from moelink.kernels.triton_qkv_rope_kv import group_counters, triton_norm_qkv_rope_kv

    meta = dict(device="meta")
    dt = torch.bfloat16
    shapes = [("qwen3-30b-a3b", 2048, 32, 4, 128, 128, True, False), ("gpt-oss-120b", 2880, 64, 8, 64, 64, False, True),
              ("glm-4.5-air", 4096, 96, 8, 128, 64, True, True)]
    for name, D, N, K, H, R, norm, bias in shapes[:1] if quick else shapes:
        rows = N * H + 2 * K * H
        cache = torch.empty(1000, 16, K, H, dtype=dt, **meta)
        qw = torch.empty(H, dtype=dt, **meta) if norm else None
        for T in (1,) if quick else (1, 4):
            x = torch.empty(T, D, dtype=dt, **meta)
            pos, slots = torch.empty(T, dtype=torch.long, **meta), torch.empty(T, dtype=torch.long, **meta)
            with rec.labelled(f"{name} attention input in one launch (norm + qkv GEMV + rotary + KV write), T={T}"):
                triton_norm_qkv_rope_kv(x, torch.empty_like(x), torch.empty(D, dtype=dt, **meta), 1e-6,
                                        torch.empty(rows, D, dtype=dt, **meta),
                                        torch.empty(rows, dtype=dt, **meta) if bias else None, N, K, H, pos,
                                        torch.empty(4096, R, **meta), cache, cache, slots, qw, qw, 1e-6,
                                        counters_G=group_counters(N, K, "meta"))
            o = torch.empty(T, N * H, dtype=dt, **meta)
            with rec.labelled(f"{name} attention output in one launch (o_proj GEMV + residual add + norm), T={T}"):
                triton_linear_add_rms_norm(o, torch.empty(D, N * H, dtype=dt, **meta),
                                           torch.empty(D, dtype=dt, **meta) if bias else None, x,
                                           torch.empty(D, dtype=dt, **meta), 1e-6, counters_T=token_counters("meta"))
            if name == "qwen3-30b-a3b":
                _compile_fp8_gemvs(rec, name, x, o, rows, N, K, H, R, cache, qw, pos, slots)


def _compile_fp8_gemvs(rec: Recorder, name: str, x, o, rows: int, N: int, K: int, H: int, R: int, cache, qw, pos,
                       slots) -> None:
    """The two attention launches over an FP8 checkpoint's e4m3 projections in 128 x 128 blocks (Qwen3-30B-A3B-FP8:
    W8A8, the input row quantized by every program), the output launch also quantizing the FP8 experts' input."""
    from moelink.kernels.fp8 import FP8_DTYPE, block_scale_shape
    from moelink.kernels.triton_linear_norm import token_counters, triton_linear_add_rms_norm_fp8
    from moelink.kernels.triton_qkv_rope_kv import group_counters, triton_norm_qkv_rope_kv

    meta = dict(device="meta")
    T, D = x.shape
    nw = torch.empty(D, dtype=x.dtype, **meta)
    w_qkv, w_o = torch.empty(rows, D, dtype=FP8_DTYPE, **meta), torch.empty(D, N * H, dtype=FP8_DTYPE, **meta)
    s_qkv = torch.empty(block_scale_shape(rows, D), **meta)
    s_o = torch.empty(block_scale_shape(D, N * H), **meta)
    with rec.labelled(f"{name} FP8 attention input in one launch (norm + quant + e4m3 qkv GEMV + rotary + KV "
                      f"write), T={T}"):
        triton_norm_qkv_rope_kv(x, torch.empty_like(x), nw, 1e-6, w_qkv, None, N, K, H, pos,
                                torch.empty(4096, R, **meta), cache, cache, slots, qw, qw, 1e-6,
                                counters_G=group_counters(N, K, "meta"), w_scale_inv=s_qkv)
    with rec.labelled(f"{name} FP8 attention output in one launch (quant + e4m3 o_proj GEMV + add + norm + the "
                      f"experts' quant), T={T}"):
        triton_linear_add_rms_norm_fp8(o, w_o, None, x, nw, 1e-6, 128, counters_T=token_counters("meta"),
                                       w_scale_inv=s_o)


def compile_decode_inputs(rec: Recorder, quick: bool) -> None:
    """The fused decode-step kernels: the GQA attention input (q/k norm + rotary + KV write) at Qwen3-30B-A3B
    (32/4 heads of 128, q/k norm), gpt-oss (64/8 heads of 64, no norm) and GLM-4.5-Air (96/8 heads of 128, rotary
    over 64) shapes, bf16 and fp8 caches; the MLA attention input at DeepSeek-V2-Lite (16 heads, complex rope) and
    V3 (128 heads, neox); the shared experts' SiLU(gate)·up; router top-k at Qwen3 (128 experts, top-8, bf16 logits), V2-Lite (64, top-6), V2 (160
    in 8 groups, 3 kept) and V3 (256 in 8 groups, 4 kept, sigmoid + bias), with the padding mask and counts."""
    from moelink.kernels.triton_mla_input import triton_mla_rope_write_latent
    from moelink.kernels.triton_rope_kv import triton_rope_write_kv
    from moelink.kernels.triton_router_topk import triton_route_topk

    meta = dict(device="meta")
    T, L = 33, 16
    pos, slots = torch.empty(T, dtype=torch.long, **meta), torch.empty(T, dtype=torch.long, **meta)
    dt = torch.bfloat16
    gqa = [("qwen3-30b-a3b", 32, 4, 128, 128, True), ("gpt-oss", 64, 8, 64, 64, False),
           ("glm-4.5-air", 96, 8, 128, 64, True)]
    for name, N, K, H, R, norm in gqa[:1] if quick else gqa:
        for cache_dt in (dt,) if quick or name != "qwen3-30b-a3b" else (dt, torch.float8_e4m3fn):
            qkv = torch.empty(T, (N + 2 * K) * H, dtype=dt, **meta)
            q, k, v = qkv[:, :N * H].view(T, N, H), qkv[:, N * H:(N + K) * H].view(T, K, H), qkv[:, (N + K) * H:].view(T, K, H)
            cache = torch.empty(1000, L, K, H, dtype=cache_dt, **meta)
            qw, kw = (torch.empty(H, dtype=dt, **meta), torch.empty(H, dtype=dt, **meta)) if norm else (None, None)
            with rec.labelled(f"{name} attention input (norm + rotary + KV write), {str(cache_dt)[6:]} cache"):
                triton_rope_write_kv(q, k, v, pos, torch.empty(4096, R, **meta), cache, cache, slots, qw, kw, 1e-6)
    _compile_fused_inputs(rec, quick)
    C, P = 512, 64
    for name, N, style in [("deepseek-v2-lite", 16, "complex")] + ([] if quick else [("deepseek-v3", 128, "neox")]):
        q = torch.empty(T, N, 192, dtype=dt, **meta)
        kv = torch.empty(T, C + P, dtype=dt, **meta)
        table = (torch.empty(4096, P // 2, dtype=torch.complex64, **meta) if style == "complex"
                 else torch.empty(4096, P, **meta))
        for cache_dt in (dt,) if quick else (dt, torch.float8_e4m3fn):
            cache = torch.empty(1000, L, C + P, dtype=cache_dt, **meta)
            with rec.labelled(f"{name} MLA input (latent norm + {style} rotary + latent write), {str(cache_dt)[6:]} cache"):
                triton_mla_rope_write_latent(q[..., 128:], kv[:, :C], kv[:, C:], pos, table, style,
                                             torch.empty(C, dtype=dt, **meta), 1e-6, cache, slots)
    routers = ROUTERS
    from moelink.kernels.triton_silu_mul import triton_silu_mul

    for name, I in [("deepseek-v2-lite shared experts", 2816)] + ([] if quick else [("deepseek-v3 shared expert", 2048)]):
        gu = torch.empty(T, 2 * I, dtype=dt, **meta)
        with rec.labelled(f"{name} SiLU(gate)·up, I={I}"):
            triton_silu_mul(gu[:, :I], gu[:, I:])
    _compile_mlp_gemvs(rec, quick)
    from moelink.kernels.triton_lora import triton_lora_expand, triton_lora_shrink

    slots_T = torch.empty(T, dtype=torch.long, **meta)
    for L_, R_ in [(8, 16)] + ([] if quick else [(4, 64)]):  # qwen3-30b-a3b's q_proj: 2048 -> 4096
        with rec.labelled(f"qwen3-30b-a3b LoRA shrink + expand (q_proj, rank {R_}, {L_} slots)"):
            t_TR = triton_lora_shrink(torch.empty(T, 2048, dtype=dt, **meta), torch.empty(L_, R_, 2048, dtype=dt, **meta),
                                      slots_T)
            triton_lora_expand(torch.empty(T, 4096, dtype=dt, **meta), t_TR, torch.empty(L_, 4096, R_, dtype=dt, **meta),
                               slots_T, torch.empty(L_, **meta))
    with rec.labelled("qwen3-30b-a3b routed experts' LoRA (4 slots of rank 16; decode and prefill)"):
        launch_lora_moe()
    for name, G, K, logit_dt, args in routers[:1] if quick else routers:
        bias = torch.empty(G, **meta) if args.get("method") == "noaux_tc" else None
        with rec.labelled(f"{name} router top-k ({G} experts, top-{K}), padding mask + expert counts"):
            triton_route_topk(torch.empty(T, G, dtype=logit_dt, **meta), K, **args, bias_G=bias,
                              valid_T=torch.empty(T, dtype=torch.bool, **meta),
                              counts_G=torch.empty(G, dtype=torch.int64, **meta))
    _compile_gate_topk(rec, routers if not quick else routers[:1], quick)


def _compile_mlp_gemvs(rec: Recorder, quick: bool) -> None:
    """A decode batch's dense MLP as two GEMVs (kernels/triton_mlp_gemv.py: gate-up with SiLU·up, down with the
    routed experts' sum added) at DeepSeek-V2-Lite's shared experts (D 2048, I 2 x 1408) and DeepSeek-V3's (D 7168,
    I 2048), bf16 and FP8 (128 x 128 blocks, W8A8), batch 1 and 4."""
    from moelink.kernels.fp8 import FP8_DTYPE, block_scale_shape
    from moelink.kernels.triton_mlp_gemv import triton_gate_up_silu_mul, triton_linear_add

    meta = dict(device="meta")
    dt = torch.bfloat16
    shapes = [("deepseek-v2-lite shared experts", 2048, 2816), ("deepseek-v3 shared expert", 7168, 2048)]
    for name, D, I in shapes[:1] if quick else shapes:
        for T in (1,) if quick else (1, 4):
            x, h = torch.empty(T, D, dtype=dt, **meta), torch.empty(T, I, dtype=dt, **meta)
            for fp8 in (False, True):
                wdt = FP8_DTYPE if fp8 else dt
                gu, down = torch.empty(2 * I, D, dtype=wdt, **meta), torch.empty(D, I, dtype=wdt, **meta)
                kw_gu = dict(w_scale_inv=torch.empty(block_scale_shape(2 * I, D), **meta)) if fp8 else {}
                kw_down = dict(w_scale_inv=torch.empty(block_scale_shape(D, I), **meta)) if fp8 else {}
                kind = "FP8 " if fp8 else ""
                with rec.labelled(f"{name} {kind}gate-up GEMV + SiLU·up in one launch, T={T}"):
                    triton_gate_up_silu_mul(x, gu, I, I, **kw_gu)
                with rec.labelled(f"{name} {kind}down GEMV + the routed sum in one launch, T={T}"):
                    triton_linear_add(h, down, x, **kw_down)


def compile_fused_decode(rec: Recorder) -> None:
    """The decode GEMVs that carry a layer's small ops, alone (compile_tiny --cases fused): the attention input
    and output at every GQA shape, the router at every router shape, the dense MLP's two GEMVs, batches 1 and 4."""
    _compile_fused_inputs(rec, False)
    _compile_gate_topk(rec, ROUTERS, False)
    _compile_mlp_gemvs(rec, False)


def _compile_gate_topk(rec: Recorder, routers: list, quick: bool) -> None:
    """The router in one launch (kernels/triton_router_gemv.py: the gate GEMV, then route_topk's row) at batch 1
    and 4 of each router above, its gate in the logits' dtype (DeepSeek's float32), x bf16."""
    from moelink.kernels.triton_router_gemv import triton_gate_route_topk

    meta = dict(device="meta")
    hidden = {"qwen3-30b-a3b": 2048, "deepseek-v2-lite": 2048, "deepseek-v2": 5120, "deepseek-v3": 7168}
    for name, G, K, logit_dt, args in routers:
        bias = torch.empty(G, **meta) if args.get("method") == "noaux_tc" else None
        for T in (1,) if quick else (1, 4):
            with rec.labelled(f"{name} router in one launch (gate GEMV + top-k, {G} experts), T={T}"):
                triton_gate_route_topk(torch.empty(T, hidden[name], dtype=torch.bfloat16, **meta),
                                       torch.empty(G, hidden[name], dtype=logit_dt, **meta), None, K, **args,
                                       bias_G=bias, valid_T=torch.empty(T, dtype=torch.bool, **meta),
                                       counts_G=torch.empty(G, dtype=torch.int64, **meta),
                                       counters_T=torch.empty(8, dtype=torch.int32, **meta))


def launch_lora_moe(tokens: tuple[int, ...] = (8, 2048)) -> None:
    """The routed experts with per-expert LoRA (kernels/triton_lora_moe.py) at qwen3-30b-a3b (128 experts, top-8,
    D 2048, I 768), 4 slots of rank 16, bf16: a batch of each of `tokens` (by default a decode batch and a prefill
    one; the gate-up GEMM's ROW_BIAS variant, the sorted shrink / expand of both tensors)."""
    from moelink.kernels.lora_moe import ExpertLoRA
    from moelink.kernels.triton_lora_moe import triton_lora_fused_moe

    meta, dt = dict(device="meta"), torch.bfloat16
    E, K, D, I, L, R = 128, 8, 2048, 768, 4, 16
    gate_up = ExpertLoRA(torch.empty(L * E, R, D, dtype=dt, **meta), torch.empty(L * E, 2 * I, R, dtype=dt, **meta),
                         torch.empty(L * E, **meta))
    down = ExpertLoRA(torch.empty(L * E, R, I, dtype=dt, **meta), torch.empty(L * E, D, R, dtype=dt, **meta),
                      torch.empty(L * E, **meta))
    for T in tokens:
        triton_lora_fused_moe(torch.empty(T, D, dtype=dt, **meta), torch.empty(E, 2 * I, D, dtype=dt, **meta),
                              torch.empty(E, D, I, dtype=dt, **meta), torch.empty(T, K, **meta),
                              torch.empty(T, K, dtype=torch.long, **meta), torch.empty(T, dtype=torch.long, **meta),
                              gate_up, down)
