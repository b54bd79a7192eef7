"""The persistent tile scheduler (config PERSISTENT) and the TMA tensor-descriptor loads (config TMA) of the sorted
MoE GEMMs, bf16 and FP8, in the interpreter at small ragged shapes: every key combination against the float64
reference and bit for bit against the plain path (same products, same order), dead blocks never visited, grids,
the TMA fallback, and the config keys. About 40 s on 2 idle cores (interpreted calls of ~0.5 s).
"""
from __future__ import annotations

import pytest
import torch

from moelink.kernels import moe_schedule, triton_moe
from moelink.kernels.fp8 import reference_fused_moe_fp8
from moelink.kernels.moe import reference_fused_moe
from moelink.kernels.moe_config import MoELaunchConfig
from moelink.kernels.triton_moe import triton_fused_moe
from moelink.kernels.triton_moe_fp8 import triton_fused_moe_fp8

from tests.kernels.test_triton_fp8 import _check_rows, _weight, _x
from tests.kernels.test_triton_moe import _expert_map, _routing

BASE = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 2, "num_warps": 4, "num_stages": 2}


def _cfg(persistent=0, tma=False, fused=False, ws=False, **extra) -> MoELaunchConfig:
    return MoELaunchConfig.from_dict({**BASE, "PERSISTENT": persistent, "TMA": tma, "FUSED_GATE_UP": fused,
                                      "WARP_SPECIALIZE": ws, **extra})


# The key combinations (PERSISTENT, TMA, FUSED_GATE_UP, WARP_SPECIALIZE) besides the plain path's: each new key
# alone, with the fused gate-up tile, the keys together, and more than one program per SM. (The interpreter runs a
# warp-specialized loop as a plain one: these check that the key reaches the kernels and changes no result; what
# the compiler makes of it is in the sm_90 compile report.)
COMBOS = [(1, False, False, False), (1, False, True, False), (0, True, False, False), (0, True, True, False),
          (1, True, False, False), (2, True, True, False), (0, True, False, True), (1, True, True, True)]
# (T, E local, G global, K, D, I, routing, combine, dtype): D and I are multiples of 8, so bf16 rows are 16-byte
# multiples and TMA really runs (tma_ok), but not of the blocks (masked and zero-padded tails).
CASES = [
    (1, 4, 4, 2, 48, 40, "rand", "sum", torch.bfloat16),  # one token: most experts empty, most blocks dead
    (13, 6, 6, 3, 48, 40, "neg", "atomic", torch.float32),  # padding ids (-1) in the routing, atomic combine
    (23, 5, 12, 4, 40, 24, "map", "sum", torch.bfloat16),  # remote experts (expert map), wholly remote tokens
]


def _inputs(gen, T, E, G, K, D, I, mode, dtype):
    x = torch.randn(T, D, generator=gen).to(dtype)
    w13 = (torch.randn(E, 2 * I, D, generator=gen) / D**0.5).to(dtype)
    w2 = (torch.randn(E, D, I, generator=gen) / I**0.5).to(dtype)
    ids = _routing(gen, T, G, K, "rand")
    if mode == "neg":
        ids[::2, 1] = -1
    weights = torch.rand(T, K, generator=gen)
    emap = _expert_map(gen, G, E) if mode == "map" else None
    return x, w13, w2, weights, ids, emap


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_new_keys_match_reference_and_plain_path(case, gen, kdev, check, nan_buffer):
    """Every combination on one input set (the plain path's output computed once per gate-up layout)."""
    T, E, G, K, D, I, mode, combine, dtype = CASES[case]
    x, w13, w2, weights, ids, emap = _inputs(gen, T, E, G, K, D, I, mode, dtype)
    args = [None if t is None else t.to(kdev) for t in (x, w13, w2, weights, ids, emap)]
    assert moe_schedule.tma_ok(args[1]) and moe_schedule.tma_ok(args[2])  # the descriptor path, not the fallback
    want = reference_fused_moe(x.double(), w13.double(), w2.double(), weights.double(), ids, emap)
    plain = {f: triton_fused_moe(*args, config=_cfg(0, False, f), combine=combine) for f in (False, True)}
    for persistent, tma, fused, ws in COMBOS:
        what = f"fused_moe PERSISTENT={persistent} TMA={tma} FUSED={fused} WS={ws} {mode} {combine}"
        got = triton_fused_moe(*args, out=nan_buffer((T, D), dtype, kdev), config=_cfg(persistent, tma, fused, ws),
                               combine=combine)
        check(got, want, dtype, what)
        if combine == "sum":  # (atomics add in any order) the keys change the schedule and the loads, not the math
            assert torch.equal(got, plain[fused]), what
        if emap is not None:
            assert (got.cpu()[(emap[ids] < 0).all(1)] == 0).all(), what


