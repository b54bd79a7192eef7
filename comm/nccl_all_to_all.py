"""Fixed-capacity all-to-all without host syncs: over torch.distributed, and over direct NCCL (CUDA graphs).

Legend as in a2a_base.py; C = max_tokens_per_rank (the capacity), B bytes.

Why a fixed capacity: CUDA graphs replay fixed shapes and cannot wait for the
host to learn how many rows each rank sends. A token goes to a rank at most
once, so a rank never sends more than T <= C rows to any one rank: every
(source, destination) block can be C rows, and T <= C is checked on the host
from x's shape (no sync). The cost is padding on the wire (R·C rows per
dispatch whatever the routing), the usual trade of low-latency EP kernels.

Layout (exact). Send buffer [R·C, D]: block r (rows r·C .. r·C+C-1) holds the
tokens going to rank r in token order, then padding. Receive buffer [R·C, D]:
block s holds what rank s sent here, same order; padding rows are zeros with
ids -1 and weights 0, so the expert kernel skips them. combine sends y back in
the same slots and the sender adds slot r·C + p into its token; padding slots
point at a dump row T that is cut off. No counts travel: the receiver counts its
valid rows (those with a local id) on the device, for the counters only. C is
chosen per call (`capacity`): the step's dispatch mode (comm/ep_modes.py) passes
the decode capacity (low-latency) or the step's largest tokens-per-rank
(high-throughput); without it, the capacity the backend was built with.

Transports: `PaddedAllToAll` ("torch_padded") moves the blocks with
all_to_all_single (equal splits; runs on gloo, so the layout is tested on CPU);
`NcclAllToAll` ("nccl") moves them with grouped ncclSend/ncclRecv on the
current CUDA stream through the NCCL library torch already loads (the
`nvidia-nccl-cu13`/`-cu12` wheel), via ctypes. Nothing GPU-side is imported until an
NcclAllToAll is built.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch
import torch.distributed as dist

from .a2a_base import AllToAll, DispatchMeta, PendingHandle, check_inputs, meta_row_bytes, pack_meta, unpack_meta


class PaddedAllToAll(AllToAll):
    """Fixed-capacity blocks (module docstring) moved by torch.distributed all_to_all_single. No host sync."""

    name = "torch_padded"
    accepts_padding_rows = True

    def __init__(self, group, rank: int, world_size: int, device, max_tokens_per_rank: int):
        if isinstance(max_tokens_per_rank, bool) or not isinstance(max_tokens_per_rank, int) or max_tokens_per_rank < 1:
            raise ValueError(f"all-to-all max_tokens_per_rank must be a positive integer, got {max_tokens_per_rank!r}.")
        if group is None and world_size > 1:
            raise ValueError(f"all-to-all backend {self.name!r} needs a process group at world size {world_size}.")
        super().__init__(group, rank, world_size, device)
        self.capacity = max_tokens_per_rank

    def _exchange(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """For each (out, inp): block r of inp goes to rank r, block s of out comes from rank s (R equal blocks)."""
        for work in self._exchange_async(pairs):
            work.wait()

    def _exchange_async(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list:
        """Start `_exchange`; returns what to wait on (nothing where the copy is already done)."""
        if self.world_size == 1:
            for out, inp in pairs:
                out.copy_(inp)
            return []
        return [dist.all_to_all_single(out, inp, group=self.group, async_op=True) for out, inp in pairs]

    def dispatch(self, x_TD, topk_ids_TK, topk_weights_TK, route, capacity: int | None = None):
        """`capacity`: this call's rows per (source, destination) block, C (default: the built
        max_tokens_per_rank). Every rank of one call must pass the same C (the blocks are equal splits); the
        engine's step plan gives it (comm/ep_modes.py). Ids < 0 (padding rows of a decode graph) go nowhere."""
        pairs, finish = self._pack_dispatch(x_TD, topk_ids_TK, topk_weights_TK, route, capacity)
        self._exchange(pairs)
        return finish()

    def dispatch_async(self, x_TD, topk_ids_TK, topk_weights_TK, route,  # type: ignore[override]  # its one option
                       capacity: int | None = None) -> PendingHandle:
        """x blocks and packed ids+weights travel async (no counts exchange); `wait()` unpacks the metadata."""
        pairs, finish = self._pack_dispatch(x_TD, topk_ids_TK, topk_weights_TK, route, capacity)
        return self._issued(PendingHandle(self._exchange_async(pairs), finish, keep=pairs))

    def combine(self, y_ND, meta):
        pairs, finish = self._pack_combine(y_ND, meta)
        self._exchange(pairs)
        return finish()

    def combine_async(self, y_ND, meta) -> PendingHandle:
        pairs, finish = self._pack_combine(y_ND, meta)
        return self._issued(PendingHandle(self._exchange_async(pairs), finish, keep=pairs))

    def _pack_dispatch(self, x_TD, topk_ids_TK, topk_weights_TK, route, capacity: int | None = None):
        """The send blocks and their receive buffers as (out, inp) pairs, and the function that builds
        dispatch's result once they have arrived."""
        check_inputs(x_TD, topk_ids_TK, topk_weights_TK, route, self.world_size)
        num_tokens, hidden = x_TD.shape
        top_k = topk_ids_TK.shape[1]
        C = self.capacity if capacity is None else capacity
        if isinstance(C, bool) or not isinstance(C, int) or C < 1:
            raise ValueError(f"dispatch capacity must be a positive integer, got {C!r}.")
        if num_tokens > C:
            # Host-known shapes: no sync. Dropping rows would lose tokens, so this is an error, never a cut.
            what = "max_tokens_per_rank" if capacity is None else "this call's capacity"
            raise ValueError(f"dispatch got {num_tokens} tokens but {what} is {C}: raise it (the step plan sizes "
                             f"it, engine/contract/ep_step.py) or schedule fewer tokens per step.")
        R, dev = self.world_size, x_TD.device
        rows = R * C
        valid_TK = topk_ids_TK >= 0
        dst_TK, slot_TK = route.route(topk_ids_TK.clamp(min=0), self.rank)
        # Pairs with no expert go to column R, a rank that does not exist, and from there to dump row `rows`.
        dst_TK = torch.where(valid_TK, dst_TK, R)
        to_rank_TR = torch.zeros(num_tokens, R + 1, dtype=torch.bool, device=dev).scatter_(1, dst_TK, True)[:, :R]
        send_counts_R = to_rank_TR.sum(0)
        # Position of token t in block r = how many earlier tokens also go to r.
        pos_TR = torch.cumsum(to_rank_TR.long(), 0) - 1
        pos_TR = torch.cat([pos_TR, pos_TR.new_zeros(num_tokens, 1)], 1)
        row_TK = torch.where(valid_TK, dst_TK * C + pos_TR.gather(1, dst_TK), rows)
        # Pairs of one token to one rank share a row and write the same values there. Row `rows` is the dump.
        send_x_SD = x_TD.new_zeros(rows + 1, hidden)
        send_x_SD[row_TK] = x_TD[:, None, :].expand(-1, top_k, -1)
        send_tok_S = torch.full((rows + 1,), num_tokens, dtype=torch.long, device=dev)
        send_tok_S[row_TK] = torch.where(valid_TK, torch.arange(num_tokens, device=dev)[:, None], num_tokens)
        col_TK = torch.arange(top_k, device=dev)[None, :].expand(num_tokens, -1)
        send_ids_SK = torch.full((rows + 1, top_k), -1, dtype=torch.int32, device=dev)
        send_ids_SK[row_TK, col_TK] = torch.where(valid_TK, slot_TK.to(torch.int32), -1)
        send_weights_SK = topk_weights_TK.new_zeros(rows + 1, top_k)
        send_weights_SK[row_TK, col_TK] = torch.where(valid_TK, topk_weights_TK, 0)
        send_x_SD, send_tok_S = send_x_SD[:rows], send_tok_S[:rows]

        send_meta_SB = pack_meta(send_ids_SK[:rows], send_weights_SK[:rows])
        recv_x_ND = torch.empty_like(send_x_SD)
        recv_meta_NB = torch.empty_like(send_meta_SB)

        def finish():
            recv_ids_NK, recv_weights_NK = unpack_meta(recv_meta_NB, top_k, topk_weights_TK.dtype)
            # No counts exchange: a row arrives here only because one of its pairs lives here, so the valid
            # rows are those with a local id, counted on the device.
            recv_counts_R = (recv_ids_NK >= 0).any(1).view(R, C).sum(1)
            meta = DispatchMeta(
                recv_topk_ids_NK=recv_ids_NK, recv_topk_weights_NK=recv_weights_NK, num_tokens=num_tokens,
                send_token_idx_S=send_tok_S, send_counts_R=send_counts_R, recv_counts_R=recv_counts_R,
                send_counts=None, recv_counts=None,
                row_bytes=hidden * x_TD.element_size(), meta_row_bytes=meta_row_bytes(topk_weights_TK),
                wire_rows=rows)
            return recv_x_ND, meta

        return [(recv_x_ND, send_x_SD), (recv_meta_NB, send_meta_SB)], finish

    def _pack_combine(self, y_ND, meta):
        rows = meta.send_token_idx_S.shape[0]  # R · C of the dispatch that made meta
        if y_ND.dim() != 2 or y_ND.shape[0] != rows:
            raise ValueError(f"combine y_ND must have {rows} rows (world size × the dispatch's capacity), "
                             f"got {tuple(y_ND.shape)}.")
        y_ND = y_ND.contiguous()
        back_SD = torch.empty_like(y_ND)

        def finish():
            out_TD = y_ND.new_zeros(meta.num_tokens + 1, y_ND.shape[1])  # row T collects the padding slots
            out_TD.index_add_(0, meta.send_token_idx_S, back_SD)
            return out_TD[: meta.num_tokens]

        return [(back_SD, y_ND)], finish


