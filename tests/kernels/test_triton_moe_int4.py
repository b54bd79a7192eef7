"""The INT4 (W4A16, group scales, optional zero points) fused MoE in the interpreter: the decode GEMVs
(kernels/triton_moe_int4_tiny.py) and the per-tile sorted path (kernels/triton_moe_int4.py) against
reference_fused_moe_int4 in float64 (exact dequantization); the reference against compressed-tensors' own
decompression; the selector and the INT4 config files.

Ragged shapes (D, I multiples of the group but not of BLOCK_K; I off BLOCK_N), groups 32 / 64 / 128, symmetric and
with zero points, expert maps with remote experts, EP holes (id -1), out-of-range ids; NaN-poisoned output and
workspaces (conftest.py)."""
from __future__ import annotations

import pytest
import torch

from moelink.kernels import moe_align
from moelink.kernels.int4 import (int4_dequantize, int4_quantize, pack_int4, reference_fused_moe_int4, unpack_int4,
                                  unpack_rows)
from moelink.kernels.moe import SILU
from moelink.kernels.moe_config import MoELaunchConfig, TinyConfig
from moelink.kernels.triton_moe_int4 import int4_config_table, int4_path, triton_fused_moe_int4
from tests.helpers.moe_cases import DTYPES, SMALL, WIDE, expert_map, routing

