"""The tiny-batch fused MoE (kernels/triton_moe_tiny.py: two launches, no alignment, no sum pass) against
reference_fused_moe in float64, in the interpreter on CPU; ragged shapes, NaN-poisoned outputs and workspaces
(conftest.py). Also: the config threshold picks the path from T*K alone, and the down GEMV's narrowing."""
from __future__ import annotations

import pytest
import torch

from moelink.kernels import moe_align, triton_moe_tiny
from moelink.kernels.moe import SILU, MoEActivation, reference_fused_moe
from moelink.kernels.moe_config import DEFAULT_TINY, DEFAULT_TINY_FLOAT, MoELaunchConfig, TinyConfig
from moelink.kernels.triton_moe import triton_fused_moe

from tests.helpers.moe_cases import DTYPES, SMALL, expert_map as _expert_map, routing as _routing

# Interpreter-sized GEMV blocks: BLOCK_K below D and I so the K loop runs several times and its tail is masked.
TINY = TinyConfig.from_dict({"max_pairs": 12, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 16, "num_warps": 4, "num_stages": 2,
                             "down": {"BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32}})
WITH_TINY = MoELaunchConfig(SMALL.BLOCK_SIZE_M, SMALL.up, SMALL.down, TINY)
OAI = MoEActivation("swiglu_oai", alpha=1.702, limit=7.0)

# (T, E local, G global, K, D, I, routing, activation, biases): ragged on purpose.
CASES = [
    (1, 4, 4, 2, 32, 16, "rand", SILU, "none"),  # decode: one token, even K loops
    (3, 6, 6, 3, 40, 24, "rand", SILU, "none"),  # D and I off BLOCK_K (masked tails), I off BLOCK_N
    (5, 16, 16, 2, 48, 40, "rand", SILU, "none"),  # more experts than pairs
    (4, 3, 3, 3, 32, 16, "one", SILU, "none"),  # every token on expert 0 (repeat reads of one expert)
    (3, 5, 12, 4, 40, 24, "map", SILU, "none"),  # remote experts via the map: wholly remote tokens -> 0
    (3, 4, 4, 2, 36, 20, "rand", OAI, "both"),  # gpt-oss: clamped swiglu, both biases, ragged D and I
    (2, 3, 9, 3, 32, 16, "map", OAI, "b2"),  # down bias only, with remote experts
]


def _inputs(gen, T, E, G, K, D, I, mode, dtype, biases="none"):
    x = (torch.randn(T, D, generator=gen) * 2).to(dtype)
    w13 = (torch.randn(E, 2 * I, D, generator=gen) / D**0.5).to(dtype)
    w2 = (torch.randn(E, D, I, generator=gen) / I**0.5).to(dtype)
    ids = _routing(gen, T, G, K, "one" if mode == "one" else "rand")
    weights = torch.rand(T, K, generator=gen)
    emap = _expert_map(gen, G, E) if mode == "map" else None
    b13 = torch.randn(E, 2 * I, generator=gen).to(dtype) if biases in ("both", "b13") else None
    b2 = torch.randn(E, D, generator=gen).to(dtype) if biases in ("both", "b2") else None
    return x, w13, w2, weights, ids, emap, b13, b2


def _want(x, w13, w2, weights, ids, emap, b13, b2, act=SILU):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return reference_fused_moe(x.double(), w13.double(), w2.double(), weights.double(), ids, emap, b13_EF=d(b13),
                               b2_ED=d(b2), activation=act)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("T,E,G,K,D,I,mode,act,biases", CASES)
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_tiny_matches_reference(T, E, G, K, D, I, mode, act, biases, dtype, gen, kdev, check, nan_buffer, monkeypatch):
    x, w13, w2, weights, ids, emap, b13, b2 = _inputs(gen, T, E, G, K, D, I, mode, dtype, biases)
    ids[::2, -1] = -1  # EP receive-buffer holes
    want = _want(x, w13, w2, weights, ids, emap, b13, b2, act)
    # The tiny path must not align: any call to the sort kernels fails the test.
    monkeypatch.setattr(moe_align, "moe_align_block_size", lambda *a, **k: pytest.fail("tiny path aligned"))
    monkeypatch.setattr("moelink.kernels.triton_moe.moe_align_block_size",
                        lambda *a, **k: pytest.fail("tiny path aligned"))
    out = nan_buffer((T, D), dtype, kdev)
    dev = lambda t: None if t is None else t.to(kdev)  # noqa: E731
    got = triton_fused_moe(dev(x), dev(w13), dev(w2), dev(weights), dev(ids), dev(emap), out=out, config=WITH_TINY,
                           b13_EF=dev(b13), b2_ED=dev(b2), activation=act)  # path="auto": T*K <= 12
    assert got is out
    check(got, want, dtype, f"tiny fused_moe T={T} E={E} K={K} {mode} {act.kind} biases={biases}")
    if mode == "map":
        remote = ((emap[ids.clamp(min=0)] < 0) | (ids < 0)).all(1)
        assert (got.cpu()[remote] == 0).all()


def test_tiny_out_of_range_ids_touch_nothing(gen, kdev, check):
    """Ids >= E (>= G with a map) count as 'no expert here', as on the sorted path: never a weight row past E."""
    T, E, G, K, D, I = 4, 5, 7, 3, 32, 16
    x, w13, w2, weights, ids, emap, _, _ = _inputs(gen, T, E, G, K, D, I, "map", torch.float32)
    bad = ids.clone()
    bad[0, 1], bad[2, 0], bad[3, 2] = G, 40, 1 << 20
    keep = (bad < G).to(weights.dtype)
    want = _want(x, w13, w2, weights * keep, torch.where(bad < G, bad, torch.zeros_like(bad)), emap, None, None)
    got = triton_fused_moe(*(t.to(kdev) for t in (x, w13, w2, weights, bad, emap)), config=WITH_TINY, path="tiny")
    check(got, want, torch.float32, "tiny fused_moe with out-of-range ids")


def test_tiny_is_deterministic_and_ignores_combine(gen, kdev):
    """One fixed summation order: the same bits run to run, with either combine argument."""
    x, w13, w2, weights, ids, _, _, _ = _inputs(gen, 3, 6, 6, 4, 32, 16, "rand", torch.bfloat16)
    args = [t.to(kdev) for t in (x, w13, w2, weights, ids)]
    a = triton_fused_moe(*args, config=WITH_TINY, path="tiny")
    b = triton_fused_moe(*args, config=WITH_TINY, path="tiny", combine="atomic")
    assert torch.equal(a, b)


@pytest.mark.parametrize("T,K,expect_tiny", [(4, 3, True), (6, 2, True), (5, 3, False), (13, 1, False)])
def test_threshold_picks_the_path_from_pairs(T, K, expect_tiny, gen, kdev, check, monkeypatch):
    """path='auto': tiny exactly when T*K <= TINY.max_pairs (12); both paths give the reference's answer."""
    calls = []
    real = triton_moe_tiny.tiny_fused_moe
    monkeypatch.setattr(triton_moe_tiny, "tiny_fused_moe", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, w13, w2, weights, ids, _, _, _ = _inputs(gen, T, 6, 6, K, 32, 16, "rand", torch.float32)
    got = triton_fused_moe(*(t.to(kdev) for t in (x, w13, w2, weights, ids)), config=WITH_TINY)
    assert bool(calls) == expect_tiny
    check(got, _want(x, w13, w2, weights, ids, None, None, None), torch.float32, f"auto path T={T} K={K}")
    calls.clear()
    triton_fused_moe(*(t.to(kdev) for t in (x, w13, w2, weights, ids)), config=WITH_TINY, path="sorted")
    assert not calls
    triton_fused_moe(*(t.to(kdev) for t in (x, w13, w2, weights, ids)), config=SMALL, path="tiny")  # DEFAULT_TINY
    assert calls


def test_down_block_n_narrows_to_fill_the_sms():
    # Qwen3 decode on an H100: 1 token x 2048 / 16 = 128 programs < 264 -> 8 (256 programs, the floor).
    assert triton_moe_tiny.down_block_n(16, 1, 2048, 132) == 8
    assert triton_moe_tiny.down_block_n(64, 1, 7168, 132) == 16  # 448 programs >= 264
    assert triton_moe_tiny.down_block_n(16, 8, 2048, 132) == 16  # enough tokens: the config's width
    assert triton_moe_tiny.down_block_n(8, 1, 64, 132) == 8  # never below 8


def test_gemv_block_n_narrows_to_fill_the_sms_with_warps():
    """The float down GEMV narrows to one row a program until its grid gives GEMV_WARPS_PER_SM (16) warps an SM."""
    assert triton_moe_tiny.gemv_block_n(2, 1, 2048, 132, 1) == 1  # qwen3 decode: 1,024 one-warp programs < 2,112
    assert triton_moe_tiny.gemv_block_n(2, 1, 7168, 132, 1) == 2  # deepseek-v3: 3,584 programs, enough
    assert triton_moe_tiny.gemv_block_n(8, 1, 4096, 132, 4) == 4  # 4 warps a program: 1,024 x 4 >= 2,112
    assert triton_moe_tiny.gemv_block_n(2, 8, 2048, 132, 1) == 2  # eight tokens: the config's width
    assert triton_moe_tiny.gemv_block_n(1, 1, 64, 132, 1) == 1  # never below one row


@pytest.mark.parametrize("T,D,I", [(1, 40, 24), (3, 72, 40)])  # D, I off every power of two: ragged last tiles
def test_default_float_blocks_match_reference(T, D, I, gen, kdev, check, nan_buffer):
    """DEFAULT_TINY_FLOAT (what path="tiny" runs without a TINY entry): few-row programs, BLOCK_K clamped to the
    dimension's power of two; at one token the down width narrows to one row on the interpreter's 4 'SMs'."""
    x, w13, w2, weights, ids, _, _, _ = _inputs(gen, T, 6, 6, 3, D, I, "rand", torch.bfloat16)
    out = nan_buffer((T, D), torch.bfloat16, kdev)
    got = triton_fused_moe(*(t.to(kdev) for t in (x, w13, w2, weights, ids)), out=out, config=SMALL, path="tiny")
    check(got, _want(x, w13, w2, weights, ids, None, None, None), torch.bfloat16, f"default float tiny T={T} D={D}")
    assert DEFAULT_TINY_FLOAT.down.BLOCK_SIZE_N == 2 and (triton_moe_tiny.gemv_block_n(2, T, D, 4, 1) == 1) == (T == 1)


@pytest.mark.parametrize("max_bodies,D,I,up_steps", [(1, 40, 72, (1, 3)), (2, 64, 72, (2, 2)), (2, 40, 64, (1, 3)),
                                                    (5, 40, 24, (3, 1))])
def test_k_in_several_unrolled_steps_matches_reference(max_bodies, D, I, up_steps, gen, kdev, check, nan_buffer,
                                                       monkeypatch):
    """Where a dimension has more tiles than a step unrolls (UnrolledK.max_bodies, the down GEMV's 3 pairs counted),
    K runs in several whole steps, every tile masked when they do not divide the dimension: ragged and even D and
    I, one to three steps each (I = 72: three steps of one 32-wide tile, the last ragged)."""
    monkeypatch.setattr(triton_moe_tiny, "UNROLLED", triton_moe_tiny.UnrolledK(max_bodies=max_bodies))
    T, E, K = 3, 6, 3
    x, w13, w2, weights, ids, _, b13, b2 = _inputs(gen, T, E, E, K, D, I, "rand", torch.bfloat16, "both")
    ids[1, 0] = -1
    out = nan_buffer((T, D), torch.bfloat16, kdev)
    dev = lambda t: t.to(kdev)  # noqa: E731
    got = triton_fused_moe(dev(x), dev(w13), dev(w2), dev(weights), dev(ids), out=out, config=WITH_TINY, path="tiny",
                           b13_EF=dev(b13), b2_ED=dev(b2), activation=OAI)
    check(got, _want(x, w13, w2, weights, ids, None, b13, b2, OAI), torch.bfloat16, f"tiny in steps, {max_bodies} bodies")
    bk, extra = triton_moe_tiny.UNROLLED.tiles(16, D)
    assert (extra["K_TILES"], -(-D // (bk * extra["K_TILES"]))) == up_steps
    assert extra["ONE_STEP"] == (up_steps[1] == 1) and extra["EVEN_K"] == (D % (bk * extra["K_TILES"]) == 0)


def test_tiny_config_round_trip_and_errors():
    assert TinyConfig.from_dict(TINY.to_dict()) == TINY and TINY.down.BLOCK_SIZE_N == 32 and TINY.up.BLOCK_SIZE_N == 16
    assert TINY.down.num_warps == 4  # down inherits what it does not override
    cfg = MoELaunchConfig.from_dict({**SMALL.to_dict(), "TINY": TINY.to_dict()})
    assert cfg.tiny == TINY and MoELaunchConfig.from_dict(cfg.to_dict()) == cfg and "TINY" not in SMALL.to_dict()
    assert cfg.uses_tiny(12) and not cfg.uses_tiny(13) and not cfg.uses_tiny(0) and not SMALL.uses_tiny(1)
    for bad, field in (({"max_pairs": -1}, "max_pairs"), ({"max_pairs": True}, "max_pairs"),
                       ({"BLOCK_SIZE_N": 12}, "BLOCK_SIZE_N"), ({"BLOCK_SIZE_N": 0}, "BLOCK_SIZE_N"),
                       ({"BLOCK_SIZE_K": 4}, "BLOCK_SIZE_K"),
                       ({"num_warps": 0}, "num_warps")):
        with pytest.raises(ValueError, match=field):
            MoELaunchConfig.from_dict({**SMALL.to_dict(), "TINY": {**TINY.to_dict(), **bad}})
    with pytest.raises(ValueError, match="TINY"):
        MoELaunchConfig.from_dict({**SMALL.to_dict(), "TINY": 16})
    assert DEFAULT_TINY.max_pairs > 0
    assert TinyConfig.from_dict({**TINY.to_dict(), "BLOCK_SIZE_N": 1}).up.BLOCK_SIZE_N == 1  # one row a program is fine


def test_bad_path_is_named(kdev):
    x = torch.zeros(2, 32, device=kdev)
    with pytest.raises(ValueError, match="path"):
        triton_fused_moe(x, x.new_zeros(2, 32, 32), x.new_zeros(2, 32, 16), x.new_zeros(2, 2),
                         torch.zeros(2, 2, dtype=torch.long, device=kdev), path="fast")


def test_num_sms_reads_the_cuda_device(monkeypatch):
    """The down kernel's block width asks the device's SM count (a CUDA-only path: the CPU tests never reach it, so it
    once imported a name split_planning did not have)."""
    from types import SimpleNamespace

    from moelink.kernels import split_planning, triton_moe_tiny

    split_planning.num_sms.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(multi_processor_count=132))
    assert triton_moe_tiny.num_sms(torch.device("cuda", 0)) == 132
    split_planning.num_sms.cache_clear()
