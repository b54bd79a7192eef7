"""Which compiled variants of the fused-MoE kernels a layer can hit, for every token count up to a bound.

A Triton kernel compiles once per set of compile-time values. The fused MoE's depend on the token count T
(the rows the expert call gets) through its launch config (the JSON bucket T selects, kernels/moe_config.py),
the tiny-batch path (T*K <= TINY.max_pairs) and its narrowed down GEMV, MXFP4's and INT4's dequantize-once buckets
(their own table picks the path, the float table the GEMMs' blocks), the alignment kernels' sizes
(moe_align.align_launch) and, for FP8, the activation quantization's block (triton_fp8.quant_block_rows).
Everything else a launch specialises on is fixed by the layer (shapes, dtype, biases, activation) or not
specialised at all (the pair count is `do_not_specialize`). `moe_variant` composes the wrappers' own
decisions for one T: it is the selector. `plan_moe_variants` lists each variant reachable in [1, max_tokens]
once, with the first T that reaches it, from the points where some decision can change (bucket midpoints,
rows-per-expert thresholds, the tiny bound, power-of-two and sub-tile edges) rather than from every T;
tests/engine/test_warmup.py checks it against the selector at every T. Start-up warm-up
(engine/rank/warmup.py) runs one expert call per planned variant.

Host arithmetic only, no device. The Triton wrappers are imported when a function runs, not with this module
(kernels/ops.py: importing them defines the kernels, which fixes the interpreter choice).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from .moe_config import ConfigTable, MoELaunchConfig, TinyConfig, config_table, lookup_moe_config

FORMATS = ("float", "fp8", "mxfp4", "nvfp4", "int4")  # moe/expert_weights.py names


@dataclass(frozen=True)
class MoEShape:
    """What one MoE layer's expert call is keyed on besides its token count.

    `num_experts` is the layer's local expert slots (w13.shape[0]; under expert parallelism a rank's share,
    which is also what the launch-config lookup uses); `device_name` is moe_config.device_name's ('cpu': the
    interpreter's configs); `num_sms` the GPU's SMs (the tiny path narrows its down GEMV by it; 4 on CPU)."""

    fmt: str
    num_experts: int
    inter: int
    hidden: int
    top_k: int
    device_name: str
    num_sms: int
    fp8_block_k: int = 128  # FP8 only: the weight block's Bk (the activation quantization group)
    fp8_block_n: int = 128  # FP8 only: the weight block's Bn (the tiny GEMVs' rows stay in one block)
    config_dir: str | None = None  # tests: a directory of config files instead of kernels/configs/

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"MoEShape.fmt={self.fmt!r} is invalid: choose from {', '.join(FORMATS)}.")
        for name in ("num_experts", "inter", "hidden", "top_k", "num_sms", "fp8_block_k", "fp8_block_n"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MoEShape.{name}={v!r} is invalid: must be a positive integer.")


@dataclass(frozen=True)
class MoEVariant:
    """One compiled set of fused-MoE kernels: equal variants share every compiled kernel."""

    path: str  # "sorted" (align, gate-up GEMM, down GEMM, sum), "tiny" (two GEMVs) or "dequant" (MXFP4, INT4: the
    # experts dequantized once, then the float sorted kernels with `config`)
    config: MoELaunchConfig | TinyConfig  # the GEMMs' blocks as launched (FP8: adapted to the weight block)
    align: tuple[bool, int, int] | None = None  # sorted: moe_align's (SINGLE, CHUNK, SUB)
    down_block_n: int | None = None  # tiny: the down GEMV's BLOCK_N after narrowing
    quant_block_rows: int | None = None  # FP8: the activation quantization's BLOCK_R


def _table(shape: MoEShape) -> ConfigTable:
    if shape.fmt == "fp8":
        from .triton_moe_fp8 import fp8_config_table

        return fp8_config_table(shape.num_experts, shape.inter, shape.device_name, shape.config_dir)
    if shape.fmt == "mxfp4":
        from .triton_moe_mxfp4 import mxfp4_config_table

        return mxfp4_config_table(shape.num_experts, shape.inter, shape.device_name, shape.config_dir)
    if shape.fmt == "int4":
        from .triton_moe_int4 import int4_config_table

        return int4_config_table(shape.num_experts, shape.inter, shape.device_name, shape.config_dir)
    return config_table(shape.num_experts, shape.inter, shape.device_name, shape.config_dir)


def _tables(shape: MoEShape) -> list:
    """Every config table a variant of `shape` is picked from: MXFP4's and INT4's DEQUANT buckets run the float
    kernels with the float table's config, so its buckets count too."""
    tables = [_table(shape)]
    if shape.fmt in ("mxfp4", "int4") and any(cfg.dequant for _, cfg in tables[0][1]):
        tables.append(config_table(shape.num_experts, shape.inter, shape.device_name, shape.config_dir))
    return tables


