"""The MXFP4 fused MoE's decode and prefill paths in the interpreter: the two GEMVs (kernels/triton_moe_mxfp4_tiny.py)
and the dequantize-once pre-pass (kernels/triton_mxfp4_dequant.py + the float sorted path), against
reference_fused_moe_mxfp4 in float64 (exact dequantization); the selector `mxfp4_path` and the MXFP4 config files.

Ragged shapes (D, I multiples of 32 but not of BLOCK_K; I off BLOCK_N), biases, swiglu_oai and SiLU, expert maps with
remote experts, EP holes (id -1), out-of-range ids; NaN-poisoned output and workspaces (conftest.py)."""
from __future__ import annotations

import pytest
import torch

from moelink.kernels import moe_align
from moelink.kernels.moe import SILU, MoEActivation
from moelink.kernels.moe_config import MoELaunchConfig, TinyConfig
from moelink.kernels.mxfp4 import mxfp4_dequantize, mxfp4_quantize, reference_fused_moe_mxfp4
from moelink.kernels.triton_moe import triton_fused_moe
from moelink.kernels.triton_moe_mxfp4 import mxfp4_config_table, mxfp4_path, triton_fused_moe_mxfp4
from moelink.kernels.triton_mxfp4_dequant import dequantize_experts
from tests.helpers.moe_cases import DTYPES, SMALL, expert_map, routing

