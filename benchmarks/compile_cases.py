"""What the sm_90 compile report compiles: every Triton kernel of kernels/ launched, without a GPU, at the
shapes and launch configs the engine uses (benchmarks/compile_report.py analyses what comes out).

A stand-in Triton driver answers "current target" with GPUTarget("cuda", 90, 32), and a `Recorder` turns
each `kernel[grid](...)` launch in the wrappers into `JITFunction.run(..., warmup=True)`, so the wrappers
run on meta tensors and only compile.
"""
from __future__ import annotations

import re
import time
from contextlib import contextmanager
from dataclasses import replace

import torch

MODEL_SHAPES = {"qwen3-30b-a3b": (128, 8, 2048, 768), "mixtral-8x7b": (8, 2, 4096, 14336),
                "deepseek-v3": (256, 8, 7168, 2048)}  # = moe_kernels.SHAPES (not imported: it pulls matplotlib paths)
TARGET_NAME = "NVIDIA_H100_80GB_HBM3"


# -- compiling without a GPU ---------------------------------------------------------------------------------------------
class _StandInDriver:
    """What JITFunction.run asks of a driver when it only compiles (warmup=True)."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


class Recorder:
    """Turns every `kernel[grid](...)` into an ahead-of-time compile and keeps (case, kernel, seconds, constexprs)."""

    def __init__(self):
        self.case = ""
        self.records: list[dict] = []

    @contextmanager
    def labelled(self, case: str):
        old, self.case = self.case, case
        try:
            yield
        finally:
            self.case = old

    def install(self, arch: int = 90) -> None:
        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction

        driver.set_active(_StandInDriver(arch))
        rec = self

        def compile_instead_of_launch(self, grid):
            def launch(*args, **kwargs):
                t0 = cpu_seconds()
                k = self.run(*args, grid=grid, warmup=True, **kwargs)
                # (launch keywords that are constexprs or options: the MoE pipeline passes runtime arguments by
                # keyword too, and a size or a stride is not part of what a launch config compiles)
                runtime = {p.name for p in self.params if not p.is_constexpr}
                consts = {a: b for a, b in kwargs.items()
                          if isinstance(b, (int, bool, str)) and a != "PREC" and a not in runtime}
                rec.records.append(dict(case=rec.case, kernel=k, seconds=cpu_seconds() - t0, constexprs=consts,
                                        grid=grid, **specialisation(k)))
            return launch

        JITFunction.__getitem__ = compile_instead_of_launch
        from moelink.kernels import moe_config, triton_common, triton_moe_tiny

        triton_common.interpreting = lambda t: False
        moe_config.device_name = lambda d: TARGET_NAME
        triton_moe_tiny.num_sms = lambda d: 132  # the H100's SMs: the tiny down GEMV narrows as it would there


def cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (ptxas): what a compile costs whatever else the
    machine runs. Wall time on a shared 2-core machine measured the load, 3-4x the idle compile."""
    import resource

    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ch.ru_utime + ch.ru_stime


def specialisation(kernel) -> dict:
    """What besides the launch config makes a compiled kernel distinct: `dtypes`, the pointer arguments' element
    types in order (the activation dtype, fp8 or not), and `shape_class`, the shape- and stride-dependent
    specialisation Triton applied (arguments divisible by 16, and those equal to 1 folded into constants). Two
    launches that agree on kernel, config, dtypes and shape class compile to the same code."""
    src = getattr(kernel, "src", None)
    sig = getattr(src, "signature", None) or {}
    attrs = getattr(src, "attrs", None) or {}
    names = list(sig)
    div16 = sorted(names[i[0]] for i, v in attrs.items() if any(a[0] == "tt.divisibility" for a in v))
    const1 = sorted(n for n, t in sig.items() if t == "constexpr" and not n.isupper())  # (specialised values, not meta)
    return dict(dtypes=",".join(t for t in sig.values() if t.startswith("*")),
                shape_class=f"div16[{','.join(div16)}] eq1[{','.join(const1)}]")