def _tiny_variant(tiny: TinyConfig, shape: MoEShape, num_tokens: int) -> MoEVariant:
    from .triton_moe_tiny import ROLLED, UNROLLED

    k_loop = ROLLED if shape.fmt in ("mxfp4", "int4") else UNROLLED  # (as each format's wrapper launches it)
    return MoEVariant("tiny", tiny, down_block_n=k_loop.down_block_n(tiny.down.BLOCK_SIZE_N, num_tokens, shape.hidden,
                                                                     shape.num_sms, tiny.down.num_warps))


def moe_variant(shape: MoEShape, num_tokens: int) -> MoEVariant:
    """The kernels an expert call of `num_tokens` >= 1 rows compiles, as the Triton wrappers choose them."""
    from .moe_align import align_launch

    E, I, D, K = shape.num_experts, shape.inter, shape.hidden, shape.top_k
    T, P = num_tokens, num_tokens * shape.top_k
    single, chunk, sub, _ = align_launch(P, E)
    align = (single, chunk, sub)
    if shape.fmt == "fp8":
        from .moe_config import _pick
        from .triton_fp8 import quant_block_rows
        from .triton_moe_fp8 import _blocks

        cfg = _pick(*_table(shape), T, K, E)
        if cfg.uses_tiny(P):  # (kernels/triton_moe_fp8_tiny.py: the float GEMVs' narrowing, then one scale block)
            from .triton_moe_fp8_tiny import fp8_tiny_down_block_n

            return MoEVariant("tiny", cfg.tiny, down_block_n=fp8_tiny_down_block_n(
                cfg.tiny.down.BLOCK_SIZE_N, T, D, shape.num_sms, cfg.tiny.down.num_warps, shape.fp8_block_n))
        bk = shape.fp8_block_k
        up_bn, up_bk, down_bn, down_bk = _blocks(cfg, bk)
        launched = MoELaunchConfig(cfg.BLOCK_SIZE_M,
                             replace(cfg.up, BLOCK_SIZE_N=up_bn, BLOCK_SIZE_K=up_bk, FUSED_GATE_UP=False),
                             replace(cfg.down, BLOCK_SIZE_N=down_bn, BLOCK_SIZE_K=down_bk))
        groups = -(-D // bk)
        return MoEVariant("sorted", launched, align, quant_block_rows=quant_block_rows(T * groups, bk,
                                                                                       shape.device_name == "cpu"))
    if shape.fmt in ("mxfp4", "int4"):  # their own tables: the tiny GEMVs, the dequantize-once buckets, else per tile
        from .moe_config import _pick
        from .triton_moe_int4 import int4_config, int4_path
        from .triton_moe_mxfp4 import mxfp4_config, mxfp4_path

        fit, select = (mxfp4_config, mxfp4_path) if shape.fmt == "mxfp4" else (int4_config, int4_path)
        cfg = _pick(*_table(shape), T, K, E)
        path = select(cfg, T, K)
        if path == "tiny":
            return _tiny_variant(cfg.tiny, shape, T)
        if path == "dequant":  # the float kernels with the float config (and the pre-pass, one compiled kernel)
            float_cfg = lookup_moe_config(E, I, T, K, shape.device_name, shape.config_dir)
            return MoEVariant("dequant", replace(float_cfg, tiny=None, dequant=False), align)
        return MoEVariant("sorted", replace(fit(cfg), tiny=None), align)
    cfg = lookup_moe_config(E, I, T, K, shape.device_name, shape.config_dir)
    if shape.fmt == "nvfp4":
        from .triton_moe_nvfp4 import nvfp4_config

        return MoEVariant("sorted", nvfp4_config(cfg), align)  # (no tiny path)
    if cfg.uses_tiny(P):
        return _tiny_variant(cfg.tiny, shape, T)
    return MoEVariant("sorted", replace(cfg, tiny=None), align)


def plan_moe_variants(shape: MoEShape, max_tokens: int) -> list[tuple[int, MoEVariant]]:
    """Every variant `moe_variant` gives for some T in [1, max_tokens], once, with the smallest such T; in
    order of that T."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens!r} is invalid: must be a positive integer.")
    seen: dict[MoEVariant, int] = {}
    for t in sorted(c for c in _change_points(shape, max_tokens) if 1 <= c <= max_tokens):
        seen.setdefault(moe_variant(shape, t), t)
    return [(t, v) for v, t in sorted(seen.items(), key=lambda vt: vt[1])]


def _change_points(shape: MoEShape, max_tokens: int) -> set[int]:
    """Token counts where some decision of `moe_variant` may change (a superset of where one does): every
    maximal run of equal variants starts at one of them, so evaluating these finds every variant."""
    E, D, K = shape.num_experts, shape.hidden, shape.top_k
    points = {1}

    def tokens_for_pairs(p: int) -> int:  # the first T with T*K >= p
        return -(-p // K)

    for key, buckets in _tables(shape):
        keys = [b for b, _ in buckets]
        if key == "tokens":  # nearest bucket, ties to the smaller: the choice moves past each midpoint
            for a, b in zip(keys, keys[1:]):
                points |= {(a + b) // 2, (a + b) // 2 + 1}
        else:  # the largest bucket not above T*K/E
            points |= {tokens_for_pairs(b * E) for b in keys}
        for _, cfg in buckets:
            if cfg.tiny is not None:
                points.add(cfg.tiny.max_pairs // K + 1)
                bn = cfg.tiny.down.BLOCK_SIZE_N  # the down GEMV halves BLOCK_N while T * cdiv(D, BN) < 2 * SMs
                while bn >= 8:
                    points.add(-(-2 * shape.num_sms // -(-D // bn)))
                    bn //= 2
    max_pairs = max_tokens * K
    # Alignment (moe_align.align_launch): SUB is next_power_of_2(P) clamped to [16, 256] (and to 8192 / X),
    # CHUNK is SUB times the sub-tile count (1..4: one program) or times cdiv(sub-tiles, 256): its edges sit
    # one pair past a power of two, past 1..4 SUBs, and past each 256 SUBs.
    for sub in (16, 32, 64, 128, 256):
        edges = [sub * m for m in range(1, 5)] + list(range(256 * sub, max_pairs, 256 * sub))
        points |= {tokens_for_pairs(p + 1) for p in edges}
    if shape.fmt == "fp8":  # quant_block_rows follows next_power_of_2(T * groups) up to its cap
        groups, p2 = -(-D // shape.fp8_block_k), 1
        while p2 <= max_tokens * groups:
            points.add(-(-(p2 + 1) // groups))
            p2 *= 2
    return points


def launch_configs(plan: list[tuple[int, MoEVariant]]) -> list[MoELaunchConfig | TinyConfig]:
    """The distinct GEMM launch configs of a plan, in plan order (a sorted-path config and a tiny one count
    apart)."""
    out: list = []
    for _, v in plan:
        if v.config not in out:
            out.append(v.config)
    return out


__all__ = ["FORMATS", "MoEShape", "MoEVariant", "launch_configs", "moe_variant", "plan_moe_variants"]
