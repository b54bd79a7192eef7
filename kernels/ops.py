"""One selector for the kernel implementations a device runs (ARCHITECTURE.md: Design rules 12).

`Kernels` is a strategy object: the model calls `kernels.rms_norm(...)` and
never asks which implementation it got. `ReferenceKernels` is plain torch (the
CPU path and the test oracle); `TritonKernels` is the GPU path.

The Triton modules are imported only when a `TritonKernels` is built: Triton
decides at kernel definition whether a kernel runs compiled or in the CPU
interpreter (TRITON_INTERPRET=1), so importing them as a side effect of
importing the engine would freeze that choice too early.
"""
from __future__ import annotations

import functools
from typing import Callable, ClassVar, Protocol

import torch

from .attention import AttentionMetadata, reference_paged_attention, reference_write_kv
from .causal_conv1d import reference_causal_conv1d, reference_causal_conv1d_update, reference_replay_conv_state
from .dsa import reference_dsa_topk, reference_sparse_mla_attention, reference_write_fp8_index_keys
from .dsv4 import (reference_compress, reference_grouped_linear, reference_hc_expand, reference_indexer_topk,
                   reference_paged_indexer_topk, reference_paged_sink_attention, reference_sink_attention)
from .fp8 import reference_fp8_linear, reference_fused_moe_fp8
from .int4 import reference_fused_moe_int4
from .gated_delta import (reference_commit_states, reference_gated_delta_rule, reference_gated_delta_rule_decode,
                          reference_gdn_gating, reference_replay_gated_delta_state)
from .mla import reference_mla_attention, reference_write_latent
from .mla_input import reference_mla_rope_write_latent
from .moe import reference_fused_moe
from .mxfp4 import reference_fused_moe_mxfp4
from .nvfp4 import reference_fused_moe_nvfp4
from .norm import reference_add_rms_norm, reference_rms_norm
from .rope_kv import reference_rope_write_kv
from .rotary import reference_rotary
from .silu_mul import reference_silu_mul
from .router_topk import reference_route_topk


class Kernels(Protocol):
    """What a kernel backend gives the model: each op takes the arguments of its plain-torch reference
    (`reference_<op>` in this package: the contract and the oracle) and returns what it returns; a backend may
    take more keywords. tests/kernels/test_kernels_protocol.py checks every backend against it."""

    name: ClassVar[str]
    rms_norm: Callable
    add_rms_norm: Callable
    rotary: Callable
    write_kv: Callable
    rope_write_kv: Callable
    paged_attention: Callable
    write_latent: Callable
    mla_rope_write_latent: Callable
    mla_attention: Callable
    # DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5): the indexer's top-k positions, MLA over them (kernels/dsa.py);
    # its keys into an fp8 key cache (e4m3 with a float32 scale per 128 values).
    dsa_topk: Callable
    write_fp8_index_keys: Callable
    sparse_mla_attention: Callable
    # DeepSeek-V4 (kernels/dsv4.py): the compressor's pooling, the indexer's top-k over compressed entries, MQA with
    # per-head sinks over the window and the entries, the grouped output projection; the hyper-connections' residual.
    dsv4_compress: Callable
    dsv4_indexer_topk: Callable
    dsv4_sink_attention: Callable
    dsv4_grouped_linear: Callable
    dsv4_hc_expand: Callable
    # A batched decode step's indexer and sink attention reading index keys and entries through the block tables
    # and window rows from the state slots (no gathered copy; kernels/dsv4.py: reference_paged_*).
    dsv4_paged_indexer_topk: Callable
    dsv4_paged_sink_attention: Callable
    route_topk: Callable
    silu_mul: Callable
    fused_moe: Callable
    fp8_linear: Callable
    fused_moe_fp8: Callable
    fused_moe_mxfp4: Callable
    fused_moe_nvfp4: Callable
    fused_moe_int4: Callable
    # Gated DeltaNet linear attention (Qwen3-Next, Qwen3.5-MoE): kernels/causal_conv1d.py, kernels/gated_delta.py.
    causal_conv1d: Callable
    causal_conv1d_update: Callable
    gdn_gating: Callable
    gated_delta_rule: Callable
    gated_delta_rule_decode: Callable
    commit_states: Callable
    replay_gated_delta_state: Callable
    replay_conv_state: Callable


