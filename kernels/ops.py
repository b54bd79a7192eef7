"""One selector for the kernel implementations a device runs (ARCHITECTURE.md: Design rules 8 and 12).

`Kernels` is a strategy object: the model calls `kernels.rms_norm(...)` and never asks which implementation it got.
It is the composition of the kernel families, one protocol each with real signatures, each declared and registered
(its references and its Triton loader) by its own module `ops_<family>.py` in `kernels/registry.py`; this file
imports those protocols only. `ReferenceKernels` is plain torch (the CPU path and the test oracle); `TritonKernels`
is the GPU path. A new family is a module `ops_<family>.py` and one entry in `Kernels`' bases below.

The Triton modules are imported only when a `TritonKernels` is built (each family's loader): Triton decides at kernel
definition whether a kernel runs compiled or in the CPU interpreter (TRITON_INTERPRET=1), so importing them as a side
effect of importing the engine would freeze that choice too early.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol

import torch

from . import registry
from .attention import AttentionMetadata
from .ops_attention import AttentionKernels
from .ops_block_sparse import BlockSparseKernels
from .ops_dense import DenseKernels
from .ops_dsa import DSAKernels
from .ops_compressed_attention import CompressedAttentionKernels
from .ops_gated_delta import GatedDeltaKernels
from .ops_lora import LoRAKernels
from .ops_mamba1 import Mamba1Kernels
from .ops_mamba2 import Mamba2Kernels
from .ops_hyper_connection import HyperConnectionKernels
from .ops_mla import MLAKernels
from .ops_moe import MoEKernels
from .ops_norm import NormKernels
from .ops_qsa import QSAKernels
from .ops_router import RouterKernels


class Kernels(NormKernels, AttentionKernels, MLAKernels, DSAKernels, BlockSparseKernels, CompressedAttentionKernels,
              HyperConnectionKernels, RouterKernels, DenseKernels, MoEKernels, GatedDeltaKernels, Mamba1Kernels, Mamba2Kernels,
              QSAKernels, LoRAKernels, Protocol):
    """What a kernel backend gives the model: every family's ops, each taking the arguments of its plain-torch
    reference (the contract and the oracle) and returning what it returns; a backend may take more keywords.
    tests/kernels/test_kernels_protocol.py checks each protocol against the references and every backend against it."""

    name: ClassVar[str]


FAMILIES: tuple[registry.Family, ...] = registry.families(Kernels)

# Each op of `Kernels` and the reference that defines its arguments.
REFERENCES: dict[str, Callable[..., Any]] = {op: fn for f in FAMILIES for op, fn in f.reference.items()}


class _Backend:
    """A backend assembled from the registry: each family's ops (and kept state) as instance attributes."""

    name: ClassVar[str]

    def __init__(self) -> None:
        for attr, fn in self._implementations().items():
            setattr(self, attr, fn)

    def _implementations(self) -> dict[str, Any]:
        raise NotImplementedError

    if TYPE_CHECKING:  # the ops are set per instance: mypy checks the calls through `Kernels`
        def __getattr__(self, op: str) -> Any: ...


class ReferenceKernels(_Backend):
    """Plain-torch implementations; correct on any device, fast enough on CPU."""

    name = "reference"

    def _implementations(self) -> dict[str, Any]:
        return dict(REFERENCES)


class NativeCpuKernels(ReferenceKernels):
    """The references, with the row-local ops of a small CPU step in native code (kernels/cpu_native.py: RMSNorm
    alone and with the residual add, the greedy router top-k, a few tokens' routed experts): one ctypes call each
    where torch dispatches several ops. Each op takes only CPU float32 / bfloat16 inputs of a small step and runs its
    reference for anything else (float64, a prefill's size, other router methods). The CPU's `auto` backend when the
    native library builds here (kernels/cpu_native_build.py; MOELINK_CPU_NATIVE=0 turns it off)."""

    name = "cpu_native"

    def _implementations(self) -> dict[str, Any]:
        import functools

        from .cpu_native import NATIVE_OPS
        from .cpu_native_build import library

        # The library resolved once for the backend (each call would otherwise read the environment's switches).
        lib = library()
        return {**super()._implementations(), **{op: functools.partial(fn, lib=lib) for op, fn in NATIVE_OPS.items()}}


class TritonKernels(_Backend):
    """Triton kernels (moelink.kernels.triton_*): the GPU path. Same signatures as the references.

    Takes float32, bfloat16 and float16 activations. On CPU tensors the kernels run in the Triton interpreter, which
    needs TRITON_INTERPRET=1 set before this is first built (tests only: it is slow). Each build runs every family's
    Triton loader (the MoE family's gives this backend its `int4_workspace`, reused by every layer).
    """

    name = "triton"

    def _implementations(self) -> dict[str, Any]:
        return {attr: fn for f in FAMILIES for attr, fn in f.load_triton().items()}


