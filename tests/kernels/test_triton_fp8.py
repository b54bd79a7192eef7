"""FP8 block-scaled Triton kernels (per-token-group quantization, W8A8 dense GEMM, fused MoE) against the
plain-torch references of kernels/fp8.py, in the interpreter on CPU (compiled on CUDA when there is one).

Tolerances, and why they can be tight:
- Quantization is bit-exact: the same fp32 amax, the same fp32 division, round to nearest even.
- The GEMMs multiply the same fp8 codes by the same scales as the reference. A product of two e4m3 values
  has at most 8 significant bits, so it is exact in fp32; what differs is only the order of the fp32
  sums (the reference, given float64 inputs, sums in float64 after the same roundings). That is ~1e-7
  relative (measured: 5e-8 .. 2e-7), so fp32 outputs hold 2e-5 per row; bf16 / fp16 outputs add their own
  rounding (<= 2^-9 / 2^-11 per element, and the MoE rounds each pair's row before the top-k sum too).
- The fused MoE quantizes SiLU(gate)*up a second time. Its fp32 value differs from the reference's by
  ~1e-7 relative, so an element that lies within that distance of an fp8 rounding midpoint may round the
  other way (an estimated few 1e-6 per element, so ~1% of test cases see one). Such a flip moves one token's
  row by at most a few 1e-3, while any wrong scale, group, expert or row moves rows by O(1). So: every row
  holds the tight bound except at most two, and those stay within 2e-2.
"""
from __future__ import annotations

import pytest
import torch

from moelink.kernels.fp8 import (FP8_DTYPE, block_dequantize, block_quantize, fake_quant_activation,
                                 per_token_group_quant, reference_fp8_linear, reference_fused_moe_fp8)
from moelink.kernels import moe_config
from moelink.kernels.moe_config import GemmConfig, MoELaunchConfig
from moelink.kernels.triton_fp8 import triton_fp8_linear, triton_per_token_group_quant
from moelink.kernels.triton_moe_fp8 import _blocks, get_fp8_moe_config, triton_fused_moe_fp8

ROW_TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 2e-3}
FLIP_TOL = 2e-2  # a row moved by one flipped fp8 rounding of the intermediate (see the module docstring)


def _cfg(bm=16, bn=128, bk=128, group=2, down=None):
    d = {"BLOCK_SIZE_M": bm, "BLOCK_SIZE_N": bn, "BLOCK_SIZE_K": bk, "GROUP_SIZE_M": group, "num_warps": 4,
         "num_stages": 1}
    if down:
        d["down"] = {**d, **down}
        del d["down"]["BLOCK_SIZE_M"]
    return MoELaunchConfig.from_dict(d)


