"""The native CPU kernels' ops (kernels/csrc/cpu_ops.c, built by kernels/cpu_native_build.py): RMSNorm alone and with
the residual add, the greedy router top-k, and the routed experts of a few tokens, each under its reference's
signature and falling back to that reference for anything it does not take.

Why: on a CPU a small batch's decode step is op dispatch. torch's RMSNorm is ~10 us for one 128-wide row (it runs
its six ops from C++), the router's softmax / top-k / renormalise / count are seven ops, and the few-token experts
gather their weights and run ~25 ops (views included) per layer; each of these is one ctypes call here (~2 us) that
reads each weight row once and copies none. The GPU runs its Triton kernels for the same ops (kernels/ops.py); these
are the CPU backend's counterparts, and what they save is CPU step time only.

What each takes (anything else runs the reference, unchanged):
- CPU tensors, contiguous, float32 (weights float32) or bfloat16 (weights bfloat16); float64 and float16 stay on the
  references (float64 is the parity tests' dtype: its results are the references' bit for bit);
- at most NATIVE_MAX_ELEMENTS activation values (a prefill's norm runs torch's two-thread kernel), except the residual
  add + norm and the attention input (rope, KV write), which are faster than torch's ops at any size and split their
  rows over torch's intra-op threads when large (OpenMP in the C, `threads_for`);
- the router's "greedy" method without a bias; the experts with at most NATIVE_MOE_MAX_PAIRS (token, expert) pairs
  per intra-op thread.
Results match the references up to the order of float32 sums within a row (bfloat16 rounded where torch rounds), and
a row's result is the same in any batch. The router's picks are the reference's exactly: a call with a tie among a
row's chosen experts or at the cut (frequent with bfloat16 logits) runs the reference, whose torch.topk orders ties
its own way. Shapes that do not agree with each other (heads, widths, caches, metadata, routing weights) run the
reference too, which raises where it must; the C code also checks every index it follows (positions, slots, blocks,
expert ids) and raises IndexError before writing anything.
"""
from __future__ import annotations

import ctypes
from typing import Any, Callable

import torch

from .attention import AttentionMetadata, _check_extras, reference_paged_attention
from .cpu_native_build import library
from .moe import SILU, MoEActivation, reference_fused_moe
from .norm import reference_add_rms_norm, reference_rms_norm
from .rotary import reference_rope_write_kv
from .silu_mul import reference_silu_mul
from .router_topk import check_method, reference_route_topk

# Above this many activation values (a prefill chunk) torch's own kernels, on every intra-op thread, are faster.
NATIVE_MAX_ELEMENTS = 1 << 18
# Above this many (token, expert) pairs per intra-op thread the references' per-expert GEMMs (BLAS, all threads, each
# expert's weights read once for all its tokens) are faster than reading each pair's expert rows again (the tokens
# split over the threads): measured crossings at builtin-model shapes (D 128, I 96, top-2), one thread ~T 48, two ~T 96.
NATIVE_MOE_MAX_PAIRS = 64
# Attention: steps whose tokens each read at most this many (key + value) elements in all (a decode or verify step
# of short contexts); longer ones run SDPA on every intra-op thread.
NATIVE_ATTENTION_MAX_WORK = 1 << 25
NATIVE_ATTENTION_MAX_QUERY = 16
# Below this much work (elements read) a native call runs on one thread (kernels/csrc/cpu_ops.c's OpenMP regions).
MIN_SPLIT_WORK = 1 << 19
# A step whose short and long sequences alternate more often than this runs the reference whole (each run is a call).
MIXED_STEP_MAX_RUNS = 8
_FLOATS = (torch.float32, torch.bfloat16)
_ACTIVATION_KIND = {"silu": 0, "swiglu_oai": 1, "silu_clamp": 2}


def threads_for(work: int) -> int:
    """The threads a native call of `work` elements runs on: torch's intra-op count (the C's OpenMP regions; a rank
    given one thread, as the multiprocess executor's, splits nothing), or 1 below MIN_SPLIT_WORK, where waking the
    pool's threads costs more than it saves."""
    return 1 if work < MIN_SPLIT_WORK else torch.get_num_threads()


