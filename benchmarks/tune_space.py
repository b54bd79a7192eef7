"""tune_moe's search space: the values tried per axis, the seeds published for the same shapes, the cheap
pruning rules (shared memory, registers, TMA alignment) and the one-axis-away neighbours of a config.
tune_moe.py re-exports every name here."""
from __future__ import annotations

from dataclasses import replace

GEMM_AXES = ("BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")
UP_AXES = ("FUSED_GATE_UP",)  # the gate-up GEMM's alone (one interleaved tile and one dot: moe_config)
# Each GEMM's tile schedule and loads (kernels/moe_schedule.py): programs per SM of the persistent tile loop (0: off)
# and the TMA tensor-descriptor loads. Shipped configs leave both off; the tuner keeps them only where they measure
# faster.
SCHEDULE_AXES = ("PERSISTENT", "TMA")
# The down GEMM's alone: its TMA K loop warp-specialized (moe_config WARP_SPECIALIZE; the gate-up GEMM and the FP8
# loops ignore the key, so it is not moved there).
DOWN_AXES = ("WARP_SPECIALIZE",)
# Values tried per axis. The search moves one axis at a time from the seed, so the cost is the sum of the
# axes' lengths per sweep (about 2 x 17 + 3 candidates), not their product.
SPACES = {
    "quick": dict(BLOCK_SIZE_M=(16, 32, 64, 128), BLOCK_SIZE_N=(32, 64, 128, 256), BLOCK_SIZE_K=(32, 64, 128, 256),
                  GROUP_SIZE_M=(1, 8, 16, 32), num_warps=(4, 8), num_stages=(2, 3, 4, 5), FUSED_GATE_UP=(False, True),
                  PERSISTENT=(0, 1, 2), TMA=(False, True), WARP_SPECIALIZE=(False, True), passes=1),
    "full": dict(BLOCK_SIZE_M=(16, 32, 64, 128, 256), BLOCK_SIZE_N=(16, 32, 64, 128, 256),
                 BLOCK_SIZE_K=(32, 64, 128, 256), GROUP_SIZE_M=(1, 4, 8, 16, 32, 64), num_warps=(2, 4, 8),
                 num_stages=(2, 3, 4, 5, 6), FUSED_GATE_UP=(False, True), PERSISTENT=(0, 1, 2, 4),
                 TMA=(False, True), WARP_SPECIALIZE=(False, True), passes=3),
    # CPU interpreter: one axis per GEMM (an empty axis is never moved), one confirmation round; blocks no
    # smaller than interpreter.json's, as the interpreter's cost grows with the number of programs.
    # (The schedule axes stay empty here: each candidate is ~1 s interpreted and gpu_session's smoke tune step has
    # 180 s on a shared 2-core machine; tests/kernels/test_moe_schedule.py runs both keys in the interpreter.)
    "smoke": dict(BLOCK_SIZE_M=(16,), BLOCK_SIZE_N=(32, 64), BLOCK_SIZE_K=(), GROUP_SIZE_M=(), num_warps=(),
                  num_stages=(), PERSISTENT=(), TMA=(), WARP_SPECIALIZE=(), passes=1, confirm_rounds=1),
}
# The tiny-batch path (kernels/triton_moe_tiny.py) as an axis: tried in buckets of at most this many pairs; a
# bucket that keeps it turns it on for pair counts up to its own T*K (tune 1,2,4,8 to cover decode sizes).
TINY_TUNE_MAX_PAIRS = 64
# The float GEMVs' rows a program, columns a tile and warps (kernels/triton_moe_tiny.py, DEFAULT_TINY_FLOAT in the
# middle of each axis: up 2 x 1024 at 4 warps, down 2 x 256 at 1).
TINY_AXES = {"quick": dict(up_BLOCK_SIZE_N=(1, 2, 4), up_BLOCK_SIZE_K=(512, 1024, 2048), up_num_warps=(2, 4, 8),
                           down_BLOCK_SIZE_N=(1, 2, 4), down_BLOCK_SIZE_K=(256, 512, 1024), down_num_warps=(1, 2, 4)),
             "smoke": dict(up_BLOCK_SIZE_N=(1, 4))}
