"""Which decode and verify CUDA graphs a model runner captures (engine/rank/cuda_graph.py builds and replays them):
the rules that keep graphs off where a captured step would be wrong, each logged with its reason.

Kernels a graph may capture (`CAPTURABLE_KERNELS`): those that read every per-step length from device tensors.
- "triton": the normal backend (cuda_graph.py's module docstring).
- "batch_invariant_triton": batch-invariant mode on a GPU (kernels/batch_invariant_triton.py), for the models whose
  whole decode step runs on its Triton ops (`invariant_graphs_refusal`): GQA attention in every layer (its
  invariant attention sizes its split grid by the metadata's host max_seq_len, which DecodeGraphs sets to the
  engine's max_model_len for this backend: `bound_host_lengths`), float weights, one rank (no EP, no TP). Its other ops (MLA, DSA,
  the delta rule, the quantized references) are plain-torch invariant forms that loop over host lengths.
The plain-torch backends ("reference", "batch_invariant") read the host lists themselves: never captured.
"""
from __future__ import annotations

import logging

import torch

from moelink.kernels.attention import FP8_CACHE_DTYPES

logger = logging.getLogger(__name__)

# Kernel backends whose captured step reads no host length (module docstring).
CAPTURABLE_KERNELS = ("triton", "batch_invariant_triton")


def bound_host_lengths(kernels) -> bool:
    """Whether a decode graph of `kernels` is captured with its host lengths at their bound (max_model_len), as
    verify graphs are: the batch-invariant Triton attention sizes its grid of key splits (and their partials) by
    the metadata's max_seq_len; a replay's rows past their own splits return at once
    (kernels/triton_invariant_attention.py)."""
    return getattr(kernels, "name", None) == "batch_invariant_triton"


def invariant_graphs_refusal(cfg, ep, quantized: bool = False, tp_size: int = 1) -> str | None:
    """Why decode graphs stay off for the batch-invariant Triton backend with this model (None: they are captured).
    Its Triton ops cover the GQA decoder and its float routed experts at one rank; every other op of the mode is a
    plain-torch invariant form (kernels/batch_invariant_kernels.py) that reads host lengths or loops on the host."""
    if ep is not None:
        return ("the batch-invariant mode's expert-parallel combine (a token's rows summed in rank order) is not "
                "captured: batch-invariant EP steps run eagerly")
    if tp_size > 1:
        return ("the batch-invariant mode's tensor-parallel sums (an all-gather, then the partials added in rank "
                "order) are not checked in a captured step: batch-invariant TP steps run eagerly")
    if quantized:
        return ("the batch-invariant Triton backend runs quantized weights on the plain-torch references (host "
                "syncs); only float weights are captured")
    if cfg is None:
        return None
    layers = [cfg.attention_for(i) for i in range(cfg.num_layers)] if cfg.layer_attention else [cfg.attention]
    kinds = sorted({getattr(a, "kind", "?") for a in layers} - {"gqa"})
    if kinds:
        return (f"the batch-invariant Triton backend has Triton kernels for GQA attention only; {', '.join(kinds)} "
                "attention runs its plain-torch invariant form, which reads host-side lengths")
    if cfg.state_layers:
        return ("the batch-invariant per-sequence state ops (the delta rule's recurrence) are plain torch and read "
                "host-side lengths")
    return None


