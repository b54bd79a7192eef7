"""The W4A16 MoE's dequantize-once prefill path in the interpreter (kernels/triton_int4_dequant.py's pre-pass into a
reused `DequantWorkspace`, then the float sorted GEMMs; kernels/triton_moe_int4.py "dequant"): the pre-pass bit for
bit against `int4_dequantize`, the path against reference_fused_moe_int4 in float64 at ragged shapes (D, I off the
pre-pass's BLOCK_K and BLOCK_N, groups 32 / 64 / 128, zero points, remote experts, EP holes), beside the per-tile
path on the same layer; the selector choosing by token count from the config files' DEQUANT buckets; the
workspace reused across layers; warm-up's variant plan. NaN-poisoned workspaces (conftest.py)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moelink.kernels.int4 import int4_dequantize, int4_quantize, reference_fused_moe_int4
from moelink.kernels.moe_config import MoELaunchConfig, _pick
from moelink.kernels.moe_variants import MoEShape, moe_variant, plan_moe_variants
from moelink.kernels.triton_int4_dequant import DequantWorkspace, dequantize_int4_experts
from moelink.kernels.triton_moe_int4 import int4_config_table, int4_path, triton_fused_moe_int4
from tests.helpers.moe_cases import DTYPES, SMALL, expert_map, routing

F32, BF16, F16 = DTYPES
DEQUANT = MoELaunchConfig(SMALL.BLOCK_SIZE_M, SMALL.up, SMALL.down, None, dequant=True)


@pytest.mark.parametrize("E,N,K,group,sym,dtype", [
    (3, 40, 96, 32, True, BF16),  # N off BLOCK_N (16), K off BLOCK_K (256): masked rows and words
    (2, 16, 288, 32, False, F16),  # K past one BLOCK_K, zero points
    (2, 24, 384, 128, False, F32),  # group 128: a word's group from k0
    (1, 8, 64, 64, True, BF16),
])
def test_prepass_equals_int4_dequantize(E, N, K, group, sym, dtype, gen, kdev):
    q, s, z = int4_quantize(torch.randn(E, N, K, generator=gen), group, sym, dtype)
    want = int4_dequantize(q, s, z, dtype)
    dev = lambda t: None if t is None else t.to(kdev)  # noqa: E731
    out = torch.full((E, N, K), float("nan"), dtype=dtype, device=kdev)
    got = dequantize_int4_experts(dev(q), dev(s), dev(z), dtype, out)
    assert got is out and torch.equal(got.cpu(), want)
    assert torch.equal(dequantize_int4_experts(dev(q), dev(s), dev(z), dtype).cpu(), want)  # its own scratch
    with pytest.raises(ValueError, match=r"out .* is invalid: must be"):
        dequantize_int4_experts(dev(q), dev(s), dev(z), dtype, out[:, :, :8])
    with pytest.raises(ValueError, match=r"dtype=torch.float64 is invalid"):
        dequantize_int4_experts(dev(q), dev(s), dev(z), torch.float64)


def _layer(gen, T, E, G, K, D, I, mode, dtype, group, sym):
    w13 = int4_quantize(torch.randn(E, 2 * I, D, generator=gen) / D**0.5 * 2, group, sym, dtype)
    w2 = int4_quantize(torch.randn(E, D, I, generator=gen) / I**0.5, group, sym, dtype)
    ids = routing(gen, T, G, K, "rand")
    ids[::3, -1] = -1  # EP receive-buffer holes
    return dict(x=(torch.randn(T, D, generator=gen) * 2).to(dtype), w13=w13, w2=w2, ids=ids,
                weights=torch.rand(T, K, generator=gen), emap=expert_map(gen, G, E) if mode == "map" else None)


def _want(L):
    (q13, s13, z13), (q2, s2, z2) = L["w13"], L["w2"]
    return reference_fused_moe_int4(L["x"].double(), q13, s13.double(), q2, s2.double(), L["weights"].double(),
                                    L["ids"], L["emap"], w13_z_EFS=z13, w2_z_EDS=z2)


def _run(L, kdev, **kw):
    dev = lambda t: None if t is None else t.to(kdev)  # noqa: E731
    (q13, s13, z13), (q2, s2, z2) = L["w13"], L["w2"]
    return triton_fused_moe_int4(dev(L["x"]), dev(q13), dev(s13), dev(q2), dev(s2), dev(L["weights"]), dev(L["ids"]),
                                 dev(L["emap"]), w13_z_EFS=dev(z13), w2_z_EDS=dev(z2), **kw)


# (T, E local, G global, K, D, I, routing, group, symmetric, dtype): ragged prefill-sized batches
CASES = [
    (29, 4, 4, 2, 96, 64, "rand", 32, True, BF16),
    (21, 5, 9, 3, 64, 96, "map", 32, False, F32),  # remote experts, zero points
    (17, 3, 3, 2, 128, 128, "rand", 128, False, F16),
]


@pytest.mark.parametrize("T,E,G,K,D,I,mode,group,sym,dtype", CASES)
def test_dequant_path_matches_reference_beside_the_tile_path(T, E, G, K, D, I, mode, group, sym, dtype, gen, kdev,
                                                             check, nan_buffer):
    L = _layer(gen, T, E, G, K, D, I, mode, dtype, group, sym)
    want = _want(L)
    ws = DequantWorkspace()
    out = nan_buffer((T, D), dtype, kdev)
    got = _run(L, kdev, out=out, config=DEQUANT, workspace=ws)  # path "auto": the bucket says DEQUANT
    assert got is out
    check(got, want, dtype, f"dequant int4 T={T} E={E} {mode} g={group} sym={sym}")
    # the workspace holds exactly this layer's experts in x's dtype, both operands
    assert ws.nbytes() == E * 3 * I * D * torch.empty((), dtype=dtype).element_size()
    tile = _run(L, kdev, config=SMALL, path="sorted")
    check(tile, want, dtype, "per-tile int4 on the same layer")
    if mode == "map":
        remote = ((L["emap"][L["ids"].clamp(min=0)] < 0) | (L["ids"] < 0)).all(1)
        assert (got.cpu()[remote] == 0).all()


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_workspace_is_reused_across_layers_and_grows(gen, kdev, check):
    """Two layers of one shape share the same buffers (no new allocation); a larger one grows them once."""
    ws = DequantWorkspace()
    a = _layer(gen, 19, 4, 4, 2, 64, 32, "rand", F32, 32, True)
    b = _layer(gen, 23, 4, 4, 2, 64, 32, "rand", F32, 32, False)
    check(_run(a, kdev, path="dequant", workspace=ws), _want(a), F32, "layer a")
    ptrs = {n: ws.take(n, (1,), F32, kdev).data_ptr() for n in ("w13", "w2")}
    check(_run(b, kdev, path="dequant", workspace=ws), _want(b), F32, "layer b, same buffers")
    assert {n: ws.take(n, (1,), F32, kdev).data_ptr() for n in ("w13", "w2")} == ptrs
    c = _layer(gen, 9, 6, 6, 2, 96, 64, "rand", F32, 32, True)
    check(_run(c, kdev, path="dequant", workspace=ws), _want(c), F32, "layer c, grown buffers")
    assert ws.nbytes() == 6 * 3 * 64 * 96 * 4


def test_selector_chooses_by_token_count():
    """tiny while T*K fits TINY, dequant in DEQUANT buckets, the per-tile path between: from the files' data."""
    for name, first_dequant in (("cpu", 8), ("NVIDIA_H100_80GB_HBM3", 1024)):
        table = int4_config_table(48, 2048, name)
        assert min(b for b, c in table[1] if c.dequant) == first_dequant
        E, K = 48, 8
        paths = [int4_path(_pick(*table, T, K, E), T, K) for T in range(1, E * first_dequant // K + 2)]
        tiny_end, deq_start = paths.index("sorted"), paths.index("dequant")
        assert set(paths[:tiny_end]) == {"tiny"} and set(paths[tiny_end:deq_start]) == {"sorted"}
        assert set(paths[deq_start:]) == {"dequant"} and deq_start + 1 == E * first_dequant // K  # rows/expert edge
    assert int4_path(DEQUANT, 100, 2, "sorted") == "sorted"


@pytest.mark.parametrize("shape,max_tokens,first_dequant", [
    (MoEShape("int4", 8, 64, 96, 2, "cpu", 4), 80, 32),  # interpreter: 8 rows per expert = 32 tokens x 2 / 8
    (MoEShape("int4", 48, 2048, 7168, 8, "NVIDIA_H100_80GB_HBM3", 132), 8192, 6144),  # Kimi at EP 8: 1024 rows
])
def test_warmup_plan_lists_the_dequant_variant(shape, max_tokens, first_dequant):
    """Start-up warm-up compiles what the selector reaches: every token count's variant is planned from a count
    no larger, the dequant variant (the float table's blocks) from its first token count."""
    from moelink.kernels.moe_config import lookup_moe_config

    plan = plan_moe_variants(shape, max_tokens)
    assert {v.path for _, v in plan} == {"tiny", "sorted", "dequant"}
    assert min(t for t, v in plan if v.path == "dequant") == first_dequant
    assert moe_variant(shape, first_dequant - 1).path == "sorted"
    firsts = {v: t for t, v in plan}
    for T in range(1, max_tokens + 1, 1 if max_tokens < 100 else 37):
        v = moe_variant(shape, T)
        assert firsts[v] <= T, (T, v)
        if v.path == "dequant":
            E, I, K = shape.num_experts, shape.inter, shape.top_k
            assert v.config == replace(lookup_moe_config(E, I, T, K, shape.device_name), tiny=None, dequant=False)
