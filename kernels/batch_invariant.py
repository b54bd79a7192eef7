"""Batch-invariant kernels: a row's result does not depend on what else is in the batch (issue 58 item 4).

Why results change with the batch at all: a matmul library picks its kernel, its tiling and its reduction split by
the problem's shape, so row r of `x_MK @ w` is summed in another order when M changes (measured on this CPU's BLAS
in float32: the same row alone and among 2-150 rows differs by up to 2e-5 after one 256x384 linear; float64 too, at
1e-14), and attention's reductions run over whatever length the batch pads its contexts to. An RL trainer that
recomputes a rollout's logprobs, or a user who sends the same request twice, sees other numbers.

The two rules that remove it, as Thinking Machines' batch-invariant ops and vLLM's VLLM_BATCH_INVARIANT mode do on
GPUs (here on the plain-torch path, the CPU one):
1. Every matmul runs on tiles of exactly TILE_M rows (the last one zero-padded): the library sees one shape whatever
   the batch, and a row's position inside a tile does not change its arithmetic (checked on this BLAS for
   float32 / float64 / bfloat16, 1 and 2 threads, tiles of 16 and 32: tests/kernels/test_batch_invariant.py).
   `BatchInvariantMode` applies it to every `F.linear`, `matmul`, `mm`, `addmm` and `bmm` the forward calls, so no
   layer needs its own copy; row-wise reductions (norms' mean, softmax, log-softmax) already reduce each row alone.
2. Attention reduces over the keys in fixed blocks of the KV cache's block size, in position order, with an online
   softmax (`invariant_paged_attention`): a query row meets the same blocks in the same order whether it is a decode
   row, a row of a prefill chunk, or a row of a chunk after a prefix-cache hit; blocks past a row's position are
   exact no-ops (its max, sum and accumulator are multiplied by 1 and added 0), so the batch's longest context
   changes nothing. Its products are batched matmuls of one row's grouped heads by one block (M = query heads per KV
   head), a fixed shape per model.
So the logprob a decode step reports for a token equals, bitwise, the prompt logprob the same sequence's prefill
gives it (what a trainer recomputes).

Legend: T tokens (query rows), N query heads, K KV heads, R = N / K, H head dim, Hv value head dim, B block size,
M (in tiles) rows.
"""
from __future__ import annotations

import functools
from contextlib import AbstractContextManager
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .attention import AttentionMetadata, dequantize_from_cache

# Rows per matmul tile. 16: a decode step of one request pads to 16 rows (a CPU matmul that small is bound by its
# weight reads, not its rows), and a 150-token chunk is ten calls.
TILE_M = 16


def _tiled_rows(fn: Callable[..., torch.Tensor], a: torch.Tensor, *rest: Any, **kw: Any) -> torch.Tensor:
    """fn(a, *rest) with a's second-to-last dim (its rows) cut into tiles of TILE_M rows, the last tile zero-padded.

    `a` is [..., M, K]; fn is a matmul-like op whose output row i depends on a's row i only."""
    m = a.shape[-2]
    if m == TILE_M:
        return fn(a, *rest, **kw)
    pad = -m % TILE_M
    if pad:
        a = F.pad(a, (0, 0, 0, pad))  # zero rows at the end of dim -2
    outs = [fn(a[..., i:i + TILE_M, :], *rest, **kw) for i in range(0, m + pad, TILE_M)]
    out = torch.cat(outs, dim=-2) if len(outs) > 1 else outs[0]
    return out[..., :m, :].contiguous() if pad else out


def _linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if x.dim() == 1:
        return _linear(x[None], w, bias)[0]
    lead = x.shape[:-1]
    y = _tiled_rows(F.linear, x.reshape(-1, x.shape[-1]), w, bias)
    return y.reshape(*lead, y.shape[-1])


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.dim() < 2:  # a vector on the left: one row, nothing to tile
        return torch.matmul(a, b)
    if b.dim() == 1:  # [.., M, K] @ [K]: the matrix-vector product as a one-column matmul
        return _tiled_rows(torch.matmul, a, b[:, None])[..., 0]
    return _tiled_rows(torch.matmul, a, b)


def _addmm_rows(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: Any, alpha: Any) -> torch.Tensor:
    """addmm whose bias may be per row ([M, N]): the product tiled, then beta * bias + alpha * product."""
    prod = _tiled_rows(torch.mm, a, b)
    return beta * bias + alpha * prod if (beta, alpha) != (1, 1) else bias + prod