def test_persistent_never_visits_dead_blocks(gen, kdev, check, monkeypatch):
    """Blocks past the live row count are made to look like real work (expert 0, real pair ids): the persistent
    loop must not touch them (it reads the live count on the device); the one-program-per-tile grid, which trusts
    expert id -1 to mark them, double-counts them, which shows the trap is armed."""
    T, E, K, D, I = 4, 8, 2, 32, 16
    x, w13, w2, weights, ids, _ = _inputs(gen, T, E, E, K, D, I, "rand", torch.float32)
    ids[:, 0], ids[:, 1] = 3, 5  # 8 pairs on 2 experts: 2 live blocks of the bound's 8
    real_align = triton_moe.moe_align_block_size

    def trapped(ids_P, bm, num_experts, emap):
        sorted_R, expert_B, rows_1 = real_align(ids_P, bm, num_experts, emap)
        live = int(rows_1) // bm  # host sync: test only
        assert live < expert_B.numel()
        expert_B[live:] = 0
        sorted_R[live * bm:] = torch.arange(sorted_R.numel() - live * bm, dtype=sorted_R.dtype) % ids_P.numel()
        return sorted_R, expert_B, rows_1

    monkeypatch.setattr(triton_moe, "moe_align_block_size", trapped)
    args = [t.to(kdev) for t in (x, w13, w2, weights, ids)]
    want = reference_fused_moe(x.double(), w13.double(), w2.double(), weights.double(), ids)
    got = triton_fused_moe(*args, config=_cfg(1), combine="atomic")
    check(got, want, torch.float32, "persistent with poisoned dead blocks")
    bad = triton_fused_moe(*args, config=_cfg(0), combine="atomic")
    assert not torch.allclose(bad.double().cpu(), want, rtol=1e-3, atol=1e-3)


FP8_CASES = [  # (T, E, G, K, D, I, routing, combine, dtype): D, I multiples of 16 (fp8 rows 16-byte aligned)
    (1, 4, 4, 2, 256, 96, "rand", "sum", torch.bfloat16),  # decode: empty experts, ragged I
    (13, 3, 9, 2, 128, 160, "map", "atomic", torch.float32),  # remote experts; up rows I+n straddle scale blocks
]


@pytest.mark.parametrize("persistent,tma,ws", [(1, False, False), (0, True, False), (2, True, False), (1, True, True)])
@pytest.mark.parametrize("case", range(len(FP8_CASES)))
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_fp8_new_keys_match_reference_and_plain_path(case, persistent, tma, ws, gen, kdev, seed, nan_buffer):
    """(fp8 rows are 16-byte multiples at these D and I: TMA really runs.)"""
    T, E, G, K, D, I, mode, combine, dtype = FP8_CASES[case]
    x = _x(gen, T, D, dtype)
    w13q, w13s = _weight(gen, E, 2 * I, D)
    w2q, w2s = _weight(gen, E, D, I)
    ids = _routing(gen, T, G, K, "rand")
    weights = torch.rand(T, K, generator=gen)
    emap = _expert_map(gen, G, E) if mode == "map" else None
    args = [None if t is None else t.to(kdev) for t in (x, w13q, w13s, w2q, w2s, weights, ids, emap)]
    cfg = MoELaunchConfig.from_dict({**BASE, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128, "num_stages": 1,
                               "PERSISTENT": persistent, "TMA": tma, "WARP_SPECIALIZE": ws})
    got = triton_fused_moe_fp8(*args, out=nan_buffer((T, D), dtype, kdev), config=cfg, combine=combine)
    want = reference_fused_moe_fp8(x.double(), w13q, w13s, w2q, w2s, weights.double(), ids, emap)
    _check_rows(got, want, dtype, f"fused_moe_fp8 P={persistent} TMA={tma} {mode}", seed, flips=2)
    plain_cfg = MoELaunchConfig.from_dict({**cfg.to_dict(), "PERSISTENT": 0, "TMA": False, "WARP_SPECIALIZE": False})
    plain = triton_fused_moe_fp8(*args, config=plain_cfg, combine=combine)
    if combine == "sum":
        assert torch.equal(got, plain)


