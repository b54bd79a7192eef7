"""How the sorted MoE GEMMs (the scaffold of kernels/triton_moe_gemm.py, for every weight format) map programs to tiles.

Tiles: the GEMM over R padded rows (moe_align) is (R / BLOCK_M) x ceil(N / BLOCK_N) tiles of [BLOCK_M, BLOCK_N];
GROUP_M consecutive M blocks sweep the N blocks together, so the expert weights they share stay in L2
(`_tile_pids`). R is a host-side bound (no device→host sync); the rows the routing actually filled, the
alignment's padded total `num_rows_1`, are known only on the device.

- One program per tile (config PERSISTENT 0): the grid is the bound's tile count; a program whose M block is
  past the live rows reads expert id -1 and exits. Dead programs still cost a launch slot each: at decode sizes
  the bound is mostly padding (min(E, P) experts x (BLOCK_M - 1) rows).
- Persistent (PERSISTENT k >= 1): min(bound's tiles, k x #SMs) programs; each reads the live row count from the
  device and strides over the live tiles only (tile = program id, + grid, ...). Dead blocks cost nothing and the
  grid still depends on shapes alone, so CUDA graphs stay valid when the routing changes.

TMA (config TMA): the kernels build tensor descriptors on the device (`tl.make_tensor_descriptor`), which needs
global scratch for the descriptors: `ensure_allocator` installs a torch-backed Triton allocator once per process
(a global Triton setting; it is only installed when none is set). `tma_ok` keeps the pointer path where a tensor
breaks TMA's rules (16-byte aligned base and strides, unit last stride).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tile_pids(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # GROUP_M consecutive M blocks sweep the N blocks together, so the expert
    # weights they share stay in L2.
    per_group = GROUP_M * num_pid_n
    first_m = (tile // per_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % group_size
    pid_n = (tile % per_group) // group_size
    return pid_m, pid_n


@triton.jit
def _grouped_pids(num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program when the grid has one program per tile."""
    return _tile_pids(tl.program_id(0), num_pid_m, num_pid_n, GROUP_M)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device`; 4 for CPU tensors (the interpreter), so a small test batch already
    has programs that loop over several tiles."""
    from . import triton_moe_tiny  # (its num_sms is what the offline compile report patches to the H100's 132)

    return triton_moe_tiny.num_sms(torch.device(device))


def gemm_grid(num_tiles: int, persistent: int, device: torch.device) -> int:
    """Programs to launch for a GEMM of `num_tiles` tiles (the host-side bound): all of them, or with
    `persistent` = k >= 1, min(num_tiles, k x #SMs), at least 1."""
    if persistent < 0:
        raise ValueError(f"persistent={persistent} is invalid: must be >= 0 (0: one program per tile).")
    if not persistent:
        return num_tiles
    return max(1, min(num_tiles, persistent * num_sms(device)))


TMA_OFF, TMA_ON, WS_TMA = 0, 1, 2  # the kernels' TMA constexpr: pointer tiles, TMA loads, TMA + warp specialization


def tma_mode(g, *tensors: torch.Tensor) -> int:
    """The kernels' TMA constexpr for GemmConfig `g` over `tensors`: TMA only where every tensor fits a descriptor
    (`tma_ok`), warp-specialized K loops where the config also asks for them (WARP_SPECIALIZE)."""
    if not (g.TMA and tma_ok(*tensors)):
        return TMA_OFF
    return WS_TMA if g.WARP_SPECIALIZE else TMA_ON


def tma_ok(*tensors: torch.Tensor) -> bool:
    """Whether every tensor fits a TMA descriptor: unit last stride, 16-byte aligned base and other strides."""
    for t in tensors:
        if t.stride(-1) != 1:
            return False
        if any(s * t.element_size() % 16 for s in t.stride()[:-1]):
            return False
        if t.device.type != "meta" and t.data_ptr() % 16:
            return False
    ensure_allocator()
    return True


def ensure_allocator() -> None:
    """Give Triton an allocator for the descriptors' scratch memory (torch's caching allocator, so CUDA-graph
    capture takes it from the graph's pool), unless one is set already. Triton keeps it in a ContextVar (one per
    thread), so this checks on every call (a lookup) rather than once per process."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_torch_alloc)


def _torch_alloc(size: int, alignment: int, stream):
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.empty(size, dtype=torch.int8, device=dev)