def graph_sizes_to_capture(sizes: tuple[int, ...], kernels, ep, two_batch_overlap: bool, backend,
                           device: torch.device, quantized: bool, log: logging.Logger = logger,
                           cfg=None, tp_size: int = 1) -> tuple[int, ...]:
    """The decode batch sizes a runner captures of the `sizes` asked: none when its kernels, step plan,
    all-to-all, device or quantization rule graphs out (logged on `log`, with why); under EP only those within
    the low-latency decode capacity. `cfg` (the model's config, engine/config/model.py) and `tp_size` (the rank's
    tensor-parallel group size): what the batch-invariant Triton backend's rule reads (`invariant_graphs_refusal`)."""
    if not sizes:
        return ()
    why_not = None
    if kernels.name not in CAPTURABLE_KERNELS:
        why_not = f"the {kernels.name} kernels read host-side lengths, which a graph would freeze"
    elif kernels.name == "batch_invariant_triton" and (why := invariant_graphs_refusal(cfg, ep, quantized, tp_size)):
        why_not = why
    elif cfg is not None and (a := next((a for a in (cfg.attention, *getattr(cfg, "layer_attention", ()))
                                         if not getattr(a, "graphable", True)), None)) is not None:
        why_not = (f"{a.kind} attention runs each sequence from host-side lengths (no batched decode "
                   "path yet), which a graph would freeze")
    elif ep is not None and two_batch_overlap:
        why_not = ("two-batch overlap runs every step as two micro-batches (two dispatches per MoE layer) and a "
                   "decode graph captures one: all ranks must make the same collective calls")
    elif ep is not None and ep.all_to_all.low_latency is None:
        why_not = (f"the {ep.all_to_all.name} all-to-all sizes its buffers from counts on the host; decode graphs "
                   "under expert parallelism need a fixed-capacity backend's low-latency mode (nccl)")
    elif ep is not None and backend is None and ep.all_to_all.name != "nccl":
        # A capture that fails on one rank mid-collective would leave its peers waiting: only the transport
        # captured in tests (direct NCCL) is captured under EP (the CPU stand-in replays any).
        why_not = f"under expert parallelism only the nccl all-to-all is captured, not {ep.all_to_all.name}"
    elif backend is None and device.type != "cuda":
        why_not = f"device {device} is not a CUDA device"
    elif quantized and not all(hasattr(kernels, op) for op in ("fp8_linear", "fused_moe_fp8")):
        # Until its Triton kernels exist, FP8 runs the references, whose MoE loops over experts on the host.
        why_not = f"the {kernels.name} kernels have no FP8 GEMMs yet (the references run, with host syncs)"
    if why_not:
        log.info("CUDA graphs off: %s.", why_not)
        return ()
    if ep is not None:
        # A graph replays the low-latency dispatch, whose blocks hold at most the decode capacity.
        cap = ep.all_to_all.decode_capacity
        if any(s > cap for s in sizes):
            log.info("decode graphs above the EP decode capacity %d dropped (those steps run eagerly).", cap)
        sizes = tuple(s for s in sizes if s <= cap)
    return tuple(sizes)


def verify_graph_len(cfg, num_speculative_tokens: int, block_size: int, log: logging.Logger = logger) -> int:
    """Query tokens per row of the verify graphs a runner captures beside its decode graphs (1 + k), or 1 for
    none (logged, with why): no speculation, an fp8 MLA cache (its multi-token path widens with host lengths), or
    1 + k past a block (a padding row must read only its first, null, table column). Under expert parallelism
    the sizes are those whose b x (1 + k) tokens fit the low-latency capacity (`verify_sizes`)."""
    k = num_speculative_tokens
    if k < 1:
        return 1
    why_not = None
    if cfg.attention.kind == "mla" and cfg.cache_dtype in FP8_CACHE_DTYPES:
        why_not = "an fp8 MLA cache widens a multi-token step's context with host lengths"
    elif 1 + k > block_size:
        why_not = f"1 + k = {1 + k} tokens per row exceed a KV block ({block_size})"
    if why_not:
        log.info("verify graphs off: %s.", why_not)
        return 1
    return 1 + k


def verify_sizes(sizes: tuple[int, ...], verify_len: int, ep, log: logging.Logger = logger) -> tuple[int, ...]:
    """The decode sizes b whose verify graph (b x verify_len tokens) a runner captures: all of them on one rank;
    under expert parallelism those within the low-latency capacity (a graph replays that mode's dispatch)."""
    if verify_len < 2:
        return ()
    if ep is None:
        return tuple(sizes)
    cap = ep.all_to_all.decode_capacity
    kept = tuple(b for b in sizes if b * verify_len <= cap)
    if len(kept) < len(sizes):
        log.info("verify graphs above the EP decode capacity %d tokens dropped (those steps run eagerly).", cap)
    return kept


__all__ = ["CAPTURABLE_KERNELS", "bound_host_lengths", "graph_sizes_to_capture", "invariant_graphs_refusal",
           "verify_graph_len", "verify_sizes"]