# -- what gets compiled ----------------------------------------------------------------------------------------------------
# Config keys of kernels/moe_schedule.py compiled beside every default.json bucket (label, GemmConfig fields).
NEW_KEY_VARIANTS = (("persistent", dict(PERSISTENT=1)), ("tma", dict(TMA=True)),
                    ("persistent tma", dict(PERSISTENT=1, TMA=True)),
                    ("persistent tma fused gate-up", dict(PERSISTENT=1, TMA=True)),
                    ("tma ws", dict(TMA=True, WARP_SPECIALIZE=True)),
                    ("persistent tma ws", dict(PERSISTENT=1, TMA=True, WARP_SPECIALIZE=True)))


def moe_cases(published: bool, quick: bool):
    """(label, shape name, (E, K, D, I), T, MoELaunchConfig, dtype, map?, combine) for every config moelink or the tuner uses."""
    from moelink.kernels.moe_config import (CONFIG_DIR, DEFAULT_TINY_FLOAT, MoELaunchConfig, TinyGemm, committed_config,
                                            load_config_file)

    key, default = committed_config("default.json")
    assert key == "rows_per_expert"
    for name, (E, K, D, I) in MODEL_SHAPES.items():
        for bucket, cfg in default:
            T = max(1, -(-bucket * E // K))  # the fewest tokens that reach this rows-per-expert bucket
            yield f"default.json[{bucket}]", name, (E, K, D, I), T, cfg, torch.bfloat16, False, "sum"
            # The same config with the fused gate-up tile (FUSED_GATE_UP), which tune_moe tries as one axis.
            fused = MoELaunchConfig(cfg.BLOCK_SIZE_M, replace(cfg.up, FUSED_GATE_UP=True), cfg.down)
            yield f"default.json[{bucket}] fused gate-up", name, (E, K, D, I), T, fused, torch.bfloat16, False, "sum"
            # The persistent tile loop and the TMA loads (tune_moe axes PERSISTENT, TMA), alone and together.
            for label, keys in NEW_KEY_VARIANTS:
                up = replace(cfg.up, FUSED_GATE_UP=label.endswith("fused gate-up"), **keys)
                v = MoELaunchConfig(cfg.BLOCK_SIZE_M, up, replace(cfg.down, **keys))
                yield f"default.json[{bucket}] {label}", name, (E, K, D, I), T, v, torch.bfloat16, False, "sum"
            if quick:
                break
    for path in sorted(CONFIG_DIR.glob("E=*,N=*,device_name=*.json")):
        m = re.match(r"E=(\d+),N=(\d+),device_name=(.+)\.json$", path.name)
        E, I = int(m[1]), int(m[2])
        shape = [(n, s) for n, s in MODEL_SHAPES.items() if (s[0], s[3]) == (E, I)]
        if not shape:
            continue
        name, (E, K, D, I) = shape[0]
        for bucket, cfg in load_config_file(str(path))[1]:
            yield f"{path.name}[{bucket}]", name, (E, K, D, I), bucket, cfg, torch.bfloat16, False, "sum"
    if published:
        from moelink.benchmarks.tune_moe import published_seeds

        for name, (E, K, D, I) in MODEL_SHAPES.items():
            for T, cfg, src in published_seeds(E, I, D, all_buckets=True):
                yield f"published {src}[{T}]", name, (E, K, D, I), T, cfg, torch.bfloat16, False, "sum"
    # Variants the engine also launches: fp32/fp16 activations, an expert map (EP), atomic combine.
    E, K, D, I = MODEL_SHAPES["qwen3-30b-a3b"]
    for dt in (torch.float32, torch.float16):
        yield f"variant {str(dt)[6:]}", "qwen3-30b-a3b", (E, K, D, I), 64, None, dt, False, "sum"
    yield "variant expert map", "qwen3-30b-a3b", (E, K, D, I), 64, None, torch.bfloat16, True, "sum"
    yield "variant atomic", "qwen3-30b-a3b", (E, K, D, I), 4096, None, torch.bfloat16, False, "atomic"
    # The tiny-batch path (kernels/triton_moe_tiny.py) with DEFAULT_TINY_FLOAT at decode sizes of every shape: one
    # token (the down GEMV narrowed to one row where D / BN one-warp programs are too few for 132 SMs) and eight;
    # fp32 activations and an expert map; and the widest GEMV tiles tune_moe's tiny axis keeps (its register and lane
    # rules, 8 warps up, 4 down).
    base = committed_config("default.json")[1][0][1]
    tiny = MoELaunchConfig(base.BLOCK_SIZE_M, base.up, base.down, DEFAULT_TINY_FLOAT)
    for name, shape in MODEL_SHAPES.items():
        for T in (1, 8):
            yield "tiny DEFAULT_TINY_FLOAT", name, shape, T, tiny, torch.bfloat16, False, "sum"
    yield "tiny variant float32", "qwen3-30b-a3b", (E, K, D, I), 1, tiny, torch.float32, False, "sum"
    yield "tiny variant expert map", "qwen3-30b-a3b", (E, K, D, I), 1, tiny, torch.bfloat16, True, "sum"
    if not quick:
        wide = replace(DEFAULT_TINY_FLOAT, up=TinyGemm(4, 2048, 8, 1), down=TinyGemm(4, 1024, 4, 1))
        yield "tiny up 4x2048/8w down 4x1024/4w", "qwen3-30b-a3b", (E, K, D, I), 8, replace(tiny, tiny=wide), \
            torch.bfloat16, False, "sum"


def compile_moe(rec: Recorder, published: bool, quick: bool) -> None:
    from moelink.kernels.triton_moe import triton_fused_moe

    meta = dict(device="meta")
    for label, name, (E, K, D, I), T, cfg, dt, emap, combine in moe_cases(published, quick):
        with rec.labelled(f"{name} T={T} {label}"):
            triton_fused_moe(torch.empty(T, D, dtype=dt, **meta), torch.empty(E, 2 * I, D, dtype=dt, **meta),
                             torch.empty(E, D, I, dtype=dt, **meta), torch.empty(T, K, **meta),
                             torch.empty(T, K, dtype=torch.long, **meta),
                             torch.empty(E, dtype=torch.int32, **meta) if emap else None, config=cfg, combine=combine)
    # gpt-oss's float experts on the tiny path: both biases and the clamped swiglu in the GEMV epilogues.
    from moelink.kernels.moe import MoEActivation

    E, K, D, I = 128, 4, 2880, 2880
    bf = dict(dtype=torch.bfloat16, **meta)
    with rec.labelled("gpt-oss-120b T=1 tiny DEFAULT_TINY_FLOAT + biases + swiglu_oai"):
        triton_fused_moe(torch.empty(1, D, **bf), torch.empty(E, 2 * I, D, **bf), torch.empty(E, D, I, **bf),
                         torch.empty(1, K, **meta), torch.empty(1, K, dtype=torch.long, **meta),
                         b13_EF=torch.empty(E, 2 * I, **bf), b2_ED=torch.empty(E, D, **bf),
                         activation=MoEActivation("swiglu_oai"), path="tiny")


def compile_attention(rec: Recorder, quick: bool) -> None:
    from moelink.kernels.attention import AttentionMetadata
    from moelink.kernels.triton_attention import triton_paged_attention, triton_write_kv

    meta = dict(device="meta")
    heads = [("qwen3 32/4", 32, 4, torch.bfloat16), ("mixtral 32/8", 32, 8, torch.bfloat16)]
    if not quick:
        heads += [("qwen3 32/4 fp32", 32, 4, torch.float32), ("16/16 fp16", 16, 16, torch.float16)]
    for label, N, Kh, dt in heads:
        H, L, S, T = 128, 16, 8, 40
        i32 = lambda *s: torch.empty(*s, dtype=torch.int32, **meta)  # noqa: E731
        q = torch.empty(T, N, H, dtype=dt, **meta)
        cache = torch.empty(100, L, Kh, H, dtype=dt, **meta)
        mixed = AttentionMetadata(i32(S + 1), i32(S), i32(S, 64), torch.empty(T, dtype=torch.long, **meta),
                                  [1] * 7 + [33], [100] * 8, 33, 1000, 99)
        decode = AttentionMetadata(i32(S + 1), i32(S), i32(S, 64), torch.empty(S, dtype=torch.long, **meta),
                                   [1] * 8, [100] * 8, 1, 1000, 99)
        with rec.labelled(f"{label} mixed batch, decode plan P = 4 x S"):
            triton_paged_attention(q, cache, cache, mixed, 0.1, num_splits=4)
        with rec.labelled(f"{label} mixed batch, prefill split 4"):
            triton_paged_attention(q, cache, cache, mixed, 0.1, prefill_splits=4)
        with rec.labelled(f"{label} decode, no split"):
            triton_paged_attention(q[:S], cache, cache, decode, 0.1, num_splits=1)
        with rec.labelled(f"{label} KV write"):
            kv = torch.empty(T, Kh, H, dtype=dt, **meta)
            triton_write_kv(kv, kv, cache, cache, torch.empty(T, dtype=torch.long, **meta))
        if dt == torch.bfloat16 and label.startswith("qwen3"):  # --kv-cache-dtype fp8: e4m3 K/V, bf16 queries
            c8 = torch.empty(100, L, Kh, H, dtype=torch.float8_e4m3fn, **meta)
            with rec.labelled(f"{label} fp8 KV cache, mixed batch, decode plan P = 4 x S"):
                triton_paged_attention(q, c8, c8, mixed, 0.1, num_splits=4, k_scale=0.5, v_scale=0.5)
            with rec.labelled(f"{label} fp8 KV cache, mixed batch, prefill split 4"):
                triton_paged_attention(q, c8, c8, mixed, 0.1, prefill_splits=4, k_scale=0.5, v_scale=0.5)
            with rec.labelled(f"{label} fp8 KV cache, decode, no split"):
                triton_paged_attention(q[:S], c8, c8, decode, 0.1, num_splits=1, k_scale=0.5, v_scale=0.5)
            with rec.labelled(f"{label} fp8 KV write"):
                triton_write_kv(kv, kv, c8, c8, torch.empty(T, dtype=torch.long, **meta), 0.5, 0.5)
    # gpt-oss: 64 heads over 8 kv heads of 64 dims, with per-head sinks, on a sliding (128) and a full layer.
    for dt in (torch.bfloat16,) if quick else (torch.bfloat16, torch.float32):
        H, L, S, T = 64, 16, 8, 40
        i32 = lambda *s: torch.empty(*s, dtype=torch.int32, **meta)  # noqa: E731
        q = torch.empty(T, 64, H, dtype=dt, **meta)
        cache = torch.empty(100, L, 8, H, dtype=dt, **meta)
        sinks = torch.empty(64, dtype=dt, **meta)
        mixed = AttentionMetadata(i32(S + 1), i32(S), i32(S, 64), torch.empty(T, dtype=torch.long, **meta),
                                  [1] * 7 + [33], [100] * 8, 33, 1000, 99)
        decode = AttentionMetadata(i32(S + 1), i32(S), i32(S, 64), torch.empty(S, dtype=torch.long, **meta),
                                   [1] * 8, [100] * 8, 1, 1000, 99)
        for layer, extra in (("sliding", dict(sinks_N=sinks, sliding_window=128)), ("full", dict(sinks_N=sinks))):
            label = f"gpt-oss 64/8 {layer} {str(dt)[6:]}"
            with rec.labelled(f"{label} mixed batch, decode plan P = 4 x S"):
                triton_paged_attention(q, cache, cache, mixed, 0.1, num_splits=4, **extra)
            with rec.labelled(f"{label} mixed batch, prefill split 4"):
                triton_paged_attention(q, cache, cache, mixed, 0.1, prefill_splits=4, **extra)
            with rec.labelled(f"{label} decode, no split"):
                triton_paged_attention(q[:S], cache, cache, decode, 0.1, num_splits=1, **extra)


def compile_norm_rotary(rec: Recorder, quick: bool) -> None:
    from moelink.kernels.triton_norm import triton_add_rms_norm, triton_rms_norm
    from moelink.kernels.triton_rotary import triton_rotary

    meta = dict(device="meta")
    for dt in (torch.bfloat16,) if quick else (torch.bfloat16, torch.float32, torch.float16):
        for D in (2048, 4096, 7168):
            x = torch.empty(33, D, dtype=dt, **meta)
            with rec.labelled(f"RMSNorm D={D} {str(dt)[6:]}"):
                triton_rms_norm(x, torch.empty(D, dtype=dt, **meta), 1e-6)
                triton_add_rms_norm(x, x, torch.empty(D, dtype=dt, **meta), 1e-6)
        qkv = torch.empty(33, 40 * 128, dtype=dt, **meta)
        q, k = qkv[:, :4096].view(33, 32, 128), qkv[:, 4096:4608].view(33, 4, 128)
        with rec.labelled(f"q/k-norm + rotary, head dim 128 {str(dt)[6:]}"):
            triton_rms_norm(q, torch.empty(128, dtype=dt, **meta), 1e-6)
            triton_rotary(q, k, torch.empty(33, dtype=torch.long, **meta), torch.empty(100, 128, **meta))


def compile_mla(rec: Recorder, quick: bool) -> None:
    """MLA at DeepSeek-V3 shapes (128 heads, latent 512, rope 64): a decode batch (unsplit, and split by the device
    plan with its merge), a mixed batch of decodes and a chunk over a cached prefix (unsplit, and Z-way split
    with its merge), the latent write, the same over an fp8 latent cache (mixed batches: the chunk's context
    widened once, kernels/triton_mla_wide.py); and 16 heads (DeepSeek-V2-Lite), where the head block shrinks
    to 16."""
    from moelink.kernels.attention import AttentionMetadata
    from moelink.kernels.triton_mla import triton_mla_attention, triton_write_latent

    meta = dict(device="meta")
    C, P, L = 512, 64, 16
    i32 = lambda *s: torch.empty(*s, dtype=torch.int32, **meta)  # noqa: E731
    variants = [(128, torch.bfloat16)] + ([] if quick else [(128, torch.float16), (128, torch.float32), (16, torch.bfloat16)])
    for N, dt in variants:
        name = f"{'deepseek-v3' if N == 128 else 'deepseek-v2-lite'} MLA {str(dt)[6:]}"
        cache = torch.empty(1000, L, C + P, dtype=dt, **meta)
        for label, S, q_lens, splits in (("decode batch 64", 64, [1] * 64, 1),
                                         ("decode batch 4, plan P = 8 x S", 4, [1] * 4, 8),
                                         ("mixed batch (31 decodes + a 97-token chunk)", 32, [1] * 31 + [97], None),
                                         ("mixed batch (31 decodes + a 97-token chunk), split 4", 32, [1] * 31 + [97], 4)):
            T = sum(q_lens)
            m = AttentionMetadata(i32(S + 1), i32(S), i32(S, 512), torch.empty(T, dtype=torch.long, **meta), q_lens,
                                  [4096] * S, max(q_lens), 4096, 999)
            with rec.labelled(f"{name} {label}"):
                triton_mla_attention(torch.empty(T, N, C, dtype=dt, **meta), torch.empty(T, N, P, dtype=dt, **meta),
                                     cache, m, 0.1, num_splits=splits)
        with rec.labelled(f"{name} latent write"):
            triton_write_latent(torch.empty(40, C, dtype=dt, **meta), torch.empty(40, P, dtype=dt, **meta), cache,
                                torch.empty(40, dtype=torch.long, **meta))
        if dt == torch.bfloat16 and (N == 128 or not quick):  # --kv-cache-dtype fp8: e4m3 latents, bf16 queries
            c8 = torch.empty(1000, L, C + P, dtype=torch.float8_e4m3fn, **meta)
            # The mixed batches: the decodes over the fp8 cache (SELECT), the chunk's context widened
            # (triton_mla_wide._widen_kernel) and read by the bf16 launch config over the workspace.
            for label, S, q_lens, splits in (("decode batch 64", 64, [1] * 64, 1),
                                             ("decode batch 4, plan P = 8 x S", 4, [1] * 4, 8),
                                             ("mixed batch (31 decodes + a 97-token chunk)", 32, [1] * 31 + [97], None),
                                             ("mixed batch (31 decodes + a 97-token chunk), split 4", 32,
                                              [1] * 31 + [97], 4)):
                T = sum(q_lens)
                m = AttentionMetadata(i32(S + 1), i32(S), i32(S, 512), torch.empty(T, dtype=torch.long, **meta),
                                      q_lens, [4096] * S, max(q_lens), 4096, 999)
                with rec.labelled(f"{name} fp8 latent cache, {label}"):
                    triton_mla_attention(torch.empty(T, N, C, dtype=dt, **meta), torch.empty(T, N, P, dtype=dt, **meta),
                                         c8, m, 0.1, 0.5, num_splits=splits)
            with rec.labelled(f"{name} fp8 latent write"):
                triton_write_latent(torch.empty(40, C, dtype=dt, **meta), torch.empty(40, P, dtype=dt, **meta), c8,
                                    torch.empty(40, dtype=torch.long, **meta), 0.5)


# Dense FP8 linears the engine launches (DeepSeek-V3's attention and dense-MLP projections, [N, K]).
FP8_LINEAR_SHAPES = {"deepseek-v3 q_b_proj": (24576, 1536), "deepseek-v3 o_proj": (7168, 16384),
                     "deepseek-v3 dense gate_up": (36864, 7168)}


def launch_fp8_tiny(E: int, K: int, D: int, I: int, T: int, activation=None, prequant: bool = False,
                    quant_h: bool = True) -> None:
    """kernels/triton_moe_fp8_tiny.py's launches (DEFAULT_TINY_FP8) on meta tensors, 128 x 128 blocks
    (`activation`: gpt-oss's clamped SwiGLU, else SiLU): x's quantization, the gate-up GEMV with h's, the down
    GEMV; `prequant`: the two-launch form the engine runs, x quantized by the norm before (its add_rms_norm_fp8
    launched too); not `quant_h`: h quantized by a launch of its own (the four-launch form before it)."""
    from moelink.kernels.fp8 import block_scale_shape
    from moelink.kernels.triton_moe_fp8 import triton_fused_moe_fp8
    from moelink.kernels.triton_norm import triton_add_rms_norm_fp8


    meta, f8, bf = dict(device="meta"), torch.float8_e4m3fn, dict(device="meta", dtype=torch.bfloat16)
    x = torch.empty(T, D, **bf)
    x_fp8 = triton_add_rms_norm_fp8(x, torch.empty(T, D, **bf), torch.empty(D, **bf), 1e-6)[2:] if prequant else None
    triton_fused_moe_fp8(x, torch.empty(E, 2 * I, D, dtype=f8, **meta),
                         torch.empty(E, *block_scale_shape(2 * I, D), **meta), torch.empty(E, D, I, dtype=f8, **meta),
                         torch.empty(E, *block_scale_shape(D, I), **meta), torch.empty(T, K, **meta),
                         torch.empty(T, K, dtype=torch.long, **meta), path="tiny", activation=activation, x_fp8=x_fp8,
                         fuse_h=quant_h)


def compile_fp8(rec: Recorder, quick: bool) -> None:
    """FP8 block-scaled W8A8 (kernels/triton_fp8.py, triton_moe_fp8.py): the fused MoE at every bucket of
    fp8_moe_default.json at the DeepSeek-V3 and Qwen3-30B-A3B shapes (the published FP8 checkpoints) and of every
    tuned `fp8_w8a8,E=..,N=..,device_name=..json` file at its shape (tune_moe --dtype fp8), one expert-map and one
    atomic variant; the dense GEMM at every fp8_linear.json bucket; the quantization kernel
    with them."""
    from moelink.kernels.fp8 import block_scale_shape
    from moelink.kernels.moe_config import CONFIG_DIR, MoELaunchConfig, committed_config, load_config_file
    from moelink.kernels.triton_fp8 import _linear_buckets, triton_fp8_linear
    from moelink.kernels.triton_moe_fp8 import triton_fused_moe_fp8

    meta = dict(device="meta")
    f8 = torch.float8_e4m3fn
    key, default = committed_config("fp8_moe_default.json")
    assert key == "rows_per_expert"
    moe = [(f"fp8_moe_default.json[{b}]", n, T, c, False, "sum") for n in ("deepseek-v3", "qwen3-30b-a3b")
           for b, c in (default[:1] if quick else default)
           for T in [max(1, -(-b * MODEL_SHAPES[n][0] // MODEL_SHAPES[n][1]))]]
    moe += [(f"{label} {v}", n, T, MoELaunchConfig(c.BLOCK_SIZE_M, replace(c.up, **keys), replace(c.down, **keys)), e, comb)
            for label, n, T, c, e, comb in list(moe) for v, keys in NEW_KEY_VARIANTS if "fused" not in v]
    for path in sorted(CONFIG_DIR.glob("fp8_w8a8,E=*,N=*,device_name=*.json")):  # tune_moe --dtype fp8's files
        m = re.match(r"fp8_w8a8,E=(\d+),N=(\d+),", path.name)
        names = [n for n in ("deepseek-v3", "qwen3-30b-a3b") if (MODEL_SHAPES[n][0], MODEL_SHAPES[n][3]) == (int(m[1]), int(m[2]))]
        if names:
            moe += [(f"{path.name}[{b}]", names[0], b, c, False, "sum") for b, c in load_config_file(str(path))[1]]
    for name in ("qwen3-30b-a3b", "deepseek-v3"):  # the tiny path's e4m3 GEMVs (DEFAULT_TINY_FP8) at one token
        E, K, D, I = MODEL_SHAPES[name]
        with rec.labelled(f"{name} T=1 fp8 tiny DEFAULT_TINY_FP8"):
            launch_fp8_tiny(E, K, D, I, 1)
    if not quick:
        moe += [("fp8 variant expert map", "deepseek-v3", 64, None, True, "sum"),
                ("fp8 variant atomic", "deepseek-v3", 4096, None, False, "atomic")]
    for label, name, T, cfg, emap, combine in moe:
        E, K, D, I = MODEL_SHAPES[name]
        with rec.labelled(f"{name} T={T} {label}"):
            triton_fused_moe_fp8(torch.empty(T, D, dtype=torch.bfloat16, **meta), torch.empty(E, 2 * I, D, dtype=f8, **meta),
                                 torch.empty(E, *block_scale_shape(2 * I, D), **meta), torch.empty(E, D, I, dtype=f8, **meta),
                                 torch.empty(E, *block_scale_shape(D, I), **meta), torch.empty(T, K, **meta),
                                 torch.empty(T, K, dtype=torch.long, **meta),
                                 torch.empty(E, dtype=torch.int32, **meta) if emap else None, config=cfg, combine=combine)
    shapes = list(FP8_LINEAR_SHAPES.items())[: 1 if quick else None]
    for bucket, cfg in _linear_buckets("gpu"):
        for label, (N, K) in shapes:
            T = max(1, bucket)
            with rec.labelled(f"{label} T={T} fp8_linear.json[{bucket}]"):
                triton_fp8_linear(torch.empty(T, K, dtype=torch.bfloat16, **meta), torch.empty(N, K, dtype=f8, **meta),
                                  torch.empty(*block_scale_shape(N, K), **meta), config=cfg)


# gpt-oss experts (E, top-k, D, I): MXFP4 weights, biases, swiglu_oai.