# Interpreter-sized GEMV blocks: BLOCK_K of 64 values (8 words) so D=96 / I=160 leave masked tails.
TINY = TinyConfig.from_dict({"max_pairs": 12, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 64, "num_warps": 4, "num_stages": 1,
                             "down": {"BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32}})
WITH_TINY = MoELaunchConfig(SMALL.BLOCK_SIZE_M, SMALL.up, SMALL.down, TINY)


def _layer(gen, T, E, G, K, D, I, mode, dtype, group, sym):
    w13 = int4_quantize(torch.randn(E, 2 * I, D, generator=gen) / D**0.5 * 2, group, sym, dtype)
    w2 = int4_quantize(torch.randn(E, D, I, generator=gen) / I**0.5, group, sym, dtype)
    x = (torch.randn(T, D, generator=gen) * 2).to(dtype)
    ids = routing(gen, T, G, K, "one" if mode == "one" else "rand")
    weights = torch.rand(T, K, generator=gen)
    emap = expert_map(gen, G, E) if mode == "map" else None
    return dict(x=x, w13=w13, w2=w2, weights=weights, ids=ids, emap=emap)


def _want(L):
    (q13, s13, z13), (q2, s2, z2) = L["w13"], L["w2"]
    return reference_fused_moe_int4(L["x"].double(), q13, s13.double(), q2, s2.double(), L["weights"].double(),
                                    L["ids"], L["emap"], w13_z_EFS=z13, w2_z_EDS=z2)


def _run(L, kdev, **kw):
    dev = lambda t: None if t is None else t.to(kdev)  # noqa: E731
    (q13, s13, z13), (q2, s2, z2) = L["w13"], L["w2"]
    return triton_fused_moe_int4(dev(L["x"]), dev(q13), dev(s13), dev(q2), dev(s2), dev(L["weights"]), dev(L["ids"]),
                                 dev(L["emap"]), w13_z_EFS=dev(z13), w2_z_EDS=dev(z2), **kw)


F32, BF16, F16 = DTYPES
# (T, E local, G global, K, D, I, routing, group, symmetric, dtype): one dtype a case (the interpreter is slow)
TINY_CASES = [
    (1, 4, 4, 2, 64, 32, "rand", 32, True, BF16),  # one token, even K loops
    (3, 6, 6, 3, 96, 160, "rand", 32, False, F32),  # D, I off BLOCK_K (masked word tails), I off BLOCK_N, zero points
    (2, 3, 3, 3, 128, 64, "one", 64, True, F16),  # every token on expert 0, group 64 (two K steps a group in down)
    (3, 5, 12, 4, 128, 128, "map", 128, False, BF16),  # remote experts via the map, group 128 > BLOCK_K
]


@pytest.mark.parametrize("T,E,G,K,D,I,mode,group,sym,dtype", TINY_CASES)
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_tiny_int4_matches_reference(T, E, G, K, D, I, mode, group, sym, dtype, gen, kdev, check, nan_buffer,
                                     monkeypatch):
    L = _layer(gen, T, E, G, K, D, I, mode, dtype, group, sym)
    L["ids"][::2, -1] = -1  # EP receive-buffer holes
    want = _want(L)
    fail = lambda *a, **k: pytest.fail("the INT4 tiny path aligned")  # noqa: E731
    monkeypatch.setattr(moe_align, "moe_align_block_size", fail)
    monkeypatch.setattr("moelink.kernels.triton_moe.moe_align_block_size", fail)
    out = nan_buffer((T, D), dtype, kdev)
    got = _run(L, kdev, out=out, config=WITH_TINY)  # path="auto": T*K <= 12
    assert got is out
    check(got, want, dtype, f"tiny int4 T={T} E={E} K={K} {mode} g={group} sym={sym}")
    if mode == "map":
        remote = ((L["emap"][L["ids"].clamp(min=0)] < 0) | (L["ids"] < 0)).all(1)
        assert (got.cpu()[remote] == 0).all()


# (T, E local, G global, K, D, I, routing, group, symmetric, config, combine, dtype): prefill-ish sizes, ragged
SORTED_CASES = [
    (13, 6, 6, 3, 96, 64, "rand", 32, True, SMALL, "sum", BF16),
    (12, 5, 12, 4, 64, 96, "map", 32, False, WIDE, "sum", F32),  # BLOCK_K 16: two K steps a group
    (10, 4, 4, 2, 128, 128, "one", 128, False, SMALL, "atomic", F16),  # a group spans four K steps
    (9, 3, 3, 2, 192, 64, "rand", 64, True, SMALL, "sum", F32),
]


@pytest.mark.parametrize("T,E,G,K,D,I,mode,group,sym,cfg,combine,dtype", SORTED_CASES)
def test_sorted_int4_matches_reference(T, E, G, K, D, I, mode, group, sym, cfg, combine, dtype, gen, kdev, check,
                                       nan_buffer):
    L = _layer(gen, T, E, G, K, D, I, mode, dtype, group, sym)
    L["ids"][::3, -1] = -1
    want = _want(L)
    out = nan_buffer((T, D), dtype, kdev)
    got = _run(L, kdev, out=out, config=cfg, combine=combine)  # no TINY in the config: the sorted path
    assert got is out
    check(got, want, dtype, f"sorted int4 T={T} E={E} {mode} g={group} sym={sym}")


def test_tiny_int4_is_deterministic_and_ignores_combine(gen, kdev):
    L = _layer(gen, 3, 6, 6, 4, 64, 32, "rand", torch.bfloat16, 32, False)
    a = _run(L, kdev, config=WITH_TINY, path="tiny")
    b = _run(L, kdev, config=WITH_TINY, path="tiny", combine="atomic")
    assert torch.equal(a, b)


def test_tiny_int4_out_of_range_ids_touch_nothing(gen, kdev, check):
    L = _layer(gen, 4, 5, 7, 3, 64, 32, "map", torch.float32, 32, True)
    bad = L["ids"].clone()
    bad[0, 1], bad[2, 0], bad[3, 2] = 7, 40, 1 << 20
    want = _want(dict(L, ids=torch.where(bad < 7, bad, torch.zeros_like(bad)),
                      weights=L["weights"] * (bad < 7).to(L["weights"].dtype)))
    got = _run(dict(L, ids=bad), kdev, config=WITH_TINY, path="tiny")
    check(got, want, torch.float32, "tiny int4 with out-of-range ids")


@pytest.mark.parametrize("sym", [True, False])
def test_reference_is_compressed_tensors_decompression(sym, gen):
    """Packing, offset-binary nibbles and the zero points' layout, bit for bit against compressed-tensors itself:
    its compressor's output, dequantized here (float64), equals its own decompress (in the scale's float64)."""
    from tests.helpers.int4_checkpoints import compress_weight, _scheme
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    w = torch.randn(24, 96, generator=gen, dtype=torch.float64)
    c = compress_weight(w, sym, 32, torch.float64)
    z = None if sym else unpack_rows(c["weight_zero_point"], 24)
    got = int4_dequantize(c["weight_packed"], c["weight_scale"], z, torch.float64)
    want = PackedQuantizationCompressor.decompress(dict(c), _scheme(sym, 32))["weight"]
    assert torch.equal(got, want.to(torch.float64))
    # A sanity bound only (the check above is the exact one): half a step, plus what clipping the top code and a
    # bf16-rounded scale add at a group's extreme value (seen 0.513 steps with a symmetric scheme).
    assert (got - w).abs().max() <= c["weight_scale"].abs().max() * (0.75 if sym else 1.0) + 1e-12
    u = torch.randint(0, 16, (3, 5, 40), dtype=torch.uint8, generator=gen)
    assert torch.equal(unpack_int4(pack_int4(u)), u)


@pytest.mark.parametrize("T,K,path", [(4, 3, "tiny"), (6, 2, "tiny"), (5, 3, "sorted"), (13, 1, "sorted")])
def test_selector_picks_the_path_from_pairs(T, K, path):
    assert int4_path(WITH_TINY, T, K) == path
    assert int4_path(WITH_TINY, T, K, "sorted") == "sorted"


def test_int4_config_files_load_and_hold_both_paths():
    for name in ("NVIDIA_H100_80GB_HBM3", "cpu"):
        key, buckets = int4_config_table(384, 2048, name)
        assert key == "rows_per_expert"
        assert buckets[0][1].tiny is not None and buckets[0][1].tiny.up.BLOCK_SIZE_K >= 8
        assert any(c.tiny is None for _, c in buckets)


def test_bad_shapes_and_paths_are_named(gen, kdev):
    L = _layer(gen, 2, 3, 3, 2, 64, 32, "rand", torch.float32, 32, False)
    with pytest.raises(ValueError, match="path"):
        _run(L, kdev, path="bogus")
    with pytest.raises(ValueError, match="zero points"):
        _run(dict(L, w2=(L["w2"][0], L["w2"][1], None)), kdev)
    (q13, s13, z13) = L["w13"]
    with pytest.raises(ValueError, match="group size"):
        _run(dict(L, w13=(q13, s13[..., :1].repeat(1, 1, 4), z13[..., :1].repeat(1, 1, 4))), kdev)  # group 16
    with pytest.raises(ValueError, match="int32"):
        reference_fused_moe_int4(L["x"], q13.to(torch.int64), s13, *L["w2"][:2], L["weights"], L["ids"])