TINY_AXES["full"] = TINY_AXES["quick"]
# The CPU smoke's tiny start (tune_moe --cpu-smoke): 8 rows a program at 256 columns (the widest tiny_feasible passes
# at 2-byte weights and one warp), not DEFAULT_TINY_FLOAT's 2: the interpreter's cost is its programs (the start's
# ~1,500 GEMV programs at 12 tokens were two thirds of the smoke's CPU); BLOCK_K is clamped to the smoke's
# dimensions either way, so the same kernels and K walk run.
SMOKE_TINY_FLOAT = dict(max_pairs=64, BLOCK_SIZE_N=8, BLOCK_SIZE_K=256, num_warps=1, num_stages=1)
SMEM_LIMIT = 200 * 1024  # of sm_90's 227 KB per block: headroom for the epilogue and barriers
MAX_ACC_REGS = 128  # fp32 accumulator registers per thread above which the GEMM spills (255 in all)
# The tiny path's GEMVs hold their tiles in registers: the gate-up GEMV two fp32 [BN, BK] accumulators, the down
# GEMV one, beside the unrolled tiles' loads in flight (compile_report_tiny_sm90: 2 x [2, 1024] at 4 warps, 56
# registers; [2, 256] at one warp, 112-122); values per thread above these leave the loads no registers.
MAX_TINY_UP_VALUES, MAX_TINY_DOWN_VALUES = 128, 64
# A float GEMV's tile needs BLOCK_K >= 16 bytes x 32 lanes x warps of columns: its warps then lie along K, and the
# activation row ([1, BLOCK_K]) has the weight tile's own layout; narrower, the warps go along N and every tile
# pays a shared-memory layout conversion with two barriers (compile report: 15 BAR at [4, 512] / 4 warps, 7 at
# [4, 1024]).
TINY_LANE_BYTES = 16 * 32

# Published tuned configs, as data: vLLM's fused_moe tuned configs for NVIDIA_H100_80GB_HBM3, bf16
# (vllm/model_executor/layers/fused_moe/configs/, read 2026-11-22), token bucket ->
# (BLOCK_SIZE_M, BLOCK_SIZE_N, BLOCK_SIZE_K, GROUP_SIZE_M, num_warps, num_stages); the buckets near TOKENS.
# - "vllm E=128,N=768": Qwen3-30B-A3B's expert shape at TP 1 (this repository's qwen3-30b-a3b exactly).
# - "vllm E=8,N=7168": Mixtral-8x7B at TP 2 (intermediate 7168): the nearest published bf16 H100 config for 8
#   experts of hidden 4096 (vLLM publishes E=8,N=14336 for H100 in fp8 only).
# No bf16 H100 config is published for DeepSeek-V3's E=256, I=2048: it is seeded from default.json and its
# current tuned file.
PUBLISHED = {
    "vllm E=128,N=768": dict(E=128, I=768, D=2048, configs={
        1: (16, 32, 64, 1, 4, 4), 16: (16, 32, 256, 64, 4, 2), 64: (16, 256, 128, 1, 8, 3),
        256: (32, 256, 128, 1, 8, 3), 1024: (64, 256, 64, 1, 8, 5), 4096: (128, 256, 64, 1, 8, 4)}),
    "vllm E=8,N=7168": dict(E=8, I=14336, D=4096, configs={
        1: (16, 64, 128, 64, 4, 4), 16: (16, 128, 128, 1, 4, 4), 64: (32, 128, 128, 1, 4, 4),
        256: (64, 128, 128, 64, 4, 4), 1024: (128, 256, 64, 16, 8, 4), 4096: (128, 256, 64, 16, 8, 4)}),
}