class BatchInvariantKernels(ReferenceKernels):
    """The references, with attention over fixed key blocks in position order and every matmul of a step on fixed
    row tiles (`step_context`): a row's result is bitwise the same in any batch (kernels/batch_invariant.py).
    The CPU path of batch-invariant mode (a GPU with Triton runs `BatchInvariantTritonKernels`)."""

    name = "batch_invariant"

    def _implementations(self) -> dict[str, Any]:
        from .batch_invariant_kernels import (invariant_dsa_topk, invariant_fused_moe, invariant_gated_delta_rule,
                                      invariant_mla_attention, invariant_paged_attention,
                                      invariant_sparse_mla_attention)

        from .batch_invariant_block_sparse import invariant_block_sparse_attention, invariant_block_sparse_select
        from .batch_invariant_pooled_dsa import invariant_dsa_pool_topk
        from .batch_invariant_qsa import invariant_qsa_select, invariant_sparse_gqa_attention
        from .batch_invariant_compressed import (invariant_compressed_indexer_topk, invariant_grouped_linear,
                                                 invariant_paged_compressed_indexer_topk,
                                                 invariant_paged_sink_attention, invariant_sink_attention)

        return {**super()._implementations(), "paged_attention": invariant_paged_attention,
                "mla_attention": invariant_mla_attention, "fused_moe": invariant_fused_moe,
                "gated_delta_rule": invariant_gated_delta_rule, "dsa_topk": invariant_dsa_topk,
                "sparse_mla_attention": invariant_sparse_mla_attention,
                "sink_attention": invariant_sink_attention, "paged_sink_attention": invariant_paged_sink_attention,
                "compressed_indexer_topk": invariant_compressed_indexer_topk,
                "paged_compressed_indexer_topk": invariant_paged_compressed_indexer_topk,
                "grouped_linear": invariant_grouped_linear,
                "block_sparse_select": invariant_block_sparse_select,
                "block_sparse_attention": invariant_block_sparse_attention,
                "dsa_pool_topk": invariant_dsa_pool_topk,
                "qsa_select": invariant_qsa_select, "sparse_gqa_attention": invariant_sparse_gqa_attention}

    @staticmethod
    def step_context():
        """Entered on the thread that runs a step's forward (engine/rank/model_runner.py): the tiles' mode."""
        from .batch_invariant import BatchInvariantMode

        return BatchInvariantMode()


class BatchInvariantTritonKernels(BatchInvariantKernels):
    """Batch-invariant mode on a GPU: BatchInvariantKernels with Triton kernels of one fixed launch config where the
    GQA decoder and its routed experts spend their time (kernels/batch_invariant_triton.py): paged attention (fixed
    keys per split, merged in order), the float fused MoE (one config, the ordered top-k sum), the row-local kernels
    (RMSNorm, rotary, KV write, their fused decode input, router top-k, SiLU-mul), and every product by a weight
    matrix on a fixed-tile matmul (`step_context`). Other ops keep the invariant
    plain-torch forms."""

    name = "batch_invariant_triton"

    def _implementations(self) -> dict[str, Any]:
        from .batch_invariant_triton import invariant_triton_fused_moe
        from .triton_attention import triton_write_kv
        from .triton_invariant_attention import triton_invariant_paged_attention
        from .triton_norm import triton_add_rms_norm, triton_rms_norm
        from .triton_rope_kv import triton_rope_write_kv
        from .triton_rotary import triton_rotary
        from .triton_router_topk import triton_route_topk
        from .triton_silu_mul import triton_silu_mul

        # The normal backend's row-local kernels as they are: one program per token (or row), blocks from the
        # widths only, so a row's result is its own (the router's expert-load count adds integers: exact).
        row_local = dict(rms_norm=triton_rms_norm, add_rms_norm=triton_add_rms_norm, rotary=triton_rotary,
                         write_kv=triton_write_kv, rope_write_kv=triton_rope_write_kv, route_topk=triton_route_topk,
                         silu_mul=triton_silu_mul)
        return {**super()._implementations(), "paged_attention": triton_invariant_paged_attention,
                "fused_moe": invariant_triton_fused_moe, **row_local}

    @staticmethod
    def step_context():
        from .batch_invariant_triton import TritonBatchInvariantMode

        return TritonBatchInvariantMode()


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _native_cpu_available() -> bool:
    from .cpu_native_build import library

    return library() is not None


_BACKENDS: dict[str, type[_Backend]] = {"reference": ReferenceKernels, "cpu_native": NativeCpuKernels,
                                         "triton": TritonKernels,
                                         "batch_invariant": BatchInvariantKernels,
                                         "batch_invariant_triton": BatchInvariantTritonKernels}


def backend_class(device: torch.device, name: str = "auto") -> type[_Backend]:
    """The strategy: which backend class `name` builds on `device`. `auto` is Triton on CUDA, the native CPU kernels
    on a CPU where they build (kernels/cpu_native_build.py), references elsewhere;
    `batch_invariant` is BatchInvariantTritonKernels on CUDA with Triton, BatchInvariantKernels (plain torch)
    elsewhere; another name forces that backend (tests)."""
    device = torch.device(device)
    on_gpu = device.type == "cuda" and _triton_available()
    if name == "auto":
        name = "triton" if on_gpu else "cpu_native" if device.type == "cpu" and _native_cpu_available() else "reference"
    if name == "batch_invariant" and on_gpu:
        name = "batch_invariant_triton"
    if name not in _BACKENDS:
        raise ValueError(f"kernels={name!r} is invalid: choose from {sorted(_BACKENDS)} or 'auto'.")
    if name == "cpu_native" and not _native_cpu_available():
        raise ValueError("kernels='cpu_native' is not available: the native CPU kernels did not build here (see the "
                         "log's warning; MOELINK_CPU_NATIVE=0 turns them off) (use 'reference').")
    if name in ("triton", "batch_invariant_triton") and not _triton_available():
        raise ValueError(f"kernels={name!r} is not available: the triton package is not installed (use 'reference').")
    return _BACKENDS[name]


def select_kernels(device: torch.device, name: str = "auto") -> Kernels:
    """The kernel backend `backend_class` picks, built."""
    return backend_class(device, name)()


__all__ = ["AttentionMetadata", "BatchInvariantKernels", "BatchInvariantTritonKernels", "FAMILIES", "Kernels", "REFERENCES", "ReferenceKernels",
           "TritonKernels",
           "backend_class", "select_kernels"]