# Each op of `Kernels` and the reference that defines its arguments.
REFERENCES: dict[str, Callable] = dict(
    rms_norm=reference_rms_norm, add_rms_norm=reference_add_rms_norm, rotary=reference_rotary,
    write_kv=reference_write_kv, rope_write_kv=reference_rope_write_kv, paged_attention=reference_paged_attention, write_latent=reference_write_latent,
    mla_rope_write_latent=reference_mla_rope_write_latent,
    mla_attention=reference_mla_attention, dsa_topk=reference_dsa_topk,
    write_fp8_index_keys=reference_write_fp8_index_keys,
    sparse_mla_attention=reference_sparse_mla_attention, dsv4_compress=reference_compress,
    dsv4_indexer_topk=reference_indexer_topk, dsv4_sink_attention=reference_sink_attention,
    dsv4_grouped_linear=reference_grouped_linear, dsv4_hc_expand=reference_hc_expand,
    dsv4_paged_indexer_topk=reference_paged_indexer_topk, dsv4_paged_sink_attention=reference_paged_sink_attention,
    route_topk=reference_route_topk, silu_mul=reference_silu_mul,
    fused_moe=reference_fused_moe, fp8_linear=reference_fp8_linear,
    fused_moe_fp8=reference_fused_moe_fp8, fused_moe_mxfp4=reference_fused_moe_mxfp4,
    fused_moe_nvfp4=reference_fused_moe_nvfp4, fused_moe_int4=reference_fused_moe_int4,
    causal_conv1d=reference_causal_conv1d, causal_conv1d_update=reference_causal_conv1d_update,
    gdn_gating=reference_gdn_gating, gated_delta_rule=reference_gated_delta_rule,
    gated_delta_rule_decode=reference_gated_delta_rule_decode, commit_states=reference_commit_states,
    replay_gated_delta_state=reference_replay_gated_delta_state, replay_conv_state=reference_replay_conv_state,
)


class ReferenceKernels:
    """Plain-torch implementations; correct on any device, fast enough on CPU."""

    name = "reference"

    rms_norm = staticmethod(reference_rms_norm)
    add_rms_norm = staticmethod(reference_add_rms_norm)
    rotary = staticmethod(reference_rotary)
    write_kv = staticmethod(reference_write_kv)
    rope_write_kv = staticmethod(reference_rope_write_kv)
    paged_attention = staticmethod(reference_paged_attention)
    write_latent = staticmethod(reference_write_latent)
    mla_rope_write_latent = staticmethod(reference_mla_rope_write_latent)
    mla_attention = staticmethod(reference_mla_attention)
    dsa_topk = staticmethod(reference_dsa_topk)
    write_fp8_index_keys = staticmethod(reference_write_fp8_index_keys)
    sparse_mla_attention = staticmethod(reference_sparse_mla_attention)
    dsv4_compress = staticmethod(reference_compress)
    dsv4_indexer_topk = staticmethod(reference_indexer_topk)
    dsv4_sink_attention = staticmethod(reference_sink_attention)
    dsv4_grouped_linear = staticmethod(reference_grouped_linear)
    dsv4_hc_expand = staticmethod(reference_hc_expand)
    dsv4_paged_indexer_topk = staticmethod(reference_paged_indexer_topk)
    dsv4_paged_sink_attention = staticmethod(reference_paged_sink_attention)
    route_topk = staticmethod(reference_route_topk)
    silu_mul = staticmethod(reference_silu_mul)
    fused_moe = staticmethod(reference_fused_moe)
    fp8_linear = staticmethod(reference_fp8_linear)
    fused_moe_fp8 = staticmethod(reference_fused_moe_fp8)
    fused_moe_mxfp4 = staticmethod(reference_fused_moe_mxfp4)
    fused_moe_nvfp4 = staticmethod(reference_fused_moe_nvfp4)
    fused_moe_int4 = staticmethod(reference_fused_moe_int4)
    causal_conv1d = staticmethod(reference_causal_conv1d)
    causal_conv1d_update = staticmethod(reference_causal_conv1d_update)
    gdn_gating = staticmethod(reference_gdn_gating)
    gated_delta_rule = staticmethod(reference_gated_delta_rule)  # chunked per long sequence, batched recurrence else
    gated_delta_rule_decode = staticmethod(reference_gated_delta_rule_decode)
    commit_states = staticmethod(reference_commit_states)
    replay_gated_delta_state = staticmethod(reference_replay_gated_delta_state)
    replay_conv_state = staticmethod(reference_replay_conv_state)