# --- direct NCCL ---------------------------------------------------------------------------------

_NCCL_UINT8 = 1  # ncclDataType_t ncclUint8: blocks travel as bytes, whatever their dtype


class _NcclUniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * 128)]  # NCCL_UNIQUE_ID_BYTES


def _find_libnccl() -> str:
    """The NCCL library of the wheel torch's CUDA build depends on (nvidia-nccl-cu12 or -cu13: the `nvidia`
    namespace package, lib/ under nccl/ or the CUDA-major folder), else the system one."""
    try:
        import nvidia  # namespace package of NVIDIA's CUDA wheels

        for base in list(getattr(nvidia, "__path__", [])):
            for sub in ("nccl", "cu13", "cu12"):
                path = os.path.join(base, sub, "lib", "libnccl.so.2")
                if os.path.exists(path):
                    return path
    except ImportError:
        pass
    return ctypes.util.find_library("nccl") or "libnccl.so.2"


class NcclLibrary:
    """The few NCCL entry points we use, through ctypes (signatures from nccl.h, NCCL >= 2.7)."""

    def __init__(self, path: str | None = None):
        path = path or _find_libnccl()
        try:
            self.lib = ctypes.CDLL(path)
        except OSError as e:
            raise RuntimeError(f"all-to-all backend 'nccl' could not load the NCCL library {path!r} ({e}); "
                               f"install the NCCL wheel of torch's CUDA build (nvidia-nccl-cu13 for CUDA 13, nvidia-nccl-cu12 for "
                               f"CUDA 12; `pip install .[gpu]` installs the former) or pass library_path.") from e
        lib, vp, res = self.lib, ctypes.c_void_p, ctypes.c_int
        lib.ncclGetErrorString.restype, lib.ncclGetErrorString.argtypes = ctypes.c_char_p, [res]
        lib.ncclGetVersion.restype, lib.ncclGetVersion.argtypes = res, [ctypes.POINTER(ctypes.c_int)]
        lib.ncclGetUniqueId.restype, lib.ncclGetUniqueId.argtypes = res, [ctypes.POINTER(_NcclUniqueId)]
        # ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId commId /* by value */, int rank)
        lib.ncclCommInitRank.restype = res
        lib.ncclCommInitRank.argtypes = [ctypes.POINTER(vp), ctypes.c_int, _NcclUniqueId, ctypes.c_int]
        lib.ncclCommDestroy.restype, lib.ncclCommDestroy.argtypes = res, [vp]
        # ncclSend(const void* buf, size_t count, ncclDataType_t type, int peer, ncclComm_t comm, cudaStream_t stream)
        for fn in (lib.ncclSend, lib.ncclRecv):
            fn.restype, fn.argtypes = res, [vp, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, vp, vp]
        lib.ncclGroupStart.restype, lib.ncclGroupStart.argtypes = res, []
        lib.ncclGroupEnd.restype, lib.ncclGroupEnd.argtypes = res, []

    def check(self, result: int, what: str) -> None:
        if result != 0:
            msg = self.lib.ncclGetErrorString(result).decode(errors="replace")
            raise RuntimeError(f"NCCL {what} failed with error {result}: {msg}")

    def version(self) -> int:
        v = ctypes.c_int()
        self.check(self.lib.ncclGetVersion(ctypes.byref(v)), "ncclGetVersion")
        return v.value

    def unique_id(self) -> bytes:
        uid = _NcclUniqueId()
        self.check(self.lib.ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
        return bytes(uid.internal)

    def comm_init_rank(self, world_size: int, uid: bytes, rank: int) -> ctypes.c_void_p:
        handle = _NcclUniqueId()
        ctypes.memmove(handle.internal, uid, len(uid))
        comm = ctypes.c_void_p()
        self.check(self.lib.ncclCommInitRank(ctypes.byref(comm), world_size, handle, rank), "ncclCommInitRank")
        return comm


class _StreamJoin:
    """What an async NCCL exchange hands back: `wait()` makes the then-current stream wait for its event (no
    host sync)."""

    def __init__(self, event, device):
        self.event, self.device = event, device

    def wait(self) -> None:
        torch.cuda.current_stream(self.device).wait_event(self.event)


class NcclAllToAll(PaddedAllToAll):
    """The fixed-capacity layout over grouped ncclSend/ncclRecv on the current stream: CUDA-graph safe.

    `group` (any torch.distributed group over the same ranks, gloo or NCCL)
    only carries the NCCL unique id at construction. All ranks must build
    this object together (ncclCommInitRank blocks until all have joined).
    Options: library_path (a libnccl.so.2 to load instead of torch's),
    self_copy (default True: the block to this rank is a plain device copy).
    """

    name = "nccl"

    def __init__(self, group, rank: int, world_size: int, device, max_tokens_per_rank: int,
                 library_path: str | None = None, self_copy: bool = True):
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError(f"all-to-all backend 'nccl' needs a CUDA device, got {device} "
                               f"(CUDA available: {torch.cuda.is_available()}); use 'torch' on CPU (gloo).")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        super().__init__(group, rank, world_size, device, max_tokens_per_rank)
        self._self_copy = self_copy  # False: the own block also goes through ncclSend/ncclRecv (GPU self-test)
        self._nccl = NcclLibrary(library_path)
        uid = [self._nccl.unique_id() if rank == 0 else None]
        if world_size > 1:
            dist.broadcast_object_list(uid, src=dist.get_global_rank(group, 0), group=group)
        with torch.cuda.device(device):
            self._comm = self._nccl.comm_init_rank(world_size, uid[0], rank)
            # The async calls' transfers run here, so the compute stream goes on until it waits on the handle.
            self._comm_stream = torch.cuda.Stream(device)

    def _exchange_async(self, pairs):
        """The exchange on the communication stream, after what the compute stream has queued (the send buffers
        were written there); the handle makes the compute stream wait for it at `wait()`. Events and stream
        waits only: CUDA-graph safe (a captured graph forks to the side stream and joins back at the wait).
        Blocking calls run on the compute stream: with a handle in flight they would use the communicator from two
        streams at once, which NCCL does not order; callers that use handles use them for every call (the MoE
        layer does)."""
        compute, side = torch.cuda.current_stream(self.device), self._comm_stream
        side.wait_stream(compute)
        with torch.cuda.stream(side):
            self._exchange(pairs)
        # No record_stream (not capture-safe): the handle holds every buffer until its wait() has joined the
        # compute stream to this one, so the caching allocator reuses them only after the transfer.
        done = torch.cuda.Event()
        done.record(side)
        return [_StreamJoin(done, self.device)]

    def _exchange(self, pairs):
        R, me = self.world_size, self.rank
        stream = ctypes.c_void_p(torch.cuda.current_stream(self.device).cuda_stream)
        lib, check = self._nccl.lib, self._nccl.check
        peers = [p for p in range(R) if p != me or not self._self_copy]
        if self._self_copy:  # the block to ourselves is a device copy, not an NCCL self-send
            for out, inp in pairs:
                out.view(R, -1)[me].copy_(inp.view(R, -1)[me])
        if not peers:
            return
        check(lib.ncclGroupStart(), "ncclGroupStart")
        try:
            for out, inp in pairs:
                if not (inp.is_contiguous() and out.is_contiguous() and out.shape == inp.shape
                        and out.dtype == inp.dtype and inp.device == self.device == out.device):
                    raise ValueError("NCCL all-to-all buffers must be contiguous, of one shape and dtype, "
                                     f"on {self.device}.")
                block = inp.numel() * inp.element_size() // R
                for peer in peers:
                    check(lib.ncclSend(ctypes.c_void_p(inp.data_ptr() + peer * block), block, _NCCL_UINT8, peer,
                                       self._comm, stream), "ncclSend")
                    check(lib.ncclRecv(ctypes.c_void_p(out.data_ptr() + peer * block), block, _NCCL_UINT8, peer,
                                       self._comm, stream), "ncclRecv")
        finally:
            check(lib.ncclGroupEnd(), "ncclGroupEnd")

    def close(self) -> None:
        """Destroy the communicator. Every CUDA graph that captured this all-to-all must be destroyed first:
        ncclCommDestroy waits for such graphs to release the communicator, forever (seen on an H100 with
        NCCL 2.28.9, benchmarks/results/gpu_NVIDIA_H100_80GB_HBM3_2026-11-22.md)."""
        if getattr(self, "_comm", None) is not None:
            self._nccl.check(self._nccl.lib.ncclCommDestroy(self._comm), "ncclCommDestroy")
            self._comm = None


__all__ = ["NcclAllToAll", "NcclLibrary", "PaddedAllToAll"]