K32 = _cfg(bk=32)  # four K steps inside each 128-channel scale group
BM32 = _cfg(bm=32, bn=32, bk=64, down={"BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 64})  # gate-up BN raised to Bk


def _weight(gen, *shape, block=(128, 128)):
    """Random weight with a different magnitude per scale block, so a kernel that takes a neighbour's scale is
    off by O(1), quantized to the published layout."""
    *lead, n, k = shape
    bn, bk = block
    rows = torch.exp(torch.randn(*lead, -(-n // bn), 1, generator=gen)).repeat_interleave(bn, -2)[..., :n, :]
    cols = torch.exp(torch.randn(*lead, 1, -(-k // bk), generator=gen)).repeat_interleave(bk, -1)[..., :k]
    return block_quantize(torch.randn(*shape, generator=gen) / k**0.5 * rows * cols, block)


def _x(gen, T, K, dtype):
    """Activations with a different magnitude per token and per 128-channel group (the scales matter)."""
    g = -(-K // 128)
    mag = torch.exp(torch.randn(T, g, generator=gen)).repeat_interleave(128, -1)[:, :K]
    return (torch.randn(T, K, generator=gen) * mag).to(dtype)


def _to(dev, *ts):
    return [None if t is None else t.to(dev) for t in ts]


# -- quantization --------------------------------------------------------------------------------------------------------
def test_fp32_to_e4m3_rounding_is_bit_exact(kdev):
    """The interpreter's own fp32 -> fp8 cast is wrong (module docstring of triton_fp8); ours must equal torch's
    on every code, every tie (nearest even), just either side of each tie, subnormals and 448. A 448 in each
    group makes the scale exactly 1, so the values reach the cast unscaled."""
    codes = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()
    vals = codes[torch.isfinite(codes)].unique()
    mids = (vals[1:] + vals[:-1]) / 2
    x = torch.cat([vals, mids, mids.nextafter(torch.tensor(1e9)), mids.nextafter(torch.tensor(-1e9)),
                   torch.tensor([1e-30, -1e-30, 2.0**-10, 3 * 2.0**-11, 447.9, -447.9])])
    x = torch.cat([x, torch.zeros(-x.numel() % 127)]).reshape(-1, 127)
    x = torch.cat([torch.full((x.shape[0], 1), 448.0), x], dim=1)
    got_q, got_s = triton_per_token_group_quant(x.to(kdev), 128)
    want_q, want_s = per_token_group_quant(x, 128)
    assert torch.equal(got_s.cpu(), want_s) and bool((want_s == 1).all())
    assert torch.equal(got_q.cpu().view(torch.uint8), want_q.view(torch.uint8))


# (T, K, group, dtype): ragged K, partial last group, a zero group, groups that are not powers of two.
QUANT_CASES = [(1, 7168, 128, torch.bfloat16), (3, 200, 128, torch.float32), (17, 77, 128, torch.float16),
               (33, 384, 64, torch.bfloat16), (5, 300, 96, torch.float32), (0, 128, 128, torch.float32)]


@pytest.mark.parametrize("T,K,group,dtype", QUANT_CASES)
def test_group_quant_is_bit_exact(T, K, group, dtype, gen, kdev, seed):
    x = _x(gen, T, K, dtype)
    if T:
        x[0, :group] = 0  # an all-zero group: finite scale, exact zeros
    got_q, got_s = triton_per_token_group_quant(x.to(kdev), group)
    want_q, want_s = per_token_group_quant(x, group)
    assert got_q.dtype == FP8_DTYPE and got_s.shape == want_s.shape
    assert torch.equal(got_s.cpu(), want_s), f"scales differ (seed={seed})"
    assert torch.equal(got_q.cpu().view(torch.uint8), want_q.view(torch.uint8)), f"fp8 codes differ (seed={seed})"


# -- dense GEMM ----------------------------------------------------------------------------------------------------------
# (T, N, K, dtype, bias, config, block)
LINEAR_CASES = [
    (1, 257, 129, torch.float16, True, None, (128, 128)),  # decode; N and K one past a block
    (3, 150, 200, torch.float32, True, None, (128, 128)),  # partial last blocks in both N and K
    (17, 40, 300, torch.bfloat16, False, K32, (128, 128)),  # N < one block; four K steps per scale group
    (33, 130, 384, torch.bfloat16, True, BM32, (128, 128)),  # several M blocks, K a multiple of the block
    (5, 64, 77, torch.float32, False, None, (128, 128)),  # K shorter than one group
    (9, 200, 160, torch.float32, True, None, (96, 64)),  # another block: Bn not a power of two, BK capped to 64
]


@pytest.mark.parametrize("T,N,K,dtype,bias,cfg,block", LINEAR_CASES)
def test_fp8_linear_matches_reference(T, N, K, dtype, bias, cfg, block, gen, kdev, seed):
    x = _x(gen, T, K, dtype)
    wq, ws = _weight(gen, N, K, block=block)
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    want = reference_fp8_linear(x.double(), wq, ws, block, None if b is None else b.double())
    got = triton_fp8_linear(*_to(kdev, x, wq, ws), block, None if b is None else b.to(kdev), config=cfg)
    assert got.dtype == dtype and got.shape == (T, N)
    _check_rows(got, want, dtype, f"fp8_linear T={T} N={N} K={K}", seed, flips=0)


def test_fp8_linear_edges(kdev):
    wq, ws = block_quantize(torch.randn(8, 32))
    assert triton_fp8_linear(torch.zeros(0, 32, device=kdev), wq.to(kdev), ws.to(kdev)).shape == (0, 8)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        triton_fp8_linear(torch.zeros(2, 32, device=kdev), torch.zeros(8, 32, device=kdev), ws.to(kdev))
    with pytest.raises(ValueError, match="weight_scale_inv|scale_inv"):
        triton_fp8_linear(torch.zeros(2, 32, device=kdev), wq.to(kdev), torch.ones(2, 2, device=kdev))
    with pytest.raises(ValueError, match="Bk must be a power of two"):
        triton_fp8_linear(torch.zeros(2, 32, device=kdev), wq.to(kdev), torch.ones(1, 1, device=kdev), (128, 96))
    with pytest.raises(ValueError, match="x_TK.dtype"):
        triton_fp8_linear(torch.zeros(2, 32, dtype=torch.float64, device=kdev), wq.to(kdev), ws.to(kdev))


# -- fused MoE -----------------------------------------------------------------------------------------------------------
def _routing(gen, T, G, K, mode):
    ids = torch.stack([torch.randperm(G, generator=gen)[:K] for _ in range(T)]) if T else torch.zeros(0, K, dtype=torch.long)
    if mode == "one":  # every token's first expert is expert 0: one expert full, others nearly empty
        ids[:, 0] = 0
    if mode == "neg":  # -1 ids (an EP receive buffer's "not here"), no map
        ids[::2, -1] = -1
    return ids


def _expert_map(gen, G, E):
    m = torch.full((G,), -1, dtype=torch.int32)
    m[torch.randperm(G, generator=gen)[:E]] = torch.arange(E, dtype=torch.int32)
    return m


# (T, E local, G global, K, D, I, routing, config, combine, dtype, block)
MOE_CASES = [
    (1, 4, 4, 2, 200, 96, "rand", None, "sum", torch.bfloat16, (128, 128)),  # decode, empty experts, ragged D and I
    (3, 6, 6, 4, 130, 160, "rand", None, "atomic", torch.float32, (128, 128)),  # top-4; up rows I+n straddle scale blocks
    (17, 5, 12, 3, 256, 128, "map", K32, "sum", torch.float16, (128, 128)),  # remote experts; 4 K steps per group
    (33, 8, 8, 1, 136, 64, "one", None, "atomic", torch.bfloat16, (128, 128)),  # top-1, all on expert 0
    (13, 3, 9, 2, 128, 200, "map", BM32, "sum", torch.float32, (128, 128)),  # BM 32, separate down blocks
    (9, 4, 4, 3, 100, 40, "neg", None, "sum", torch.float32, (128, 128)),  # -1 ids; D and I under one group
    (7, 3, 3, 2, 96, 96, "rand", None, "atomic", torch.float32, (64, 64)),  # Bk 64: two groups per gate-up tile
]


def _moe_case(gen, T, E, G, K, D, I, mode, dtype, block):
    """x, the block-quantized experts, the routing (weights, ids, expert map where `mode` is "map") and the float64
    W8A8 reference's answer for them."""
    x = _x(gen, T, D, dtype)
    w13q, w13s = _weight(gen, E, 2 * I, D, block=block)
    w2q, w2s = _weight(gen, E, D, I, block=block)
    ids = _routing(gen, T, G, K, mode)
    weights = torch.rand(T, K, generator=gen)
    emap = _expert_map(gen, G, E) if mode == "map" else None
    want = reference_fused_moe_fp8(x.double(), w13q, w13s, w2q, w2s, weights.double(), ids, emap, block)
    return x, w13q, w13s, w2q, w2s, weights, ids, emap, want


@pytest.mark.parametrize("T,E,G,K,D,I,mode,cfg,combine,dtype,block", MOE_CASES)
def test_fused_moe_fp8_matches_reference(T, E, G, K, D, I, mode, cfg, combine, dtype, block, gen, kdev, seed,
                                         nan_buffer):
    x, w13q, w13s, w2q, w2s, weights, ids, emap, want = _moe_case(gen, T, E, G, K, D, I, mode, dtype, block)
    out = nan_buffer((T, D), dtype, kdev)
    got = triton_fused_moe_fp8(*_to(kdev, x, w13q, w13s, w2q, w2s, weights, ids, emap), block, out=out, config=cfg,
                               combine=combine)
    assert got is out
    _check_rows(got, want, dtype, f"fused_moe_fp8 T={T} E={E} K={K} {mode} {combine}", seed, flips=2)
    if mode == "map":  # tokens whose every expert is remote come out exactly zero
        remote = (emap[ids] < 0).all(1)
        assert (got.cpu()[remote] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_fp8_with_the_clamped_swiglu_matches_reference(gen, kdev, seed, dtype):
    """Hunyuan Hy4-preview-FP8's routed experts: silu(min(gate, limit)) * clamp(up, -limit, limit) in the gate-up
    epilogue, before h is quantized; the reference applies the same MoEActivation, and differs from plain SiLU at a
    limit the values cross (a kernel that ignored the activation would be caught)."""
    from moelink.kernels.moe import MoEActivation

    T, E, K, D, I, block = 11, 4, 2, 128, 96, (128, 128)
    act = MoEActivation("silu_clamp", limit=0.3)
    x = _x(gen, T, D, dtype)
    w13q, w13s = _weight(gen, E, 2 * I, D, block=block)
    w2q, w2s = _weight(gen, E, D, I, block=block)
    ids = _routing(gen, T, E, K, "rand")
    weights = torch.rand(T, K, generator=gen)
    want = reference_fused_moe_fp8(x.double(), w13q, w13s, w2q, w2s, weights.double(), ids, None, block,
                                   activation=act)
    plain = reference_fused_moe_fp8(x.double(), w13q, w13s, w2q, w2s, weights.double(), ids, None, block)
    assert (want - plain).norm() > 0.1 * want.norm()
    got = triton_fused_moe_fp8(*_to(kdev, x, w13q, w13s, w2q, w2s, weights, ids), None, block, activation=act)
    _check_rows(got, want, dtype, "fused_moe_fp8 silu_clamp", seed, flips=2)


# (T, E, K, D, I, dtype, block): experts whose width is not a multiple of Bn, gate and up quantized apart (as
# per-expert checkpoints ship them) and up placed at U = I rounded up to Bn (moe/expert_weights.Fp8BlockExperts).
PADDED_CASES = [
    (5, 4, 2, 200, 160, torch.bfloat16, (128, 128)),  # 160 = 1.25 blocks: up at 256, 96 gap rows
    (9, 3, 3, 130, 96, torch.float32, (128, 128)),  # 96 < one block: up at 128
    (7, 3, 2, 96, 40, torch.float32, (64, 64)),  # Bk 64: up at 64
]


@pytest.mark.parametrize("T,E,K,D,I,dtype,block", PADDED_CASES)
def test_fused_moe_fp8_up_rows_on_a_block_boundary(T, E, K, D, I, dtype, block, gen, kdev, seed):
    """w13q [E, U + I, D]: gate [0, I), gap, up [U, U + I), each piece with its own block scales. The gap rows
    hold NaN codes: neither the kernel nor the reference may read them."""
    bn = block[0]
    U = -(-I // bn) * bn
    (gq, gs), (uq, us) = _weight(gen, E, I, D, block=block), _weight(gen, E, I, D, block=block)
    w13q = torch.full((E, U + I, D), 0x7F, dtype=torch.uint8).view(FP8_DTYPE)  # 0x7F: e4m3fn's NaN
    w13q[:, :I], w13q[:, U:] = gq, uq
    w13s = torch.cat([gs, us], dim=1)
    w2q, w2s = _weight(gen, E, D, I, block=block)
    x = _x(gen, T, D, dtype)
    ids = _routing(gen, T, E, K, "rand")
    weights = torch.rand(T, K, generator=gen)
    want = reference_fused_moe_fp8(x.double(), w13q, w13s, w2q, w2s, weights.double(), ids, None, block)
    # The oracle of the reference itself: gate and up as two float64 matmuls on the pieces alone.
    xa = fake_quant_activation(x.double(), block[1]).double()
    oracle = torch.zeros(T, D, dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            e = int(ids[t, k])
            g = xa[t] @ block_dequantize(gq[e], gs[e], block, torch.float64).t()
            u = xa[t] @ block_dequantize(uq[e], us[e], block, torch.float64).t()
            h = fake_quant_activation((torch.nn.functional.silu(g) * u)[None], block[1]).double()[0]
            oracle[t] += weights[t, k].double() * (h @ block_dequantize(w2q[e], w2s[e], block, torch.float64).t())
    assert torch.allclose(want, oracle, rtol=1e-12, atol=1e-12)
    got = triton_fused_moe_fp8(*_to(kdev, x, w13q, w13s, w2q, w2s, weights, ids), None, block)
    _check_rows(got, want, dtype, f"fused_moe_fp8 padded up rows I={I} U={U}", seed, flips=2)


@pytest.mark.parametrize("T,E,K,D,I,dtype", [(11, 4, 2, 130, 96, torch.float32), (6, 3, 2, 128, 128, torch.bfloat16)])
def test_fused_moe_fp8_clamped_swiglu(T, E, K, D, I, dtype, gen, kdev, seed):
    """MiniMax-M3's experts: the clamped SwiGLU (swiglu_oai, limit 7) in the FP8 gate-up epilogue, before h is
    quantized; the reference applies the same activation (and differs from SiLU's)."""
    from moelink.kernels.moe import MoEActivation

    act = MoEActivation("swiglu_oai", 1.702, 7.0)
    x = _x(gen, T, D, dtype) * 4  # gate and up past the clamp for some channels
    w13q, w13s = _weight(gen, E, 2 * I, D)
    w2q, w2s = _weight(gen, E, D, I)
    ids = _routing(gen, T, E, K, "rand")
    weights = torch.rand(T, K, generator=gen)
    want = reference_fused_moe_fp8(x.double(), w13q, w13s, w2q, w2s, weights.double(), ids, None, activation=act)
    silu = reference_fused_moe_fp8(x.double(), w13q, w13s, w2q, w2s, weights.double(), ids, None)
    assert not torch.allclose(want, silu)
    got = triton_fused_moe_fp8(*_to(kdev, x, w13q, w13s, w2q, w2s, weights, ids), None, activation=act)
    _check_rows(got, want, dtype, f"fused_moe_fp8 swiglu_oai T={T}", seed, flips=2)


def _check_rows(got, want, dtype, what, seed, flips):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got64 = got.double().cpu()
    # A float64 result beyond the output dtype's range (float16: 65504; random inputs reach it now and then) is
    # rounded to +-inf or +-max by the kernel's store, as it must be: those rows are checked for that, not compared.
    over = want.abs() > torch.finfo(dtype).max
    if over.any():
        limit = torch.finfo(dtype).max
        assert ((got64[over].abs() >= limit) & (torch.sign(got64[over]) == torch.sign(want[over]))).all(), \
            f"{what}: out-of-range values not rounded to +-inf (seed={seed})"
        keep = ~over.any(1)
        got64, want = got64[keep], want[keep]
    assert torch.isfinite(got64).all(), f"{what}: non-finite output (seed={seed})"
    if got64.numel() == 0:
        return
    norm = want.norm(dim=1)
    err = (got64 - want).norm(dim=1) / norm.clamp_min(1e-30)
    err = torch.where(norm == 0, (got64 != 0).any(1).double(), err)  # zero rows must be exactly zero
    loose = int((err > ROW_TOL[dtype]).sum())
    assert loose <= flips, f"{what}: {loose} rows over {ROW_TOL[dtype]:g} (worst {err.max():.3g}) (seed={seed})"
    assert err.max() <= (FLIP_TOL if flips else ROW_TOL[dtype]), f"{what}: row error {err.max():.3g} (seed={seed})"


def test_fused_moe_fp8_edges(kdev):
    E, D, I = 2, 200, 32  # w13 scales [2, 1, 2], w2 scales [2, 2, 1]: swapping them is caught
    w13q, w13s = block_quantize(torch.randn(E, 2 * I, D))
    w2q, w2s = block_quantize(torch.randn(E, D, I))
    ws = _to(kdev, w13q, w13s, w2q, w2s)
    out = triton_fused_moe_fp8(torch.zeros(0, D, device=kdev), *ws, torch.zeros(0, 2, device=kdev),
                               torch.zeros(0, 2, dtype=torch.long, device=kdev))
    assert out.shape == (0, D)
    x, w, ids = torch.zeros(3, D, device=kdev), torch.zeros(3, 2, device=kdev), torch.zeros(3, 2, dtype=torch.long, device=kdev)
    with pytest.raises(ValueError, match="combine"):
        triton_fused_moe_fp8(x, *ws, w, ids, combine="max")
    with pytest.raises(ValueError, match="w2q_EDI_scale_inv|scale_inv"):
        triton_fused_moe_fp8(x, ws[0], ws[1], ws[2], ws[1], w, ids)
    with pytest.raises(ValueError, match="w13q_EFD.dtype"):
        triton_fused_moe_fp8(x, ws[0].float(), *ws[1:], w, ids)
    with pytest.raises(ValueError, match="do not fit"):
        triton_fused_moe_fp8(torch.zeros(3, D + 1, device=kdev), *ws, w, ids)
    with pytest.raises(ValueError, match="do not fit"):  # fewer than 2I rows: no room for gate and up
        triton_fused_moe_fp8(x, ws[0][:, : 2 * I - 16], ws[1][:, :1], *ws[2:], w, ids)


def test_fp8_launch_configs():
    """CPU takes the interpreter file; GPUs the default file (rows per expert) whose every bucket keeps the FP8
    constraints; the wrapper adapts a bf16-style config to the weight block."""
    from moelink.kernels import moe_config

    cpu = get_fp8_moe_config(8, 64, 3, 2, torch.device("cpu"))
    assert cpu.BLOCK_SIZE_M == 16
    _, buckets = moe_config.load_config_file(str(moe_config.CONFIG_DIR / "fp8_moe_default.json"))
    for _, c in buckets:
        up_bn, up_bk, _, down_bk = _blocks(c, 128)
        assert up_bn % 128 == 0 and 128 % up_bk == 0 and 128 % down_bk == 0
        assert c.up.BLOCK_SIZE_K <= 128 and c.down.BLOCK_SIZE_K <= 128
    assert _blocks(_cfg(bn=64, bk=256), 128)[:2] == (128, 128)


def test_ops_registers_fp8_kernels():
    from moelink.kernels import fp8
    from moelink.kernels.ops import ReferenceKernels, TritonKernels

    ref = ReferenceKernels()
    assert ref.fp8_linear is fp8.reference_fp8_linear and ref.fused_moe_fp8 is fp8.reference_fused_moe_fp8
    tri = TritonKernels()
    assert tri.fp8_linear is triton_fp8_linear and tri.fused_moe_fp8 is triton_fused_moe_fp8


# (T, E local, G global, K, D, I, routing, dtype, block): the tiny path's GEMVs (kernels/triton_moe_fp8_tiny.py)
TINY_FP8_CASES = [
    (1, 4, 4, 2, 200, 96, "rand", torch.bfloat16, (128, 128)),  # decode: ragged D and I, one partial group each
    (2, 6, 6, 4, 130, 160, "rand", torch.float32, (128, 128)),  # up rows I + n straddle a scale block
    (2, 5, 12, 3, 256, 128, "map", torch.float16, (128, 128)),  # remote experts
    (4, 3, 3, 2, 96, 96, "neg", torch.float32, (64, 64)),  # Bk 64, -1 ids
]
# The small blocks' point is BLOCK_K (several K tiles, the last ragged, under a scale group); their BLOCK_N of 8 (was
# 2 / 4) divides every case's rows as 2 did, so no narrowing or ragged row mask changes, at a quarter of the programs.
TINY_FP8 = moe_config.TinyConfig.from_dict({"max_pairs": 16, "BLOCK_SIZE_N": 8, "BLOCK_SIZE_K": 64, "num_warps": 1,
                                            "num_stages": 1, "down": {"BLOCK_SIZE_N": 8, "BLOCK_SIZE_K": 32}})


# The remote experts' case at the small blocks only: the expert map is read the same at any BLOCK_N, and the
# default blocks' one-row programs (4x the small blocks' programs, 1.1 CPU-s more interpreted) run the other three.
TINY_FP8_PARAMS = [(*case, blocks) for case in TINY_FP8_CASES for blocks in ("default", "small")
                   if not (case[6] == "map" and blocks == "default")]


@pytest.mark.parametrize("T,E,G,K,D,I,mode,dtype,block,blocks", TINY_FP8_PARAMS)
def test_fused_moe_fp8_tiny_matches_reference(T, E, G, K, D, I, mode, dtype, block, blocks, gen, kdev, seed, nan_buffer,
                                              monkeypatch):
    """The FP8 tiny path (x and h group-quantized, two unrolled e4m3 GEMVs) against the W8A8 reference: its own
    DEFAULT_TINY_FP8 blocks (one K tile here) and small ones (several K tiles, the last ragged; BLOCK_K under a scale
    group); it never aligns."""
    from moelink.kernels import triton_moe

    monkeypatch.setattr(triton_moe, "moe_align_block_size", lambda *a, **k: pytest.fail("tiny path aligned"))
    x, w13q, w13s, w2q, w2s, weights, ids, emap, want = _moe_case(gen, T, E, G, K, D, I, mode, dtype, block)
    cfg = None if blocks == "default" else MoELaunchConfig(16, GemmConfig(64, 64, 1, 4, 3), GemmConfig(64, 64, 1, 4, 3),
                                                           TINY_FP8)
    out = nan_buffer((T, D), dtype, kdev)
    got = triton_fused_moe_fp8(*_to(kdev, x, w13q, w13s, w2q, w2s, weights, ids, emap), block, out=out, config=cfg,
                               path="tiny" if blocks == "default" else "auto")
    assert got is out
    _check_rows(got, want, dtype, f"fused_moe_fp8 tiny T={T} E={E} K={K} {mode} {blocks}", seed, flips=2)
    if mode == "map":
        assert (got.cpu()[(emap[ids] < 0).all(1)] == 0).all()


def test_fused_moe_fp8_tiny_narrows_rows_to_one_scale_block(gen, kdev, seed, nan_buffer):
    """Weight blocks of 24 rows (Bn any size) and I = 40 (up rows start mid-block) with 16-row GEMV tiles: the
    kernels fold one weight scale a K group into a tile, so BLOCK_N is narrowed to rows that share it (8 here,
    both GEMVs); without the narrowing a tile's rows past a block boundary would take their neighbour block's scale."""
    from moelink.kernels.triton_moe_fp8_tiny import fp8_tiny_down_block_n, fp8_tiny_up_block_n

    assert fp8_tiny_up_block_n(16, 24, 40) == 8 and fp8_tiny_up_block_n(2, 128, 2048) == 2
    assert fp8_tiny_down_block_n(16, 8, 200, 4, 1, 24) == 8  # (8 tokens x 13 programs: no grid narrowing)
    T, E, K, D, I, block = 8, 4, 2, 200, 40, (24, 32)
    x = _x(gen, T, D, torch.float32)
    w13q, w13s = _weight(gen, E, 2 * I, D, block=block)
    w2q, w2s = _weight(gen, E, D, I, block=block)
    ids, weights = _routing(gen, T, E, K, "rand"), torch.rand(T, K, generator=gen)
    want = reference_fused_moe_fp8(x.double(), w13q, w13s, w2q, w2s, weights.double(), ids, None, block)
    wide = moe_config.TinyConfig.from_dict({"max_pairs": 16, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 32, "num_warps": 1,
                                            "num_stages": 1, "down": {"BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 16}})
    cfg = MoELaunchConfig(16, GemmConfig(64, 64, 1, 4, 3), GemmConfig(64, 64, 1, 4, 3), wide)
    got = triton_fused_moe_fp8(*_to(kdev, x, w13q, w13s, w2q, w2s, weights, ids, None), block,
                               out=nan_buffer((T, D), torch.float32, kdev), config=cfg)
    _check_rows(got, want, torch.float32, "fused_moe_fp8 tiny Bn=24", seed, flips=2)