def _plain(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """A CPU tensor of `dtype` laid out densely (a ctypes pointer walks it row by row)."""
    return t.dtype == dtype and t.is_cpu and t.is_contiguous() and not t.requires_grad


def _library(lib: ctypes.CDLL | None) -> ctypes.CDLL | None:
    """The library a backend bound (kernels/ops.NativeCpuKernels: resolved once, not per call), else this process's."""
    return lib if lib is not None else library()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def native_rms_norm(x_TD: torch.Tensor, weight_D: torch.Tensor, eps: float, *,
                    lib: ctypes.CDLL | None = None) -> torch.Tensor:
    dtype = x_TD.dtype
    lib = _library(lib) if dtype in _FLOATS else None
    D = x_TD.shape[-1]
    if (lib is None or not _plain(x_TD, dtype) or not _plain(weight_D, dtype) or weight_D.numel() != D
            or x_TD.numel() > NATIVE_MAX_ELEMENTS or x_TD.numel() == 0):
        return reference_rms_norm(x_TD, weight_D, eps)
    out = torch.empty_like(x_TD)
    rows = x_TD.numel() // D
    if dtype == torch.float32:
        lib.ml_rms_norm_f32(x_TD.data_ptr(), weight_D.data_ptr(), out.data_ptr(), rows, D, eps)
    elif lib.ml_rms_norm_bf16(x_TD.data_ptr(), None, weight_D.data_ptr(), out.data_ptr(), None, rows, D, eps, 1):
        raise MemoryError("native rms_norm: no memory for its row buffer")
    return out


def native_add_rms_norm(x_TD: torch.Tensor, residual_TD: torch.Tensor, weight_D: torch.Tensor,
                        eps: float, *, lib: ctypes.CDLL | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = x_TD.dtype
    lib = _library(lib) if dtype in _FLOATS else None
    D = x_TD.shape[-1]
    if (lib is None or not _plain(x_TD, dtype) or not _plain(residual_TD, dtype) or residual_TD.shape != x_TD.shape
            or not _plain(weight_D, dtype) or weight_D.numel() != D or x_TD.numel() == 0):
        return reference_add_rms_norm(x_TD, residual_TD, weight_D, eps)
    out = torch.empty_like(x_TD)
    summed = torch.empty_like(x_TD)
    rows = x_TD.numel() // D
    # Any size (a prefill's too: one pass where torch runs the add and five norm ops, ~7x faster at 8,192 x 64 on one
    # thread), its rows over torch's intra-op threads when large (OpenMP in the C: threads_for).
    nt = threads_for(x_TD.numel())
    if dtype == torch.float32:
        lib.ml_add_rms_norm_f32(x_TD.data_ptr(), residual_TD.data_ptr(), weight_D.data_ptr(), out.data_ptr(),
                                summed.data_ptr(), rows, D, eps, nt)
    elif lib.ml_rms_norm_bf16(x_TD.data_ptr(), residual_TD.data_ptr(), weight_D.data_ptr(), out.data_ptr(),
                              summed.data_ptr(), rows, D, eps, nt):
        raise MemoryError("native add_rms_norm: no memory for its row buffer")
    return out, summed


def native_route_topk(logits_TG: torch.Tensor, top_k: int, method: str = "greedy", renormalize: bool = False,
                      scale: float = 1.0, n_group: int = 1, topk_group: int = 1, bias_G: torch.Tensor | None = None,
                      valid_T: torch.Tensor | None = None,
                      counts_G: torch.Tensor | None = None, *,
                      lib: ctypes.CDLL | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    check_method(method, bias_G)
    dtype = logits_TG.dtype
    lib = _library(lib) if method == "greedy" and dtype in _FLOATS else None
    if (lib is None or logits_TG.dim() != 2 or not _plain(logits_TG, dtype) or not 0 < top_k <= logits_TG.shape[1]
            or (valid_T is not None and (not _plain(valid_T, torch.bool) or valid_T.shape != logits_TG.shape[:1]))
            or (counts_G is not None and (not _plain(counts_G, torch.int64) or counts_G.numel() < logits_TG.shape[1]))
            or logits_TG.numel() > NATIVE_MAX_ELEMENTS):
        return reference_route_topk(logits_TG, top_k, method, renormalize, scale, n_group, topk_group, bias_G,
                                    valid_T, counts_G)
    T, G = logits_TG.shape
    weights_TK = torch.empty((T, top_k), dtype=torch.float32)
    ids_TK = torch.empty((T, top_k), dtype=torch.int64)
    code = 0 if T == 0 else lib.ml_route_greedy(logits_TG.data_ptr(), int(dtype == torch.bfloat16),
                                                weights_TK.data_ptr(), ids_TK.data_ptr(), T, G, top_k,
                                                int(renormalize), scale, _ptr(valid_T), _ptr(counts_G))
    if code == -3:  # a tie (or a NaN) torch.topk orders its own way: its order, as the reference's (nothing counted)
        return reference_route_topk(logits_TG, top_k, method, renormalize, scale, n_group, topk_group, bias_G,
                                    valid_T, counts_G)
    if code:
        raise MemoryError("native route_topk: no memory for its row buffer")
    return weights_TK, ids_TK


def native_fused_moe(x_TD: torch.Tensor, w13_EFD: torch.Tensor, w2_EDI: torch.Tensor, topk_weights_TK: torch.Tensor,
                     topk_ids_TK: torch.Tensor, expert_map_G: torch.Tensor | None = None, *,
                     b13_EF: torch.Tensor | None = None, b2_ED: torch.Tensor | None = None,
                     activation: MoEActivation = SILU, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    dtype = x_TD.dtype
    lib = _library(lib) if dtype in _FLOATS else None
    if (lib is None or x_TD.dim() != 2 or topk_ids_TK.numel() > NATIVE_MOE_MAX_PAIRS * torch.get_num_threads()
            or activation.kind not in _ACTIVATION_KIND or not _plain(x_TD, dtype) or not _plain(w13_EFD, dtype)
            or not _plain(w2_EDI, dtype)
            or (b13_EF is not None and not _plain(b13_EF, dtype)) or (b2_ED is not None and not _plain(b2_ED, dtype))
            or (expert_map_G is not None and not _plain(expert_map_G, torch.int32))
            or not topk_ids_TK.is_cpu or not topk_weights_TK.is_cpu):
        return reference_fused_moe(x_TD, w13_EFD, w2_EDI, topk_weights_TK, topk_ids_TK, expert_map_G, b13_EF=b13_EF,
                                   b2_ED=b2_ED, activation=activation)
    T, D = x_TD.shape
    E, F, _ = w13_EFD.shape
    inter = w2_EDI.shape[2]
    if (w13_EFD.dim() != 3 or w2_EDI.dim() != 3 or w13_EFD.shape != (E, 2 * inter, D) or w2_EDI.shape != (E, D, inter)
            or topk_ids_TK.dim() != 2 or topk_ids_TK.shape[0] != T or topk_weights_TK.shape != topk_ids_TK.shape
            or (b13_EF is not None and b13_EF.shape != (E, 2 * inter))
            or (b2_ED is not None and b2_ED.shape != (E, D))):
        # What the reference makes of it (its error, or a broadcast this op does not take).
        return reference_fused_moe(x_TD, w13_EFD, w2_EDI, topk_weights_TK, topk_ids_TK, expert_map_G, b13_EF=b13_EF,
                                   b2_ED=b2_ED, activation=activation)
    ids = topk_ids_TK if _plain(topk_ids_TK, torch.int64) else topk_ids_TK.to(torch.int64).contiguous()
    weights = topk_weights_TK if _plain(topk_weights_TK, torch.float32) else (
        topk_weights_TK.to(torch.float32).contiguous())
    out_TD = torch.empty_like(x_TD)
    K = ids.shape[1]
    num_map = expert_map_G.numel() if expert_map_G is not None else 0
    code = lib.ml_moe_small(x_TD.data_ptr(), w13_EFD.data_ptr(), w2_EDI.data_ptr(), _ptr(b13_EF), _ptr(b2_ED),
                        weights.data_ptr(), ids.data_ptr(), _ptr(expert_map_G), num_map, out_TD.data_ptr(), T, K, D,
                        inter, E, int(dtype == torch.bfloat16), _ACTIVATION_KIND[activation.kind], activation.alpha,
                        activation.limit, threads_for(ids.numel() * 3 * inter * D))
    if code == -2:
        raise IndexError(f"fused_moe: an expert id is outside the {num_map or E} experts "
                         f"{'of the expert map' if num_map else 'of this layer'} (or the map names one past {E})")
    if code:
        raise MemoryError("native fused_moe: no memory for its row buffers")
    return out_TD


def _attention_shapes_fit(q_TNH, k_cache_BLKH, v_cache_BLKH, meta: AttentionMetadata) -> bool:
    """Heads, widths and metadata sizes that agree (anything else: the reference, which raises where it must)."""
    N, K = q_TNH.shape[1], k_cache_BLKH.shape[2] if k_cache_BLKH.dim() == 4 else 0
    S = meta.seq_lens_S.numel()
    return (k_cache_BLKH.dim() == 4 and v_cache_BLKH.dim() == 4 and K > 0 and N >= K and N % K == 0
            and q_TNH.shape[2] == k_cache_BLKH.shape[3] and v_cache_BLKH.shape[:3] == k_cache_BLKH.shape[:3]
            and meta.block_tables_SM.dim() == 2 and meta.block_tables_SM.shape[0] >= S
            and meta.query_start_loc_S1.numel() == S + 1)


def native_paged_attention(q_TNH: torch.Tensor, k_cache_BLKH: torch.Tensor, v_cache_BLKH: torch.Tensor,
                           meta: AttentionMetadata, scale: float, *, sinks_N: torch.Tensor | None = None,
                           sliding_window: int | None = None, k_scale: float = 1.0,
                           v_scale: float = 1.0, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    _check_extras(q_TNH, sinks_N, sliding_window)
    dtype = q_TNH.dtype
    lib = _library(lib) if dtype in _FLOATS else None
    T, N, H = q_TNH.shape
    Hv = v_cache_BLKH.shape[-1]
    if lib is not None and meta.max_query_len > NATIVE_ATTENTION_MAX_QUERY and T:
        runs = _query_runs(meta.query_lens) if len(meta.query_lens) == meta.seq_lens_S.numel() else []
        if 1 < len(runs) <= MIXED_STEP_MAX_RUNS:
            return _by_runs(runs, q_TNH, k_cache_BLKH, v_cache_BLKH, meta, scale, sinks_N=sinks_N,
                            sliding_window=sliding_window, k_scale=k_scale, v_scale=v_scale, lib=lib)
    if (lib is None or not q_TNH.is_cpu or q_TNH.stride(2) != 1 or k_scale != 1.0 or v_scale != 1.0
            or not _plain(k_cache_BLKH, dtype) or not _plain(v_cache_BLKH, dtype)
            or meta.max_query_len > NATIVE_ATTENTION_MAX_QUERY
            or T * meta.max_seq_len * N * (H + Hv) > NATIVE_ATTENTION_MAX_WORK
            or not _plain(meta.seq_lens_S, torch.int32) or not _plain(meta.query_start_loc_S1, torch.int32)
            or meta.block_tables_SM.dtype != torch.int32 or not meta.block_tables_SM.is_cpu
            or meta.block_tables_SM.stride(-1) != 1 or T == 0 or not _attention_shapes_fit(q_TNH, k_cache_BLKH,
                                                                                          v_cache_BLKH, meta)):
        return reference_paged_attention(q_TNH, k_cache_BLKH, v_cache_BLKH, meta, scale, sinks_N=sinks_N,
                                         sliding_window=sliding_window, k_scale=k_scale, v_scale=v_scale)
    _, L, K, _ = k_cache_BLKH.shape
    sinks = None if sinks_N is None else sinks_N.to(torch.float32).contiguous()
    out_TNH = q_TNH.new_empty(T, N, Hv)
    tables = meta.block_tables_SM
    # Sequences over torch's intra-op threads when the step is large (OpenMP in the C): each row is computed by the
    # same code on any thread.
    nt = threads_for(T * meta.max_seq_len * N * (H + Hv))
    code = lib.ml_paged_attention(q_TNH.data_ptr(), q_TNH.stride(0), q_TNH.stride(1), k_cache_BLKH.data_ptr(),
                                  v_cache_BLKH.data_ptr(), tables.data_ptr(), tables.stride(0), tables.shape[1],
                                  k_cache_BLKH.shape[0], meta.seq_lens_S.data_ptr(), meta.query_start_loc_S1.data_ptr(),
                                  out_TNH.data_ptr(), _ptr(sinks), meta.seq_lens_S.numel(), T, N, K, H, Hv, L,
                                  sliding_window or 0, scale, int(dtype == torch.bfloat16), nt)
    if code == -2:
        raise IndexError("paged_attention: a sequence's length, its tokens or a block of its table is out of range")
    if code:
        raise MemoryError("native paged_attention: no memory for its score buffer")
    return out_TNH


def _query_runs(query_lens: list[int]) -> list[tuple[int, int]]:
    """Maximal runs [s0, s1) of sequences that are all short (decode, verify: native) or all long (prompt chunks)."""
    runs: list[tuple[int, int]] = []
    s0 = 0
    for s in range(1, len(query_lens) + 1):
        if s == len(query_lens) or ((query_lens[s] > NATIVE_ATTENTION_MAX_QUERY)
                                    != (query_lens[s0] > NATIVE_ATTENTION_MAX_QUERY)):
            runs.append((s0, s))
            s0 = s
    return runs


def _by_runs(runs: list[tuple[int, int]], q_TNH: torch.Tensor, k_cache_BLKH: torch.Tensor,
             v_cache_BLKH: torch.Tensor, meta: AttentionMetadata, scale: float, **kw) -> torch.Tensor:
    """A mixed step (decode rows beside a new prompt's chunk: most steps of a busy server) one run at a time, so its
    decode rows run natively instead of all of it on the reference; each row's result is its run's alone (rows are
    independent), the same as in a step of its own kind."""
    out_TNH = q_TNH.new_empty(*q_TNH.shape[:2], v_cache_BLKH.shape[-1])
    t0 = 0
    for s0, s1 in runs:
        t1 = t0 + sum(meta.query_lens[s0:s1])
        out_TNH[t0:t1] = native_paged_attention(q_TNH[t0:t1], k_cache_BLKH, v_cache_BLKH, meta.select(s0, s1), scale,
                                                **kw)
        t0 = t1
    return out_TNH


def _rows(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """A CPU [T, heads, width] view of `dtype` whose rows are dense (the q, k, v views of a qkv projection)."""
    return t.dtype == dtype and t.is_cpu and t.dim() == 3 and t.stride(2) == 1 and not t.requires_grad


def _rope_shapes_fit(q_TNH, k_TKH, v_TKH, positions_T, k_cache_BLKH, v_cache_BLKH, slot_mapping_T, q_norm_H,
                     k_norm_H) -> bool:
    """q, k, v, the caches, positions, slots and norms of one step's shapes (anything else: the reference)."""
    T, _, H = q_TNH.shape
    K, Hv = v_TKH.shape[1], v_TKH.shape[2]
    return (k_TKH.shape == (T, K, H) and v_TKH.shape[0] == T and k_cache_BLKH.dim() == 4
            and k_cache_BLKH.shape[2:] == (K, H) and v_cache_BLKH.shape == (*k_cache_BLKH.shape[:3], Hv)
            and positions_T.shape == (T,) and slot_mapping_T.shape == (T,)
            and (q_norm_H is None or (q_norm_H.numel() == H and k_norm_H.numel() == H)))


def native_rope_write_kv(q_TNH: torch.Tensor, k_TKH: torch.Tensor, v_TKH: torch.Tensor, positions_T: torch.Tensor,
                         cos_sin_PR: torch.Tensor, k_cache_BLKH: torch.Tensor, v_cache_BLKH: torch.Tensor,
                         slot_mapping_T: torch.Tensor, q_norm_H: torch.Tensor | None = None,
                         k_norm_H: torch.Tensor | None = None, eps: float = 1e-6, k_scale: float = 1.0,
                         v_scale: float = 1.0, *, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    dtype = q_TNH.dtype
    lib = _library(lib) if dtype in _FLOATS else None
    if (lib is None or (q_norm_H is None) != (k_norm_H is None) or k_scale != 1.0 or v_scale != 1.0
            or not _rows(q_TNH, dtype) or not _rows(k_TKH, dtype) or not _rows(v_TKH, dtype)
            or not _plain(k_cache_BLKH, dtype) or not _plain(v_cache_BLKH, dtype)
            or (q_norm_H is not None and not (_plain(q_norm_H, dtype) and _plain(k_norm_H, dtype)))
            or not _plain(cos_sin_PR, torch.float32) or cos_sin_PR.dim() != 2
            or cos_sin_PR.shape[-1] % 2 or cos_sin_PR.shape[-1] > q_TNH.shape[-1]
            or not _plain(positions_T, torch.int64) or not _plain(slot_mapping_T, torch.int64)
            or not _rope_shapes_fit(q_TNH, k_TKH, v_TKH, positions_T, k_cache_BLKH, v_cache_BLKH, slot_mapping_T,
                                    q_norm_H, k_norm_H)):
        return reference_rope_write_kv(q_TNH, k_TKH, v_TKH, positions_T, cos_sin_PR, k_cache_BLKH, v_cache_BLKH,
                                       slot_mapping_T, q_norm_H, k_norm_H, eps, k_scale, v_scale)
    T, N, H = q_TNH.shape
    K, Hv = v_TKH.shape[1], v_TKH.shape[2]
    q_out = torch.empty((T, N, H), dtype=dtype)
    # Any size (a prefill chunk too: one pass per row, ~2.6x torch's ops at 8,192 tokens on one thread), its rows over
    # torch's intra-op threads when large (OpenMP in the C), every row's position and slot checked before any write.
    nt = threads_for(q_TNH.numel() + k_TKH.numel() + v_TKH.numel())
    code = 0 if T == 0 else lib.ml_rope_write_kv(
        q_TNH.data_ptr(), q_TNH.stride(0), q_TNH.stride(1), k_TKH.data_ptr(), k_TKH.stride(0), k_TKH.stride(1),
        v_TKH.data_ptr(), v_TKH.stride(0), v_TKH.stride(1), positions_T.data_ptr(), cos_sin_PR.data_ptr(),
        cos_sin_PR.shape[-1], cos_sin_PR.shape[0], k_cache_BLKH.data_ptr(), v_cache_BLKH.data_ptr(),
        slot_mapping_T.data_ptr(), k_cache_BLKH.shape[0] * k_cache_BLKH.shape[1], _ptr(q_norm_H), _ptr(k_norm_H), eps,
        q_out.data_ptr(), T, N, K, H, Hv, int(dtype == torch.bfloat16), nt)
    if code == -2:
        raise IndexError("rope_write_kv: a position is outside the rotary table or a slot outside the cache")
    if code:
        raise MemoryError("native rope_write_kv: no memory for its row buffer")
    return q_out


def native_silu_mul(gate_TI: torch.Tensor, up_TI: torch.Tensor, *, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    dtype = gate_TI.dtype
    lib = _library(lib) if dtype in _FLOATS else None
    if (lib is None or gate_TI.dim() != 2 or up_TI.shape != gate_TI.shape or up_TI.dtype != dtype
            or not gate_TI.is_cpu or not up_TI.is_cpu or gate_TI.stride(1) != 1 or up_TI.stride(1) != 1
            or gate_TI.requires_grad or up_TI.requires_grad or gate_TI.numel() > NATIVE_MAX_ELEMENTS):
        return reference_silu_mul(gate_TI, up_TI)
    T, inter = gate_TI.shape
    out = torch.empty((T, inter), dtype=dtype)
    lib.ml_silu_mul(gate_TI.data_ptr(), gate_TI.stride(0), up_TI.data_ptr(), up_TI.stride(0), out.data_ptr(), T, inter,
                    int(dtype == torch.bfloat16))
    return out


def greedy_ids(logits_BV: torch.Tensor) -> torch.Tensor:
    """logits_BV.argmax(dim=-1) (the first of equal values; a NaN counts as the largest), natively for dense CPU
    float32 / bfloat16 rows: torch's argmax over a vocabulary runs ~15x slower than its max on these CPUs (~4 us a
    4,096-wide row). Anything else: torch's."""
    dtype = logits_BV.dtype
    # Off a CPU nothing is built or loaded (a GPU's sampler asks here every step).
    lib = (library() if dtype in _FLOATS and logits_BV.dim() == 2 and logits_BV.shape[1] > 0
           and _plain(logits_BV, dtype) else None)
    if lib is None:
        return logits_BV.argmax(dim=-1)
    ids_B = torch.empty(logits_BV.shape[0], dtype=torch.int64)
    lib.ml_argmax_rows(logits_BV.data_ptr(), int(dtype == torch.bfloat16), ids_B.data_ptr(), *logits_BV.shape)
    return ids_B


# The ops the native CPU backend (kernels/ops.NativeCpuKernels) takes from here, under the protocol's names.
NATIVE_OPS: dict[str, Callable[..., Any]] = dict(
    rms_norm=native_rms_norm, add_rms_norm=native_add_rms_norm, route_topk=native_route_topk, fused_moe=native_fused_moe,
    paged_attention=native_paged_attention, rope_write_kv=native_rope_write_kv, silu_mul=native_silu_mul)

__all__ = ["greedy_ids", "NATIVE_ATTENTION_MAX_QUERY", "NATIVE_ATTENTION_MAX_WORK", "NATIVE_MAX_ELEMENTS", "NATIVE_MOE_MAX_PAIRS",
           "NATIVE_OPS", "native_add_rms_norm", "native_fused_moe", "native_paged_attention", "native_rms_norm",
           "native_rope_write_kv", "native_route_topk", "native_silu_mul"]