def test_gemm_grid_is_bounded_by_sms_and_tiles():
    cpu = torch.device("cpu")
    sms = moe_schedule.num_sms(cpu)
    assert moe_schedule.gemm_grid(1000, 0, cpu) == 1000  # one program per tile of the bound
    assert moe_schedule.gemm_grid(1000, 1, cpu) == sms
    assert moe_schedule.gemm_grid(1000, 3, cpu) == 3 * sms
    assert moe_schedule.gemm_grid(2, 3, cpu) == 2  # never more programs than tiles
    assert moe_schedule.gemm_grid(0, 1, cpu) == 1
    with pytest.raises(ValueError, match="persistent"):
        moe_schedule.gemm_grid(8, -1, cpu)


def test_tma_ok_falls_back_for_misaligned_tensors():
    assert moe_schedule.tma_ok(torch.zeros(4, 8, 16, dtype=torch.bfloat16))
    assert not moe_schedule.tma_ok(torch.zeros(4, 8, 12, dtype=torch.bfloat16))  # rows of 24 bytes
    assert not moe_schedule.tma_ok(torch.zeros(4, 16, 8).transpose(1, 2))  # last stride not 1
    assert not moe_schedule.tma_ok(torch.zeros(65, dtype=torch.bfloat16)[1:].view(4, 16))  # base off 16 bytes
    assert moe_schedule.tma_ok(torch.zeros(4, 16, dtype=torch.float8_e4m3fn))


def test_config_keys_validate_round_trip_and_override():
    cfg = MoELaunchConfig.from_dict({**BASE, "PERSISTENT": 2, "TMA": True, "down": {**BASE, "PERSISTENT": 0}})
    assert (cfg.up.PERSISTENT, cfg.up.TMA, cfg.down.PERSISTENT, cfg.down.TMA) == (2, True, 0, True)
    assert MoELaunchConfig.from_dict(cfg.to_dict()) == cfg
    plain = MoELaunchConfig.from_dict(BASE)
    assert "PERSISTENT" not in plain.to_dict() and "TMA" not in plain.to_dict()  # files without the keys stay as they were
    for bad in ({"PERSISTENT": -1}, {"PERSISTENT": True}, {"PERSISTENT": 1.5}):
        with pytest.raises(ValueError, match="PERSISTENT"):
            MoELaunchConfig.from_dict({**BASE, **bad})
    with pytest.raises(ValueError, match="TMA"):
        MoELaunchConfig.from_dict({**BASE, "TMA": 1})
    ws = MoELaunchConfig.from_dict({**BASE, "TMA": True, "WARP_SPECIALIZE": True, "down": {**BASE, "TMA": True}})
    assert ws.up.WARP_SPECIALIZE and ws.down.WARP_SPECIALIZE and MoELaunchConfig.from_dict(ws.to_dict()) == ws
    off = MoELaunchConfig.from_dict({**BASE, "TMA": True, "WARP_SPECIALIZE": True,
                                     "down": {**BASE, "TMA": True, "WARP_SPECIALIZE": False}})
    assert not off.down.WARP_SPECIALIZE and MoELaunchConfig.from_dict(off.to_dict()) == off
    with pytest.raises(ValueError, match="WARP_SPECIALIZE=true is invalid without TMA=true"):
        MoELaunchConfig.from_dict({**BASE, "WARP_SPECIALIZE": True})
    with pytest.raises(ValueError, match="WARP_SPECIALIZE"):
        MoELaunchConfig.from_dict({**BASE, "TMA": True, "WARP_SPECIALIZE": "yes"})
