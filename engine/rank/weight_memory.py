"""What a rank's weights take, per storage format, and the start-up log line that reports it with the KV
cache beside it. Counted with planner.weight_bytes, the function `moelink plan` prices weights with, so the
plan and the running engine agree byte for byte on the formats they share."""
from __future__ import annotations

from torch import nn

from moelink.kernels.fp8 import FP8_DTYPE
from moelink.planner.weight_bytes import weight_bytes

from ..models.linear import Linear


def weight_bytes_by_format(model: nn.Module) -> dict[str, int]:
    """{format: bytes} of every weight `model` holds: "fp8" (values + block scales: dense linears and experts
    in FP8), "mxfp4" (packed values + E8M0 scales: gpt-oss's experts), "nvfp4" (packed values + e4m3 scales:
    ModelOpt's experts; their per-expert float32 global and input scales count as float), "int4" (int32 words +
    group scales in the model dtype + uint8 zero points when asymmetric: compressed-tensors / GPTQ / AWQ experts)
    and "float" (everything
    else, in its own dtype). Each parameter is counted once (tied embeddings share one)."""
    out: dict[str, int] = {}
    counted: set[int] = set()

    def add(fmt: str, n: int) -> None:
        out[fmt] = out.get(fmt, 0) + n

    for module in model.modules():
        if isinstance(module, Linear):
            w, block = module.weight, getattr(module.method, "block", (1, 1))
            fmt = "fp8" if w.dtype == FP8_DTYPE else "float"
            add(fmt, weight_bytes(fmt, w.shape[0], w.shape[1], block, w.element_size()))
            counted.update(id(p) for p in (w, module.weight_scale_inv) if p is not None)
        elif hasattr(module, "expert_format") and hasattr(module, "w13_blocks_EFSQ"):
            # MXFP4 [E, N, K/32, 16] blocks + [E, N, K/32] scales: [N, K] weights per expert (biases stay float).
            for blocks in (module.w13_blocks_EFSQ, module.w2_blocks_EDSQ):
                e, n, s, q = blocks.shape  # type: ignore[misc]  # a Tensor (nn.Module's __getattr__ says Module too)
                add("mxfp4", e * weight_bytes("mxfp4", n, s * 2 * q))
            counted.update(id(p) for p in (module.w13_blocks_EFSQ, module.w13_scales_EFS, module.w2_blocks_EDSQ,
                                           module.w2_scales_EDS))
        elif hasattr(module, "expert_format") and hasattr(module, "w13_q_EFB"):
            # NVFP4 [E, N, K/2] bytes + [E, N, K/16] e4m3 scales.
            for q in (module.w13_q_EFB, module.w2_q_EDB):
                e, n, b = q.shape  # type: ignore[misc]  # a Tensor (nn.Module's __getattr__ says Module too)
                add("nvfp4", e * weight_bytes("nvfp4", n, 2 * b))
            counted.update(id(p) for p in (module.w13_q_EFB, module.w13_scale_EFS, module.w2_q_EDB, module.w2_scale_EDS))
        elif hasattr(module, "expert_format") and hasattr(module, "w13_q_EFW"):
            # INT4 [E, N, K/8] int32 words + [E, N, K/G] scales (the model dtype) (+ uint8 zero points).
            for q, s, z in ((module.w13_q_EFW, module.w13_s_EFS, module.w13_z_EFS),
                            (module.w2_q_EDW, module.w2_s_EDS, module.w2_z_EDS)):
                e, n, w = q.shape  # type: ignore[misc]  # a Tensor (nn.Module's __getattr__ says Module too)
                add("int4", e * weight_bytes("int4", n, 8 * w, group=8 * w // s.shape[-1],
                                             float_bytes=s.element_size(), zero_points=z is not None))
                counted.update(id(p) for p in (q, s, z) if p is not None)
        elif hasattr(module, "expert_format") and hasattr(module, "w13_EFD"):
            block = getattr(module.expert_format, "block", (1, 1))
            for w in (module.w13_EFD, module.w2_EDI):
                fmt = "fp8" if w.dtype == FP8_DTYPE else "float"
                add(fmt, w.shape[0] * weight_bytes(fmt, w.shape[1], w.shape[2], block, w.element_size()))
            held = (module.w13_EFD, module.w2_EDI, getattr(module, "w13_scale_inv_EFD", None),
                    getattr(module, "w2_scale_inv_EDI", None))
            counted.update(id(p) for p in held if p is not None)
    for p in model.parameters():  # embeddings, lm_head, norms, routers, biases
        if id(p) not in counted:
            counted.add(id(p))
            add("float", p.numel() * p.element_size())
    return out


def describe_memory(by_format: dict[str, int], kv_blocks: int, block_size: int, kv_bytes: int) -> str:
    """One log line: weights per format and the KV cache, in MiB, with its capacity in tokens."""
    mib = 1 << 20
    weights = ", ".join(f"{fmt} {n / mib:.1f} MiB" for fmt, n in sorted(by_format.items()))
    return (f"weights {sum(by_format.values()) / mib:.1f} MiB ({weights}); KV cache {kv_bytes / mib:.1f} MiB = "
            f"{kv_blocks} blocks x {block_size} = {kv_blocks * block_size} tokens")
