"""Batch-invariant kernels: a row's result does not depend on what else is in the batch (issue 58 item 4).

Why results change with the batch at all: a matmul library picks its kernel, its tiling and its reduction split by
the problem's shape, so row r of `x_MK @ w` is summed in another order when M changes (measured on this CPU's BLAS
in float32: the same row alone and among 2-150 rows differs by up to 2e-5 after one 256x384 linear; float64 too, at
1e-14), and attention's reductions run over whatever length the batch pads its contexts to. An RL trainer that
recomputes a rollout's logprobs, or a user who sends the same request twice, sees other numbers.

The rules that remove it, as Thinking Machines' batch-invariant ops and vLLM's VLLM_BATCH_INVARIANT mode do on
GPUs (here on the plain-torch path, the CPU one). `BatchInvariantMode`, a torch function mode the model runner enters
around each step's forward, applies the first three to every call the forward makes, so no layer needs its own copy:
1. Every matmul (`F.linear`, `matmul`, `mm`, `addmm`, `bmm`) runs on tiles of exactly TILE_M rows (the last one
   zero-padded, each tile contiguous): the library sees one shape whatever the batch, and a row's position inside a
   tile does not change its arithmetic (checked on this BLAS for float32 / float64 / bfloat16, 1 and 2 threads).
   On CUDA a batched product also runs on tiles of exactly TILE_X matrices (`fixed_bmm`): cuBLAS picks its kernel
   by the batch count too.
2. Reductions over a dim (sum, mean, amax, logsumexp, softmax, log-softmax, cumsum, top-k) run on tiles of TILE_R
   rows: a reduction's strategy (along the row, or across many short rows) is chosen by its shape and sums in
   another order; top-k's order of the k (sorted=False) is its algorithm's. A sum or mean over at most SMALL_W
   elements runs as element-wise adds of its slices in index order instead (exact in any layout, and cheaper).
3. Element-wise transcendentals (exp, sigmoid, silu, gelu, tanh, softplus, log, erf) run in fixed chunks of CHUNK_E
   elements: the CPU loops round an element's vectorized form and its scalar tail form differently, and which
   elements fall in the tail depends on the tensor's size. Adds, products, divisions and square roots are exact
   either way. Ops with no such form here (einsum, baddbmm, var, std, norms over several dims) raise inside the
   mode, so a path that uses one cannot pass for invariant.
4. One code path whatever the batch: the experts always run per expert (`invariant_fused_moe`), never the
   reference's padded batched matmul for small batches; attention reduces over the keys in fixed blocks of the KV
   cache's block size, in position order, with an online softmax (`invariant_paged_attention`, and
   `invariant_mla_attention` for absorbed MLA): a query row meets the same blocks in the same order whether it is a
   decode row, a row of a prefill chunk, or a row of a chunk after a prefix-cache hit; blocks past a row's position
   are exact no-ops (its max, sum and accumulator are multiplied by 1 and added 0), so the batch's longest context
   changes nothing. Its products are batched matmuls of one row's grouped heads by one block, a fixed shape per model.
   Gated DeltaNet always runs its per-token recurrence (`invariant_gated_delta_rule`), the decode step's form. DSA's
   indexer scores each row alone in blocks (`invariant_dsa_topk`) and its sparse MLA walks the selection in blocks
   (`invariant_sparse_mla_attention`): a full selection walks exactly the dense blocks.
So the logprob a decode step reports for a token equals, bitwise, the prompt logprob the same sequence's prefill
gives it (what a trainer recomputes).

Legend: T tokens (query rows), N query heads, K KV heads, R = N / K, H head dim, Hv value head dim, B block size,
M (in tiles) rows. This module holds rules 1-3 (the mode) and the MoE path switch of rule 4; the kernels of rule 4
are kernels/batch_invariant_kernels.py (the `batch_invariant` backend's attention, experts and delta rule).
Each rule was found by a test that failed without it (tests/engine/test_batch_invariant_engine.py on DeepSeek-V3:
the router's sigmoid, its top-k, the MoE's two paths); tests/kernels/test_batch_invariant.py checks each op.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .moe import PADDED_MAX_PAIRS

# Rows per matmul tile. 16: a decode step of one request pads to 16 rows (a CPU matmul that small is bound by its
# weight reads, not its rows), and a 150-token chunk is ten calls.
TILE_M = 16


# Matrices per batched-matmul tile, on CUDA: cuBLAS picks a strided-batched product's kernel (and its split of the
# reduction) by the batch count too, so matrix 0 of a 2-matrix batch and of a 4096-matrix one summed in other orders
# (seen on an H100, 2026-11-26: a request's logprobs alone and batched differed in batch-invariant mode while the
# attention walk's products ran one matrix per (token, KV head)). A batch cut into tiles of exactly TILE_X matrices,
# the last zero-padded, gives the library one shape. CPU BLAS runs a batch matrix by matrix with the kernel that
# matrix's own shape picks (tests/kernels/test_batch_invariant.py checks it), so there a batch runs whole: padding
# a model's fixed head count to TILE_X would only multiply its work.
TILE_X = 64


def batch_tile(device: torch.device) -> int | None:
    """Matrices per batched-matmul call on `device`: TILE_X on CUDA, None (the batch whole) elsewhere."""
    return TILE_X if device.type == "cuda" else None


def fixed_bmm(a_XMK: torch.Tensor, b_XKN: torch.Tensor) -> torch.Tensor:
    """torch.bmm with the batch cut into batch_tile(device) matrices per call (zero-padded, each tile contiguous):
    what the invariant kernels run where the batch count follows the batch (one matrix per token or per (token,
    head)), and the mode runs for every batched product. Rows are not tiled here (the caller's M is fixed)."""
    tile = batch_tile(a_XMK.device)
    x = a_XMK.shape[0]
    if tile is None or x == 0:
        return torch.bmm(a_XMK, b_XKN)
    pad = -x % tile
    if pad:
        a_XMK = F.pad(a_XMK, (0, 0, 0, 0, 0, pad))
        b_XKN = F.pad(b_XKN, (0, 0, 0, 0, 0, pad))
    outs = [torch.bmm(a_XMK[i:i + tile].contiguous(), b_XKN[i:i + tile].contiguous())
            for i in range(0, x + pad, tile)]
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    return out[:x] if pad else out


def _tiled_rows(fn: Callable[..., torch.Tensor], a: torch.Tensor, *rest: Any, **kw: Any) -> torch.Tensor:
    """fn(a, *rest) with a's second-to-last dim (its rows) cut into tiles of TILE_M rows, the last tile zero-padded.

    `a` is [M, K] (or [X, M, K] with fn a batched product whose batch stays whole); fn is a matmul-like op whose
    output row i depends on a's row i only."""
    m = a.shape[-2]
    if m == 0:  # an EP rank with no tokens still runs its layers' collectives, on empty inputs
        return fn(a, *rest, **kw)
    if m == TILE_M:
        return fn(a.contiguous(), *rest, **kw)
    pad = -m % TILE_M
    if pad:
        a = F.pad(a, (0, 0, 0, pad))  # zero rows at the end of dim -2
    # Each tile contiguous: a matmul's kernel may depend on its operand's strides, and a tile's do not (a slice of an
    # unpadded transposed view would otherwise differ from a padded copy).
    outs = [fn(a[..., i:i + TILE_M, :].contiguous(), *rest, **kw) for i in range(0, m + pad, TILE_M)]
    out = torch.cat(outs, dim=-2) if len(outs) > 1 else outs[0]
    return out[..., :m, :].contiguous() if pad else out


def _tiled_bmm(a_XMK: torch.Tensor, b_XKN: torch.Tensor) -> torch.Tensor:
    """A batched product on fixed tiles both ways: TILE_M rows (the model's M may follow the batch) and, on CUDA,
    TILE_X matrices (fixed_bmm)."""
    return _tiled_rows(fixed_bmm, a_XMK, b_XKN)


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
        return _matmul(a, b[:, None])[..., 0]
    if b.dim() == 2:
        # [..., M, K] @ [K, N]: every row of every leading index is a row of one product (torch folds the leading
        # dims into the rows too), so the rows are tiled across them all: the token dim may be a leading one.
        rows = _tiled_rows(torch.mm, a.reshape(-1, a.shape[-1]), b)
        return rows.reshape(*a.shape[:-1], b.shape[-1])
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a_XMK = a.expand(*batch, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
    b_XKN = b.expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
    return _tiled_bmm(a_XMK, b_XKN).reshape(*batch, a.shape[-2], b.shape[-1])


def _addmm_rows(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: Any, alpha: Any) -> torch.Tensor:
    """addmm whose bias may be per row ([M, N]): the product tiled, then beta * bias + alpha * product."""
    prod = _tiled_rows(torch.mm, a, b)
    return beta * bias + alpha * prod if (beta, alpha) != (1, 1) else bias + prod


# Rows per reduction tile: a reduction's strategy (vectorized along the reduced dim, or across rows when the rows
# are many and short) is chosen by its shape, and the two sum in different orders: measured, a 48-wide RMSNorm row
# alone and among 4 rows differed in float32. A fixed tile keeps the shape, so the strategy, fixed.
TILE_R = 64


def _reduce_rows(fn: Callable[..., torch.Tensor], x: torch.Tensor, dim: int | None, keepdim: bool, keeps_dim: bool,
                 **kw: Any) -> torch.Tensor:
    """fn(x, dim) over `dim` with the other dims flattened into rows run TILE_R at a time (zero-padded, contiguous):
    a row's result then depends on that row alone. keeps_dim: fn returns x's shape (softmax, cumsum), else the
    reduced one."""
    if dim is None or x.dim() == 0:
        return fn(x, **kw) if dim is None else fn(x, dim, **kw)
    d = dim % x.dim()
    if x.numel() == 0:  # nothing to reduce in any order (an EP rank with no tokens runs its layers on empty inputs)
        out = fn(x, d, **kw)
        return out.unsqueeze(d) if keepdim and not keeps_dim else out
    moved = x.movedim(d, -1)
    lead, width = moved.shape[:-1], moved.shape[-1]
    rows = moved.reshape(-1, width)
    n = rows.shape[0]
    pad = -n % TILE_R
    if pad or not rows.is_contiguous():
        rows = F.pad(rows, (0, 0, 0, pad)).contiguous()
    outs = [fn(rows[i:i + TILE_R], -1, **kw) for i in range(0, n + pad, TILE_R)]
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    out = out[:n]
    if keeps_dim:
        return out.reshape(*lead, width).movedim(-1, d)
    out = out.reshape(lead)
    return out.unsqueeze(d) if keepdim else out


# Widths up to which a sum or mean over one dim runs as explicit adds of its slices, in index order (a hyper-connection's
# Sinkhorn normalisation sums 4-wide rows 40 times a layer): each add is element-wise, exact whatever the batch's
# layout, so a row's result is its own in a fixed order, for a few torch calls instead of row tiles' dozen.
SMALL_W = 8


def _small_sum(x: torch.Tensor, d: int, keepdim: bool, mean: bool) -> torch.Tensor:
    """sum (or mean) of x over dim d (2 <= width <= SMALL_W) as slice 0 + slice 1 + ...; half inputs accumulate in
    float32 and round once at the end, as torch's sum does."""
    acc = x.float() if x.dtype.itemsize < 4 else x
    parts = acc.unbind(d)
    out = parts[0] + parts[1]
    for part in parts[2:]:
        out = out + part
    if mean:
        out = out / len(parts)
    out = out.to(x.dtype)
    return out.unsqueeze(d) if keepdim else out


def _reduction(op: Callable[..., torch.Tensor], keeps_dim: bool = False) -> Callable[..., torch.Tensor]:
    """The row-tiled form of a reduction over one dim (`op(x, dim, keepdim=..., dtype=...)` as torch spells it)."""
    def run(x: torch.Tensor, dim: Any = None, *args: Any, keepdim: bool = False, **kw: Any) -> torch.Tensor:
        if dim is None and not args:  # a whole-tensor reduction (counts, statistics): no row's result to keep
            return op(x, **kw)
        kw.pop("_stacklevel", None)  # F.softmax / F.log_softmax's warning depth: not torch.softmax's
        if kw.get("dtype", 0) is None:
            kw.pop("dtype")
        if isinstance(dim, (tuple, list)):
            if len(dim) != 1:
                raise RuntimeError(f"{getattr(op, '__name__', op)} over several dims is not batch-invariant here.")
            dim = dim[0]
        if args:  # keepdim (sum/mean/amax) or dtype (softmax) given positionally
            if keeps_dim:
                kw["dtype"] = args[0]
            else:
                keepdim = bool(args[0])
        if (op is torch.sum or op is torch.mean) and not kw and x.is_floating_point() and x.dim() > 0:
            d = dim % x.dim()
            if 2 <= x.shape[d] <= SMALL_W:
                return _small_sum(x, d, keepdim, op is torch.mean)
        call = (lambda t, d, **k: op(t, d, **k)) if keeps_dim else (lambda t, d, **k: op(t, d, keepdim=False, **k))
        return _reduce_rows(call, x, dim, keepdim, keeps_dim, **kw)
    return run


_SUM, _MEAN, _AMAX = _reduction(torch.sum), _reduction(torch.mean), _reduction(torch.amax)
_SOFTMAX, _LOG_SOFTMAX = _reduction(torch.softmax, keeps_dim=True), _reduction(torch.log_softmax, keeps_dim=True)
_LOGSUMEXP, _CUMSUM = _reduction(torch.logsumexp), _reduction(torch.cumsum, keeps_dim=True)


# Elements per chunk of an element-wise transcendental op. The CPU loops run the vectorized form over whole vectors
# and a scalar form over the tail, and the two round exp / sigmoid / silu differently in the last bit (measured: a
# router's sigmoid over 12 logits, alone and among 4 rows); which elements fall in the tail depends on the tensor's
# size, so on the batch. Chunks of a fixed size that every vector width divides have no tail, and stay under one
# thread's grain (ATen splits work between threads only above 32768 elements).
CHUNK_E = 4096


def _elementwise(op: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """op applied on fixed CHUNK_E-element chunks of its (flattened, zero-padded) tensor argument."""
    def run(x: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.numel() == 0 or not x.is_floating_point():
            return op(x, *args, **kw)
        flat = x.reshape(-1)
        n = flat.numel()
        pad = -n % CHUNK_E
        if pad:
            flat = F.pad(flat, (0, pad))
        parts = [op(flat[i:i + CHUNK_E], *args, **kw) for i in range(0, n + pad, CHUNK_E)]
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
        return out[:n].view(x.shape)
    return run


def _in_place(run: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def run_(x: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
        return x.copy_(run(x, *args, **kw))
    return run_


_EXP, _SIGMOID, _SILU = _elementwise(torch.exp), _elementwise(torch.sigmoid), _elementwise(F.silu)
# The forms the backend's kernels call with the mode off (kernels/batch_invariant_kernels.py: the attention walk).
tiled_sum, tiled_amax, chunked_exp = _SUM, _AMAX, _EXP
_ELEMENTWISE: dict[Callable[..., Any], Callable[..., torch.Tensor]] = {
    torch.exp: _EXP, torch.Tensor.exp: _EXP, torch.Tensor.exp_: _in_place(_EXP),
    torch.sigmoid: _SIGMOID, torch.Tensor.sigmoid: _SIGMOID, F.sigmoid: _SIGMOID,
    torch.Tensor.sigmoid_: _in_place(_SIGMOID), F.silu: lambda x, inplace=False: _SILU(x),
    F.gelu: _elementwise(F.gelu), torch.tanh: _elementwise(torch.tanh), torch.Tensor.tanh: _elementwise(torch.tanh),
    F.softplus: _elementwise(F.softplus), torch.log: _elementwise(torch.log), torch.Tensor.log: _elementwise(torch.log),
    torch.log1p: _elementwise(torch.log1p), torch.expm1: _elementwise(torch.expm1), torch.erf: _elementwise(torch.erf),
    torch.nn.functional.logsigmoid: _elementwise(torch.nn.functional.logsigmoid),
}


def _topk(x: torch.Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True):
    """torch.topk with the rows run TILE_R at a time: its algorithm (and with sorted=False the order it returns
    the k in) is chosen by the shape, so a row's top-k came back in another order in a larger batch (measured:
    DeepSeek-V3's grouped router, whose weights then summed in another order)."""
    if x.numel() == 0:
        return torch.topk(x, k, dim=dim, largest=largest, sorted=sorted)
    d = dim % x.dim()
    moved = x.movedim(d, -1)
    lead, width = moved.shape[:-1], moved.shape[-1]
    rows = moved.reshape(-1, width)
    n = rows.shape[0]
    pad = -n % TILE_R
    rows = F.pad(rows, (0, 0, 0, pad)).contiguous() if pad or not rows.is_contiguous() else rows
    parts = [torch.topk(rows[i:i + TILE_R], k, dim=-1, largest=largest, sorted=sorted)
             for i in range(0, n + pad, TILE_R)]
    values = torch.cat([p.values for p in parts])[:n].reshape(*lead, k).movedim(-1, d)
    indices = torch.cat([p.indices for p in parts])[:n].reshape(*lead, k).movedim(-1, d)
    return torch.return_types.topk((values, indices))


# The ops whose reduction order depends on the number of rows, and the tiled version each one runs instead.
_TILED: dict[Callable[..., Any], Callable[..., torch.Tensor]] = {
    F.linear: _linear,
    torch.matmul: _matmul,
    torch.Tensor.matmul: _matmul,
    torch.Tensor.__matmul__: _matmul,
    torch.mm: lambda a, b: _tiled_rows(torch.mm, a, b),
    torch.Tensor.mm: lambda a, b: _tiled_rows(torch.mm, a, b),
    torch.bmm: _tiled_bmm,
    torch.Tensor.bmm: _tiled_bmm,
    torch.sum: _SUM, torch.Tensor.sum: _SUM, torch.mean: _MEAN, torch.Tensor.mean: _MEAN,
    torch.amax: _AMAX, torch.Tensor.amax: _AMAX, torch.logsumexp: _LOGSUMEXP, torch.Tensor.logsumexp: _LOGSUMEXP,
    torch.softmax: _SOFTMAX, torch.Tensor.softmax: _SOFTMAX, F.softmax: _SOFTMAX,
    torch.log_softmax: _LOG_SOFTMAX, torch.Tensor.log_softmax: _LOG_SOFTMAX, F.log_softmax: _LOG_SOFTMAX,
    torch.cumsum: _CUMSUM, torch.Tensor.cumsum: _CUMSUM, torch.topk: _topk, torch.Tensor.topk: _topk,
    **_ELEMENTWISE,
}
# Ops that would reduce across rows in a batch-dependent order and have no tiled version here: refused, so a path
# that uses one cannot pass for batch-invariant (it must go through invariant_paged_attention or a tiled op).
_REFUSED = {F.scaled_dot_product_attention: "F.scaled_dot_product_attention (attention must be the blocked "
                                            "invariant_paged_attention)",
            torch.einsum: "torch.einsum", torch.baddbmm: "torch.baddbmm", torch.Tensor.addmm: "Tensor.addmm",
            torch.var: "torch.var", torch.Tensor.var: "Tensor.var", torch.std: "torch.std",
            torch.Tensor.std: "Tensor.std", torch.linalg.vector_norm: "torch.linalg.vector_norm",
            torch.norm: "torch.norm", torch.Tensor.norm: "Tensor.norm", torch.prod: "torch.prod"}


class BatchInvariantMode(TorchFunctionMode):
    """Inside it, matmuls run on fixed TILE_M-row tiles (module docstring, rule 1). Thread-local, as torch's function
    modes are: enter it on the thread that runs the forward."""

    def __enter__(self):
        # Rule 4 for every caller of reference_fused_moe (the quantized references dequantize and call it).
        self._padded = PADDED_MAX_PAIRS.set(0)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            PADDED_MAX_PAIRS.reset(self._padded)

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


def mode() -> AbstractContextManager:
    """A fresh BatchInvariantMode (what a batch-invariant backend's `step_context` returns)."""
    return BatchInvariantMode()


__all__ = ["BatchInvariantMode", "CHUNK_E", "SMALL_W", "TILE_M", "TILE_R", "TILE_X", "batch_tile", "chunked_exp", "fixed_bmm",
           "mode", "tiled_amax", "tiled_sum"]