def from_vllm(bm, bn, bk, group, warps, stages):
    """vLLM's one config for both GEMMs -> this kernel's. vLLM's first GEMM computes the [M, 2I] gate|up
    product with BLOCK_N columns per program; ours keeps gate and up accumulators of BLOCK_N each (2*BLOCK_N
    columns), so the same tile width is BLOCK_N/2 here. The down GEMM is the same GEMM as vLLM's."""
    from moelink.kernels.moe_config import GemmConfig, MoELaunchConfig

    return MoELaunchConfig(bm, GemmConfig(max(16, bn // 2), bk, group, warps, stages), GemmConfig(bn, bk, group, warps, stages))


def published_seeds(E: int, I: int, D: int, tokens: int | None = None, all_buckets: bool = False):
    """[(bucket, MoELaunchConfig, source)] published for this expert shape: the bucket nearest `tokens`, or all of them."""
    out = []
    for src, p in PUBLISHED.items():
        if (p["E"], p["I"], p["D"]) != (E, I, D):
            continue
        buckets = sorted(p["configs"])
        if not all_buckets:
            buckets = [min(buckets, key=lambda b: (abs(b - tokens), b))]
        out += [(b, from_vllm(*p["configs"][b]), src) for b in buckets]
    return out


# -- pruning -----------------------------------------------------------------------------------------------------------
def tiny_feasible(tiny, elem: int, warps_along_k: bool = True) -> str | None:
    """Why the float tiny GEMVs' blocks cannot be good (None: try them): accumulators past the register rule, or a
    tile too narrow for its warps to lie along K (`warps_along_k` False: for one warp's lanes, the FP8 GEMVs' rule:
    their [BN, groups, group] tiles put the other warps along groups and rows with no layout conversion,
    compile_report_tiny: 5 barriers at 2 x 1024 on 4 warps, the epilogue's)."""
    up, down = tiny.up, tiny.down
    for part, g, acc in (("up", up, 2), ("down", down, 1)):
        vals = acc * g.BLOCK_SIZE_N * g.BLOCK_SIZE_K // (32 * g.num_warps)
        limit = MAX_TINY_UP_VALUES if part == "up" else MAX_TINY_DOWN_VALUES
        if vals > limit:
            return f"tiny {part}: {vals} fp32 accumulator values per thread > {limit}"
        lanes = TINY_LANE_BYTES // elem * (g.num_warps if warps_along_k else 1)
        if g.BLOCK_SIZE_K < lanes:
            return (f"tiny {part}: BLOCK_SIZE_K {g.BLOCK_SIZE_K} < {lanes} columns ({g.num_warps} warps of 16-byte "
                    "lanes): the warps would lie along N and every tile convert the activation row")
    return None


def feasible(cfg, D: int, I: int, elem: int = 2, top_k: int = 1) -> str | None:
    """Why `cfg` cannot be a good config for this shape (None: try it). Cheap, before any compile."""
    if cfg.tiny is not None:
        why = tiny_feasible(cfg.tiny, elem)
        if why:
            return why
    for part, g, n, k in (("up", cfg.up, I, D), ("down", cfg.down, D, I)):
        why = gemm_fits(part, g, cfg.BLOCK_SIZE_M, n, k, elem)
        if why:
            return why
    return None


def gemm_fits(part: str, g, bm: int, n: int, k: int, elem: int = 2, max_acc: int = MAX_ACC_REGS,
              buffers=lambda stages: max(1, stages - 1), min_bn: int = 16) -> str | None:
    """Why one GEMM of `feasible`'s rules cannot fit (None: it can): `part` "up" keeps two accumulators; `buffers`
    maps num_stages to the pipelined tiles in shared memory, `max_acc` caps the fp32 accumulator values per thread,
    `min_bn` is the narrowest BLOCK_N the wrapper launches (a block that wide is never "wider than the GEMM")."""
    cols = 2 * g.BLOCK_SIZE_N if part == "up" else g.BLOCK_SIZE_N  # the up GEMM keeps two accumulators
    smem = buffers(g.num_stages) * (bm * g.BLOCK_SIZE_K + cols * g.BLOCK_SIZE_K) * elem
    if smem > SMEM_LIMIT:
        return f"{part}: {smem // 1024} KB of pipelined shared memory > {SMEM_LIMIT // 1024} KB"
    acc = bm * cols // (32 * g.num_warps)
    if acc > max_acc:
        return f"{part}: {acc} fp32 accumulator registers per thread > {max_acc}"
    if g.BLOCK_SIZE_N > max(min_bn, 1 << (n - 1).bit_length()) or g.BLOCK_SIZE_K > max(16, 1 << (k - 1).bit_length()):
        return f"{part}: block {g.BLOCK_SIZE_N}x{g.BLOCK_SIZE_K} wider than the {n}x{k} GEMM"
    if g.TMA and (k * elem) % 16:  # (the wrapper would fall back to pointers: the same kernel timed twice)
        return f"{part}: TMA needs 16-byte rows, the {k}-wide operand rows are {k * elem} bytes"
    if g.WARP_SPECIALIZE and not g.TMA:  # (moe_config refuses it: the producer warp group issues TMA loads)
        return f"{part}: WARP_SPECIALIZE needs TMA"
    return None


def block_m_candidates(tokens: int, top_k: int, num_experts: int, space=None) -> list[int]:
    """M blocks worth trying: up to ~2x the average rows per expert (more is padding), at least the smallest."""
    values = (space or SPACES["quick"])["BLOCK_SIZE_M"]
    rows = tokens * top_k / num_experts
    return [bm for bm in values if bm <= max(values[0], 2 * rows)]


def tiny_neighbours(cfg, pairs: int, tiny_axes: dict, start=None):
    """The tiny path's axis: off -> on (`start`'s blocks, DEFAULT_TINY_FLOAT's by default, max_pairs = `pairs`); on
    -> off, and each GEMV block / warp count of tiny_axes moved one at a time."""
    from moelink.kernels.moe_config import DEFAULT_TINY_FLOAT

    if pairs > TINY_TUNE_MAX_PAIRS:
        return
    if cfg.tiny is None:
        yield replace(cfg, tiny=replace(start or DEFAULT_TINY_FLOAT, max_pairs=pairs))
        return
    yield replace(cfg, tiny=None)
    for key, values in tiny_axes.items():
        part, axis = key.split("_", 1)
        g = getattr(cfg.tiny, part)
        for v in values:
            if v != getattr(g, axis):
                yield replace(cfg, tiny=replace(cfg.tiny, **{part: replace(g, **{axis: v})}))


def neighbours(cfg, space, bms, pairs: int = 0, tiny_axes: dict | None = None, tiny_start=None):
    """Every config one axis away from cfg (BLOCK_SIZE_M among `bms`, each GEMM axis among the space's values,
    the tiny path's when the bucket has at most TINY_TUNE_MAX_PAIRS pairs, turned on with `tiny_start`'s blocks)."""
    if tiny_axes is not None and pairs:
        yield from tiny_neighbours(cfg, pairs, tiny_axes, tiny_start)
        if cfg.uses_tiny(pairs):  # the sorted path's blocks do not run in this bucket: moving them measures nothing
            return
    for bm in bms:
        if bm != cfg.BLOCK_SIZE_M:
            yield replace(cfg, BLOCK_SIZE_M=bm)
    for part in ("up", "down"):
        g = getattr(cfg, part)
        for axis in GEMM_AXES + SCHEDULE_AXES + (UP_AXES if part == "up" else DOWN_AXES):
            for v in space.get(axis, ()):
                if v != getattr(g, axis):
                    yield replace(cfg, **{part: replace(g, **{axis: v})})