OAI = MoEActivation("swiglu_oai", alpha=1.702, limit=7.0)
# Interpreter-sized GEMV blocks: BLOCK_K of 64 values (8 words, 2 scale groups) so D=96 / I=96 leave masked tails.
TINY = TinyConfig.from_dict({"max_pairs": 12, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 64, "num_warps": 4, "num_stages": 1,
                             "down": {"BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 64}})
WITH_TINY = MoELaunchConfig(SMALL.BLOCK_SIZE_M, SMALL.up, SMALL.down, TINY)
DEQUANT = MoELaunchConfig(SMALL.BLOCK_SIZE_M, SMALL.up, SMALL.down, None, True)


def _layer(gen, T, E, G, K, D, I, mode, dtype, biases):
    w13q, w13s = mxfp4_quantize(torch.randn(E, 2 * I, D, generator=gen) / D**0.5 * 2)
    w2q, w2s = mxfp4_quantize(torch.randn(E, D, I, generator=gen) / I**0.5)
    b13 = torch.randn(E, 2 * I, generator=gen).to(dtype) if biases in ("both", "b13") else None
    b2 = torch.randn(E, D, generator=gen).to(dtype) if biases in ("both", "b2") else None
    x = (torch.randn(T, D, generator=gen) * 2).to(dtype)
    ids = routing(gen, T, G, K, "one" if mode == "one" else "rand")
    weights = torch.rand(T, K, generator=gen)
    emap = expert_map(gen, G, E) if mode == "map" else None
    return dict(x=x, w=(w13q, w13s, w2q, w2s), weights=weights, ids=ids, emap=emap, b13=b13, b2=b2)


def _want(L, act):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return reference_fused_moe_mxfp4(L["x"].double(), *L["w"], L["weights"].double(), L["ids"], L["emap"],
                                     b13_EF=d(L["b13"]), b2_ED=d(L["b2"]), activation=act)


def _run(L, kdev, **kw):
    dev = lambda t: None if t is None else t.to(kdev)  # noqa: E731
    return triton_fused_moe_mxfp4(dev(L["x"]), *map(dev, L["w"]), dev(L["weights"]), dev(L["ids"]), dev(L["emap"]),
                                  b13_EF=dev(L["b13"]), b2_ED=dev(L["b2"]), **kw)


def _no_align(monkeypatch):
    fail = lambda *a, **k: pytest.fail("the MXFP4 tiny path aligned")  # noqa: E731
    monkeypatch.setattr(moe_align, "moe_align_block_size", fail)
    monkeypatch.setattr("moelink.kernels.triton_moe.moe_align_block_size", fail)


# (T, E local, G global, K, D, I, routing, activation, biases): decode sizes, ragged on purpose.
TINY_CASES = [
    (1, 4, 4, 2, 64, 32, "rand", OAI, "both"),  # one token, even K loops (D = BLOCK_K)
    (3, 6, 6, 3, 96, 96, "rand", OAI, "both"),  # D, I off BLOCK_K (masked word tails)
    (5, 16, 16, 2, 32, 32, "rand", SILU, "none"),  # more experts than pairs, one scale group a row
    (4, 3, 3, 3, 64, 64, "one", SILU, "b13"),  # every token on expert 0 (repeat reads of one expert)
    (3, 5, 12, 4, 96, 32, "map", OAI, "b2"),  # remote experts via the map: wholly remote tokens -> 0
    (2, 3, 9, 3, 128, 96, "map", OAI, "both"),  # gpt-oss-like: biases, clamped swiglu, remote experts
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("T,E,G,K,D,I,mode,act,biases", TINY_CASES)
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_tiny_mxfp4_matches_reference(T, E, G, K, D, I, mode, act, biases, dtype, gen, kdev, check, nan_buffer,
                                      monkeypatch):
    L = _layer(gen, T, E, G, K, D, I, mode, dtype, biases)
    L["ids"][::2, -1] = -1  # EP receive-buffer holes
    want = _want(L, act)
    _no_align(monkeypatch)
    out = nan_buffer((T, D), dtype, kdev)
    got = _run(L, kdev, activation=act, out=out, config=WITH_TINY)  # path="auto": T*K <= 12
    assert got is out
    check(got, want, dtype, f"tiny mxfp4 T={T} E={E} K={K} {mode} {act.kind} biases={biases}")
    if mode == "map":
        remote = ((L["emap"][L["ids"].clamp(min=0)] < 0) | (L["ids"] < 0)).all(1)
        assert (got.cpu()[remote] == 0).all()


def test_tiny_mxfp4_out_of_range_ids_touch_nothing(gen, kdev, check):
    """Ids >= G count as 'no expert here', as on the sorted path: never a weight row past E."""
    L = _layer(gen, 4, 5, 7, 3, 64, 32, "map", torch.float32, "both")
    bad = L["ids"].clone()
    bad[0, 1], bad[2, 0], bad[3, 2] = 7, 40, 1 << 20
    want = _want(dict(L, ids=torch.where(bad < 7, bad, torch.zeros_like(bad)),
                      weights=L["weights"] * (bad < 7).to(L["weights"].dtype)), OAI)
    got = _run(dict(L, ids=bad), kdev, activation=OAI, config=WITH_TINY, path="tiny")
    check(got, want, torch.float32, "tiny mxfp4 with out-of-range ids")


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_tiny_mxfp4_is_deterministic_and_ignores_combine(gen, kdev):
    L = _layer(gen, 3, 6, 6, 4, 64, 32, "rand", torch.bfloat16, "both")
    a = _run(L, kdev, activation=OAI, config=WITH_TINY, path="tiny")
    b = _run(L, kdev, activation=OAI, config=WITH_TINY, path="tiny", combine="atomic")
    assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:overflow encountered")  # 2**127 * 6 is inf in fp32: both sides, on purpose
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_prepass_is_the_reference_dequantization(dtype, gen, kdev):
    """Every byte value, every (realistic) exponent, ragged N and K: bit-identical to mxfp4_dequantize. fp32 also
    takes the subnormal scales 2**-127 and 2**-126; 16-bit outputs start at 2**-125 (a bf16/fp16 subnormal result
    of a quantized checkpoint needs a scale below any nonzero group's)."""
    E, N, S = 2, 19, 17  # K = 544: one full 512-value tile and a masked one
    q = torch.arange(E * N * S * 16, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(E, N, S, 16)
    lo = 0 if dtype == torch.float32 else 2
    s = torch.randint(lo, 255, (E, N, S), dtype=torch.uint8, generator=gen)
    s[0, 0, :4] = torch.tensor([lo, lo + 1, 127, 254], dtype=torch.uint8)
    out = torch.full((E, N, S * 32), float("nan"), dtype=dtype, device=kdev)
    got = dequantize_experts(q.to(kdev), s.to(kdev), dtype, out=out)
    want = mxfp4_dequantize(q, s, dtype)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert got is out and torch.equal(got.cpu().view(bits), want.view(bits))


# (T, E local, G global, K, D, I, routing, activation, biases, combine): prefill-ish sizes, ragged
DEQUANT_CASES = [
    (13, 6, 6, 3, 96, 64, "rand", OAI, "both", "sum"),
    (14, 5, 12, 4, 64, 96, "map", OAI, "both", "sum"),  # expert map, remote experts, holes
    (17, 4, 4, 2, 32, 32, "one", SILU, "none", "atomic"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("T,E,G,K,D,I,mode,act,biases,combine", DEQUANT_CASES)
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_dequant_path_matches_reference_and_the_float_path(T, E, G, K, D, I, mode, act, biases, combine, dtype, gen,
                                                           kdev, check, nan_buffer):
    L = _layer(gen, T, E, G, K, D, I, mode, dtype, biases)
    L["ids"][::3, -1] = -1
    want = _want(L, act)
    out = nan_buffer((T, D), dtype, kdev)
    got = _run(L, kdev, activation=act, out=out, config=DEQUANT, combine=combine)  # path="auto": DEQUANT bucket
    assert got is out
    check(got, want, dtype, f"dequant mxfp4 T={T} E={E} {mode} {act.kind}")
    if combine == "sum":  # exactly the float sorted path on the dequantized weights (same kernels, same order)
        w13q, w13s, w2q, w2s = L["w"]
        dev = lambda t: None if t is None else t.to(kdev)  # noqa: E731
        flt = triton_fused_moe(dev(L["x"]), dev(mxfp4_dequantize(w13q, w13s, dtype)),
                               dev(mxfp4_dequantize(w2q, w2s, dtype)), dev(L["weights"]), dev(L["ids"]),
                               dev(L["emap"]), b13_EF=dev(L["b13"]), b2_ED=dev(L["b2"]), activation=act, config=SMALL,
                               path="sorted")
        assert torch.equal(got.cpu(), flt.cpu())


@pytest.mark.parametrize("T,K,path", [(4, 3, "tiny"), (6, 2, "tiny"), (5, 3, "sorted"), (13, 1, "sorted")])
def test_selector_picks_the_path_from_pairs(T, K, path):
    """tiny exactly when T*K <= TINY.max_pairs (12); beyond it the bucket's DEQUANT flag decides; `path` forces."""
    assert mxfp4_path(WITH_TINY, T, K) == path
    assert mxfp4_path(MoELaunchConfig(16, SMALL.up, SMALL.down, TINY, True), T, K) == ("tiny" if path == "tiny"
                                                                                      else "dequant")
    assert mxfp4_path(WITH_TINY, T, K, "dequant") == "dequant"


def test_mxfp4_config_files_load_and_hold_all_three_paths():
    for name in ("NVIDIA_H100_80GB_HBM3", "cpu"):
        key, buckets = mxfp4_config_table(128, 2880, name)
        assert key == "rows_per_expert"
        assert buckets[0][1].tiny is not None and buckets[0][1].tiny.up.BLOCK_SIZE_K >= 32
        assert any(c.dequant for _, c in buckets) and not buckets[0][1].dequant
    cfg = MoELaunchConfig.from_dict({**SMALL.to_dict(), "DEQUANT": True})
    assert cfg.dequant and MoELaunchConfig.from_dict(cfg.to_dict()) == cfg and "DEQUANT" not in SMALL.to_dict()
    with pytest.raises(ValueError, match="DEQUANT"):
        MoELaunchConfig.from_dict({**SMALL.to_dict(), "DEQUANT": 1})


def test_bad_paths_and_blocks_are_named(gen, kdev):
    L = _layer(gen, 2, 3, 3, 2, 32, 32, "rand", torch.float32, "none")
    with pytest.raises(ValueError, match="path"):
        _run(L, kdev, path="fast")
    narrow = MoELaunchConfig(16, SMALL.up, SMALL.down, TinyConfig.from_dict(
        {"max_pairs": 8, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 16, "num_warps": 4, "num_stages": 1}))
    with pytest.raises(ValueError, match="BLOCK_SIZE_K=16"):
        _run(L, kdev, config=narrow)
    with pytest.raises(ValueError, match="out"):
        dequantize_experts(*L["w"][:2], torch.float32, out=torch.zeros(1, device=kdev))