# The ops whose reduction order depends on the number of rows, and the tiled version each one runs instead.
_TILED: dict[Callable[..., Any], Callable[..., torch.Tensor]] = {
    F.linear: _linear,
    torch.matmul: _matmul,
    torch.Tensor.matmul: _matmul,
    torch.Tensor.__matmul__: _matmul,
    torch.mm: lambda a, b: _tiled_rows(torch.mm, a, b),
    torch.Tensor.mm: lambda a, b: _tiled_rows(torch.mm, a, b),
    torch.bmm: lambda a, b: _tiled_rows(torch.bmm, a, b),
    torch.Tensor.bmm: lambda a, b: _tiled_rows(torch.bmm, a, b),
}
# Ops that would reduce across rows in a batch-dependent order and have no tiled version here: refused, so a path
# that uses one cannot pass for batch-invariant (it must go through invariant_paged_attention or a tiled op).
_REFUSED = {F.scaled_dot_product_attention: "F.scaled_dot_product_attention (attention must be the blocked "
                                            "invariant_paged_attention)",
            torch.einsum: "torch.einsum", torch.baddbmm: "torch.baddbmm", torch.Tensor.addmm: "Tensor.addmm"}


class BatchInvariantMode(TorchFunctionMode):
    """Inside it, matmuls run on fixed TILE_M-row tiles (module docstring, rule 1). Thread-local, as torch's function
    modes are: enter it on the thread that runs the forward."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # torch pops this mode while its __torch_function__ runs: the tiles below call the real ops.
        kwargs = kwargs or {}
        tiled = _TILED.get(func)
        if tiled is not None:
            return tiled(*args, **kwargs)
        if func is torch.addmm:
            return _addmm_rows(args[0], args[1], args[2], kwargs.get("beta", 1), kwargs.get("alpha", 1))
        refused = _REFUSED.get(func)
        if refused is not None:
            raise RuntimeError(f"{refused} is not batch-invariant: a model path that calls it cannot run with "
                               "batch_invariant=True (kernels/batch_invariant.py).")
        return func(*args, **kwargs)


def invariant_paged_attention(
    q_TNH: torch.Tensor,
    k_cache_BLKH: torch.Tensor,
    v_cache_BLKH: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    *,
    sinks_N: torch.Tensor | None = None,
    sliding_window: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """`reference_paged_attention`'s contract (causal attention of each new token to its sequence's cached context,
    sinks, sliding window, fp8 cache scales), computed so that each query row's result depends on its own sequence
    only (module docstring, rule 2). Returns [T, N, Hv] in q's dtype.

    Every row walks the key blocks 0, 1, ... of its sequence (the cache's own blocks, B positions each) with an
    online softmax: per block, scores = q·k·scale masked to the row's causal (and window) range, m' = max(m,
    max scores), l' = l·e^(m-m') + Σ e^(s-m'), acc' = acc·e^(m-m') + e^(s-m')·v. Blocks past the row's range leave
    m, l and acc as they were, exactly. A sink starts m at the sink logit and l at 1 (its term of the denominator).
    Accumulates in float32 for half inputs, else in q's dtype. No host sync: the walk's length is the host's bound
    on the longest context, and each row's own length is read on the device."""
    # Its products have one shape per model already (M = R): run them as they are, not on BatchInvariantMode's tiles.
    with torch._C.DisableTorchFunction():
        return _invariant_attention(q_TNH, k_cache_BLKH, v_cache_BLKH, meta, scale, sinks_N, sliding_window, k_scale,
                                    v_scale)


def _invariant_attention(q_TNH, k_cache_BLKH, v_cache_BLKH, meta, scale, sinks_N, sliding_window, k_scale,
                         v_scale) -> torch.Tensor:
    T, N, H = q_TNH.shape
    block_size, num_kv, _ = k_cache_BLKH.shape[1:]
    hv = v_cache_BLKH.shape[-1]
    rep = N // num_kv
    dev = q_TNH.device
    acc_dtype = torch.float32 if q_TNH.dtype.itemsize < 4 else q_TNH.dtype
    # Each row's sequence and position (device work; the host lists give the lengths' layout, not their values).
    seq_T = torch.repeat_interleave(torch.arange(len(meta.query_lens), device=dev),
                                    torch.tensor(meta.query_lens, device=dev), output_size=T)
    qlen_T = torch.tensor(meta.query_lens, device=dev).index_select(0, seq_T)
    first_T = (meta.query_start_loc_S1[:-1].long()).index_select(0, seq_T)
    ctx_T = meta.seq_lens_S.long().index_select(0, seq_T)
    pos_T = ctx_T - qlen_T + (torch.arange(T, device=dev) - first_T)  # the row's own position
    lo_T = torch.zeros_like(pos_T) if sliding_window is None else pos_T - sliding_window + 1
    tables_TM = meta.block_tables_SM.long().index_select(0, seq_T)
    q_XRH = q_TNH.to(acc_dtype).reshape(T * num_kv, rep, H)
    if sinks_N is None:
        m_TN = torch.full((T, N), float("-inf"), dtype=acc_dtype, device=dev)
        l_TN = torch.zeros((T, N), dtype=acc_dtype, device=dev)
    else:
        m_TN = sinks_N.to(acc_dtype)[None, :].expand(T, N).clone()
        l_TN = torch.ones((T, N), dtype=acc_dtype, device=dev)
    acc_TNV = torch.zeros((T, N, hv), dtype=acc_dtype, device=dev)
    offs_B = torch.arange(block_size, device=dev)
    num_blocks = -(-max(meta.seq_lens) // block_size)
    for j in range(min(num_blocks, tables_TM.shape[1])):
        kpos_TB = j * block_size + offs_B[None, :]
        readable_TB = kpos_TB < ctx_T[:, None]  # written positions; others read the null block (zeros)
        slots_TB = torch.where(readable_TB, tables_TM[:, j:j + 1] * block_size + offs_B[None, :],
                               meta.null_block * block_size)
        k_TBKH = dequantize_from_cache(k_cache_BLKH.flatten(0, 1).index_select(0, slots_TB.reshape(-1)), acc_dtype,
                                       k_scale).to(acc_dtype).view(T, block_size, num_kv, -1)
        v_TBKV = dequantize_from_cache(v_cache_BLKH.flatten(0, 1).index_select(0, slots_TB.reshape(-1)), acc_dtype,
                                       v_scale).to(acc_dtype).view(T, block_size, num_kv, hv)
        k_XHB = k_TBKH.permute(0, 2, 3, 1).reshape(T * num_kv, -1, block_size)
        v_XBV = v_TBKV.permute(0, 2, 1, 3).reshape(T * num_kv, block_size, hv)
        s_TNB = (torch.bmm(q_XRH, k_XHB) * scale).view(T, N, block_size)
        seen_TB = (kpos_TB <= pos_T[:, None]) & (kpos_TB >= lo_T[:, None])
        s_TNB = s_TNB.masked_fill(~seen_TB[:, None, :], float("-inf"))
        m_new_TN = torch.maximum(m_TN, s_TNB.amax(dim=-1))
        # A row that has seen no key yet (m' = -inf: a window not reached) subtracts 0, not -inf (no NaN).
        shift_TN = torch.where(torch.isinf(m_new_TN), torch.zeros_like(m_new_TN), m_new_TN)
        p_TNB = torch.exp(s_TNB - shift_TN[..., None])
        alpha_TN = torch.exp(m_TN - shift_TN)
        l_TN = l_TN * alpha_TN + p_TNB.sum(dim=-1)
        pv_TNV = torch.bmm(p_TNB.view(T * num_kv, rep, block_size), v_XBV).view(T, N, hv)
        acc_TNV = acc_TNV * alpha_TN[..., None] + pv_TNV
        m_TN = m_new_TN
    return (acc_TNV / l_TN[..., None]).to(q_TNH.dtype)


@functools.lru_cache(maxsize=None)
def supported_attention_kinds() -> frozenset[str]:
    """The attention kinds whose reference path goes through `paged_attention` alone (GQA, with sinks and sliding
    windows): the kinds a batch-invariant engine serves. The others (MLA, DSA, linear attention, compressed,
    block-sparse, QSA) reduce in their own kernels and are refused by name until each has its invariant form."""
    return frozenset({"gqa"})


def mode() -> AbstractContextManager:
    """A fresh BatchInvariantMode (what a batch-invariant backend's `step_context` returns)."""
    return BatchInvariantMode()


__all__ = ["BatchInvariantMode", "TILE_M", "invariant_paged_attention", "mode", "supported_attention_kinds"]
