"""The FP8 block-scaled fused MoE for tune_moe (`tune_moe --dtype fp8`): what differs from the bf16 tuning.

    python -m moelink.benchmarks.tune_moe --dtype fp8 [--shapes deepseek-v3,qwen3-30b-a3b] [--tokens 4096,16384]
        [--budget-s 400] [--out-dir DIR] [--merge-from DIR] [--cpu-smoke]

tune_moe's search, budget per bucket, confirmation and merge run unchanged with this module's `Fp8Kind`:
- Inputs: bf16 expert weights drawn as moe_kernels draws them, block-quantized 128 x 128 as moe_kernels_fp8
  quantizes them (the published layout of DeepSeek-V3 and Qwen3-FP8), once per shape; x in bf16, quantized per
  token group by the kernel (W8A8).
- Seeds: the FP8 config moelink uses now for the bucket (a tuned fp8 file's, else fp8_moe_default.json's),
  fp8_moe_default.json's, and the bf16 tuned config of the same shape where there is one, each as the FP8 wrapper
  launches it (triton_moe_fp8.fp8_launch_config; the bf16 one with warps raised, then BLOCK_M halved, until it fits
  the FP8 register rule).
- Candidates: the bf16 space's axes (BLOCK_SIZE_M, each GEMM's blocks, GROUP_M, warps, stages, PERSISTENT and
  TMA, which the FP8 kernels take as the bf16 ones do). The wrapper caps BLOCK_K at the weight's Bk (128) and
  raises the gate-up BLOCK_N to a multiple of it, and has no fused gate-up tile: a candidate is
  mapped to what launches, and one that launches the same as a config already timed is not timed again
  ("same_launch" in the record). Pruned before compiling (`feasible_fp8`): pipelined tiles of 1-byte operands
  (num_stages of them at BLOCK_M >= 64, where sm_90 takes wgmma: the compile report's 200 KB for a 64x256x128
  gate-up tile at 5 stages; num_stages - 1 below, on mma.sync), and the fp32 accumulator values per thread that
  compile without spills (FP8_MAX_ACC, FP8_MAX_ACC_MMA_SYNC). The tiny path is an axis as in the bf16 search
  (buckets of at most TINY_TUNE_MAX_PAIRS pairs: `--tokens 1,2,4,8`), turned on at DEFAULT_TINY_FP8's blocks and
  pruned by tune_space.tiny_feasible at 1-byte weights.
- Correctness: against fp8.reference_fused_moe_fp8 in float32 (a per-expert loop on the dequantized weights that
  quantizes the activations as the kernel does, x per token per 128 channels and SiLU(gate)*up per row per 128),
  within FP8_TOL.
- Record: `fp8_w8a8,E={E},N={I},device_name={GPU}.json` (get_fp8_moe_config reads it first), each bucket's seed,
  seed and tuned ms, and bf16_ms: the bf16 fused MoE with the bf16 config moelink uses now, timed first in the
  bucket on the same inputs; a `RATIO` line prints fp8 / bf16 per bucket. A new file also holds every TOKENS
  bucket this run does not tune, at the config used until now: a tuned file replaces fp8_moe_default.json at
  every token count, so a run of 4096,16384 alone must not give decode batches a 4096-token config.
`--cpu-smoke --dtype fp8`: FP8_SMOKE_SHAPES in the interpreter (128 x 128 blocks, D of two groups) over
FP8_SMOKE_SPACE (the tiny path turned on at FP8_SMOKE_TINY, wider GEMVs than a GPU starts at: fewer interpreted
programs), into a temporary directory.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from .moe_kernels import SHAPES, make_inputs, make_weights
from .tune_space import SPACES, gemm_fits, tiny_feasible
from .tune_timing import time_call, time_config

# The FP8 kernels hold a fresh fp32 dot tile per K step and its scaled product beside the accumulators, so fewer
# accumulator values per thread fit than bf16's MAX_ACC_REGS (128). sm_90 compile reports (Triton 3.6, 2026-11-24):
# BLOCK_M >= 64 (wgmma): 64 values 230-246 registers, no spill (gate-up 64x128 at 8 warps, down 64x128 at 4 and
# 64x256 / 128x128 at 8); 128 values spill 92-800 stores (gate-up 64x128 at 4 warps, 64x256 and 128x128 at 8).
# BLOCK_M < 64 (mma.sync, more registers per value): 32 values 178-218 registers, no spill; 64 values spill (down
# 32x256 at 4 warps: 144 stores; gate-up 32x256 at 8: 28).
FP8_MAX_ACC, FP8_MAX_ACC_MMA_SYNC = 64, 32
# The reference quantizes the activations with the kernel's groups: what is left is accumulation order and the
# FP8 rounding flips it causes (moe_kernels_fp8 checks the same kernels against it at 1e-2); a wrong scale group
# or tile is off by far more.
FP8_TOL = 2e-2
FP8_SHAPES = ("deepseek-v3", "qwen3-30b-a3b")  # the published FP8 MoE checkpoints (moe_kernels_fp8)
# (E, K, D, I): D of two 128-channel groups; I = 192 is not a multiple of the block (gate and up rows in different
# scale blocks, the last h group part-filled).
FP8_SMOKE_SHAPES = {"smoke-fp8-e8": (8, 2, 256, 128), "smoke-fp8-e16": (16, 4, 128, 192)}
# Interpreter: the block axes only; up BLOCK_N 64 maps to the seed's 128 (a same-launch skip), BLOCK_K 64 is two
# K steps per scale group.
FP8_SMOKE_SPACE = dict(SPACES["smoke"], BLOCK_SIZE_N=(64, 128), BLOCK_SIZE_K=(64,))
# The smoke's tiny start: DEFAULT_TINY_FP8's GEMVs are 2 (gate-up) and 1 (down) rows a program, so the interpreter
# ran ~200 programs a launch over the smoke shapes (two thirds of the smoke's CPU). 16 rows a program (the widest
# tiny_feasible passes at 512 columns; BLOCK_K is clamped to the smoke's dimensions either way): the same kernels
# and K walk, 8-16x fewer programs, still timed (and still slower there than the sorted path it is compared with).
FP8_SMOKE_TINY = dict(max_pairs=64, BLOCK_SIZE_N=16, BLOCK_SIZE_K=512, num_warps=4, num_stages=1)


def launched(cfg, block=(128, 128)):
    from moelink.kernels.triton_moe_fp8 import fp8_launch_config

    return fp8_launch_config(cfg, block[1])


def feasible_fp8(cfg, D: int, I: int, block=(128, 128)) -> str | None:
    """Why `cfg`, as the FP8 wrapper launches it, cannot fit (None: try it): tune_space.feasible's rules for
    1-byte operands with the FP8 kernels' pipeline buffers and accumulator limits (module docstring); the gate-up
    BLOCK_N the wrapper forces (Bk) never counts as wider than the GEMM."""
    cfg = launched(cfg, block)
    if cfg.tiny is not None:  # (the e4m3 GEMVs: the float GEMVs' register and lane rules at 1-byte weights)
        why = tiny_feasible(cfg.tiny, 1, warps_along_k=False)
        if why:
            return why
    wgmma = cfg.BLOCK_SIZE_M >= 64
    buffers = (lambda stages: stages) if wgmma else (lambda stages: max(1, stages - 1))
    for part, g, n, k in (("up", cfg.up, I, D), ("down", cfg.down, D, I)):
        why = gemm_fits(part, g, cfg.BLOCK_SIZE_M, n, k, 1, FP8_MAX_ACC if wgmma else FP8_MAX_ACC_MMA_SYNC, buffers,
                        block[1] if part == "up" else 16)
        if why:
            return why
    return None


def _over(cfg, part: str) -> bool:
    """Whether a GEMM of `cfg` holds more fp32 accumulator values per thread than the FP8 kernels compile unspilled."""
    g = getattr(cfg, part)
    limit = FP8_MAX_ACC if cfg.BLOCK_SIZE_M >= 64 else FP8_MAX_ACC_MMA_SYNC
    return cfg.BLOCK_SIZE_M * (2 if part == "up" else 1) * g.BLOCK_SIZE_N // (32 * g.num_warps) > limit


def adapt_bf16(cfg, block=(128, 128)):
    """A bf16 config as an FP8 seed: as launched, each GEMM's warps doubled (up to 8) while its accumulators break the
    FP8 limit, then BLOCK_M halved while one still does (bf16's 128-row tiles spill here: 800 spill stores for the
    gate-up 128x128 at 8 warps); the blocks and the rest stay what the bf16 search found."""
    cfg = replace(launched(cfg, block), tiny=None)  # (a bf16 TINY entry's blocks are the float GEMVs')
    for part in ("up", "down"):
        while _over(cfg, part) and getattr(cfg, part).num_warps < 8:
            g = getattr(cfg, part)
            cfg = replace(cfg, **{part: replace(g, num_warps=g.num_warps * 2)})
    while (_over(cfg, "up") or _over(cfg, "down")) and cfg.BLOCK_SIZE_M > 16:
        cfg = replace(cfg, BLOCK_SIZE_M=cfg.BLOCK_SIZE_M // 2)
    return cfg


def fp8_seeds(shape, T, device, block=(128, 128), bf16_dir=None):
    """[(label, config as launched)], duplicates removed, in order: current, fp8_moe_default.json, bf16 tuned."""
    from moelink.kernels.moe_config import (CONFIG_DIR, _pick, committed_config, config_file_name, device_name,
                                            load_config_file)
    from moelink.kernels.triton_moe_fp8 import get_fp8_moe_config

    E, K, D, I = shape
    out = [("current", get_fp8_moe_config(E, I, T, K, device)),
           ("fp8_moe_default.json", _pick(*committed_config("fp8_moe_default.json"), T, K, E))]
    name = config_file_name(E, I, device_name(device))
    found = load_config_file(str((bf16_dir or CONFIG_DIR) / name))
    if found:
        out.append((f"bf16 {name}", adapt_bf16(_pick(*found, T, K, E), block)))
    seen, uniq = set(), []
    for label, cfg in out:
        cfg = launched(cfg, block)
        if cfg not in seen:
            seen.add(cfg)
            uniq.append((label, cfg))
    return uniq


def time_config_fp8(cfg, sets, timer, iters, want=None) -> float:
    """tune_moe.time_config for the FP8 fused MoE: sets of (x, w13q, w13s, w2q, w2s, topk weights, topk ids)."""
    from moelink.kernels.triton_moe_fp8 import triton_fused_moe_fp8

    fn = lambda x, w13q, w13s, w2q, w2s, tw, ti: triton_fused_moe_fp8(  # noqa: E731
        x, w13q, w13s, w2q, w2s, tw, ti, config=cfg)
    return time_call(fn, cfg, sets, timer, iters, want, FP8_TOL)


class Fp8Kind:
    """tune_moe.Bf16Kind's interface for the FP8 block-scaled fused MoE (module docstring)."""

    tiny = True  # the FP8 tiny GEMVs (kernels/triton_moe_fp8_tiny.py) are an axis, turned on at DEFAULT_TINY_FP8

    @property
    def tiny_start(self):
        from moelink.kernels.moe_config import TinyConfig
        from moelink.kernels.triton_moe_fp8_tiny import DEFAULT_TINY_FP8

        return TinyConfig.from_dict(FP8_SMOKE_TINY) if self.smoke else DEFAULT_TINY_FP8

    def __init__(self, block=(128, 128), bf16_dir=None, smoke=False):
        self.block, self.bf16_dir, self.smoke = block, bf16_dir, smoke
        self._weights, self._bf16_sets = None, None

    def _quantized(self, shape, device):
        """(bf16 w13, w2, fp8 w13q, w13s, w2q, w2s) of this shape, made once (DeepSeek-V3's: 22 + 11 GB)."""
        from .moe_kernels_fp8 import quantize_experts

        if self._weights is None or self._weights[0] != shape:
            self._weights = None  # (the last shape's freed first)
            E, K, D, I = shape
            w13, w2 = make_weights(E, D, I, torch.bfloat16, device, torch.Generator(device=device).manual_seed(0))
            self._weights = (shape, w13, w2, *quantize_experts(w13), *quantize_experts(w2))
        return self._weights[1:]

    def inputs(self, shape, T, dtype, device, gen, n_sets):
        from moelink.kernels.fp8 import reference_fused_moe_fp8

        E, K, D, I = shape
        w13, w2, w13q, w13s, w2q, w2s = self._quantized(shape, device)
        self._bf16_sets = make_inputs(E, K, D, I, T, torch.bfloat16, device, gen, n_sets, weights=(w13, w2))
        sets = [(x, w13q, w13s, w2q, w2s, tw, ti) for x, _, _, tw, ti in self._bf16_sets]
        x, tw, ti = sets[0][0], sets[0][5], sets[0][6]
        return sets, reference_fused_moe_fp8(x.float(), w13q, w13s, w2q, w2s, tw, ti, block=self.block).float()

    def time(self, cfg, sets, timer, iters, want=None) -> float:
        return time_config_fp8(cfg, sets, timer, iters, want)

    def seeds(self, shape, T, device):
        return fp8_seeds(shape, T, device, self.block, self.bf16_dir)

    def launched(self, cfg):
        return launched(cfg, self.block)

    def feasible(self, cfg, shape, dtype):
        E, K, D, I = shape
        return feasible_fp8(cfg, D, I, self.block)

    def compare(self, shape, T, sets, timer, iters) -> dict:
        """bf16_ms: the bf16 fused MoE with the bf16 config moelink uses now (tuned file, else default.json), the
        same x and routing, timed the same way; nothing if it fails (the reason is printed)."""
        from moelink.kernels.moe_config import get_moe_config

        E, K, D, I = shape
        t = time_config(get_moe_config(E, I, T, K, sets[0][0].device), self._bf16_sets, timer, iters)
        return dict(bf16_ms=round(t * 1e3, 4)) if math.isfinite(t) else {}

    def shapes(self, smoke: bool) -> dict:
        return FP8_SMOKE_SHAPES if smoke else {s: SHAPES[s] for s in FP8_SHAPES}

    def space(self, name: str) -> dict:
        return FP8_SMOKE_SPACE if name == "smoke" else SPACES[name]

    def file_name(self, E: int, I: int, device) -> str:
        from moelink.kernels.moe_config import device_name
        from moelink.kernels.triton_moe_fp8 import fp8_config_file_name

        return fp8_config_file_name(E, I, device_name(device))

    def meta(self, args) -> dict:
        return dict(dtype="fp8", weight_block=list(self.block), activations="bfloat16, quantized per token per "
                    f"{self.block[1]} channels")

    def fallback(self, shape, device, tokens) -> dict:
        from moelink.kernels.triton_moe_fp8 import get_fp8_moe_config

        E, K, D, I = shape
        return {T: get_fp8_moe_config(E, I, T, K, device) for T in tokens}