class TritonKernels:
    """Triton kernels (moelink.kernels.triton_*): the GPU path. Same signatures as the references.

    Takes float32, bfloat16 and float16 activations. On CPU tensors the kernels
    run in the Triton interpreter, which needs TRITON_INTERPRET=1 set before
    this is first built (tests only: it is slow).
    """

    name = "triton"

    def __init__(self):
        from .triton_attention import triton_paged_attention, triton_write_kv
        from .triton_mla import triton_mla_attention, triton_write_latent
        from .triton_mla_input import triton_mla_rope_write_latent
        from .triton_moe import triton_fused_moe
        from .triton_int4_dequant import DequantWorkspace
        from .triton_moe_int4 import triton_fused_moe_int4
        from .triton_moe_mxfp4 import triton_fused_moe_mxfp4
        from .triton_moe_nvfp4 import triton_fused_moe_nvfp4
        from .triton_norm import triton_add_rms_norm, triton_rms_norm
        from .triton_rope_kv import triton_rope_write_kv
        from .triton_rotary import triton_rotary
        from .triton_router_topk import triton_route_topk
        from .triton_silu_mul import triton_silu_mul

        self.rms_norm = triton_rms_norm
        self.add_rms_norm = triton_add_rms_norm
        self.rotary = triton_rotary
        self.write_kv = triton_write_kv
        self.rope_write_kv = triton_rope_write_kv  # q/k norm + rotary + KV write, one launch (decode's attention input)
        self.paged_attention = triton_paged_attention
        self.write_latent = triton_write_latent
        self.mla_rope_write_latent = triton_mla_rope_write_latent  # latent norm + rotary + latent write: one launch
        self.mla_attention = triton_mla_attention
        from .triton_dsa_keys import triton_write_fp8_index_keys
        from .triton_dsa_topk import triton_dsa_topk
        from .triton_mla_sparse import triton_sparse_mla_attention

        self.dsa_topk = triton_dsa_topk  # the indexer's scores and top-k per query: two launches (three when split)
        self.write_fp8_index_keys = triton_write_fp8_index_keys  # quantize + scatter: one launch
        self.sparse_mla_attention = triton_sparse_mla_attention  # MLA over the selected rows only
        from .triton_dsv4 import triton_dsv4_compress, triton_dsv4_grouped_linear, triton_dsv4_sink_attention
        from .triton_dsv4_hc import triton_dsv4_hc_expand
        from .triton_dsv4_topk import triton_dsv4_indexer_topk

        self.dsv4_compress = triton_dsv4_compress  # a step's closed windows pooled: one launch
        self.dsv4_indexer_topk = triton_dsv4_indexer_topk  # scores, then DSA's top-k kernels: two (three split)
        self.dsv4_sink_attention = triton_dsv4_sink_attention  # window + entries + sink, online softmax
        self.dsv4_grouped_linear = triton_dsv4_grouped_linear
        self.dsv4_hc_expand = triton_dsv4_hc_expand  # the mix and the residual add: one pass over the streams
        from .triton_dsv4_paged import triton_dsv4_paged_indexer_topk, triton_dsv4_paged_sink_attention

        self.dsv4_paged_indexer_topk = triton_dsv4_paged_indexer_topk  # keys read through the block table
        self.dsv4_paged_sink_attention = triton_dsv4_paged_sink_attention  # ring + paged entries: one (split: two)
        self.route_topk = triton_route_topk  # scores, top-k, padding mask, expert-load count: one launch
        self.silu_mul = triton_silu_mul  # dense MLPs' and shared experts' SiLU(gate)·up: one launch
        self.fused_moe = triton_fused_moe  # takes the reference's b13_EF / b2_ED / activation keywords too
        self.fused_moe_mxfp4 = triton_fused_moe_mxfp4
        self.fused_moe_nvfp4 = triton_fused_moe_nvfp4  # W4A16: dequantizing K loops (kernels/nvfp4.py)
        # W4A16 INT4 (kernels/int4.py): decode GEMVs, dequantizing K loops, and for prefill-sized batches the experts
        # dequantized once into this rank's one workspace (every layer reuses it), then the bf16 GEMMs
        self.int4_workspace = DequantWorkspace()
        self.fused_moe_int4 = functools.partial(triton_fused_moe_int4, workspace=self.int4_workspace)
        # FP8 block-scaled W8A8 (kernels/fp8.py is the contract): same signatures as the references.
        from .triton_fp8 import triton_fp8_linear
        from .triton_moe_fp8 import triton_fused_moe_fp8

        self.fp8_linear = triton_fp8_linear
        self.fused_moe_fp8 = triton_fused_moe_fp8
        # Gated DeltaNet: states fp32 in slot-indexed pools, activations bf16 / fp16 / fp32 (kernels/gated_delta.py).
        from .fla_gated_delta import FlaGatedDeltaRule, fla_available
        from .triton_causal_conv1d import triton_causal_conv1d, triton_causal_conv1d_update, triton_replay_conv_state
        from .triton_gated_delta import (triton_commit_states, triton_gated_delta_rule,
                                         triton_gated_delta_rule_decode, triton_gdn_gating,
                                         triton_replay_gated_delta_state)

        self.causal_conv1d = triton_causal_conv1d
        self.causal_conv1d_update = triton_causal_conv1d_update
        self.gdn_gating = triton_gdn_gating
        # Prefill: fla's chunked kernels where fla-core is installed (the `gpu` extra; CUDA only), else the recurrence.
        self.gated_delta_rule = (FlaGatedDeltaRule(fallback_fn=triton_gated_delta_rule) if fla_available()
                                 else triton_gated_delta_rule)
        self.gated_delta_rule_decode = triton_gated_delta_rule_decode  # decode, verify (intermediate states)
        self.commit_states = triton_commit_states  # verify's kept states -> slots
        self.replay_gated_delta_state = triton_replay_gated_delta_state  # or: no buffers, accepted tokens re-run
        self.replay_conv_state = triton_replay_conv_state


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_BACKENDS = {"reference": ReferenceKernels, "triton": TritonKernels}


def select_kernels(device: torch.device, name: str = "auto") -> Kernels:
    """Pick the kernel backend: `auto` is Triton on CUDA, references elsewhere; a name forces one (tests)."""
    device = torch.device(device)
    if name == "auto":
        name = "triton" if device.type == "cuda" and _triton_available() else "reference"
    if name not in _BACKENDS:
        raise ValueError(f"kernels={name!r} is invalid: choose from {sorted(_BACKENDS)} or 'auto'.")
    if name == "triton" and not _triton_available():
        raise ValueError("kernels='triton' is not available: the triton package is not installed (use 'reference').")
    return _BACKENDS[name]()


__all__ = ["AttentionMetadata", "Kernels", "REFERENCES", "ReferenceKernels", "TritonKernels", "select_kernels"]
