"""tune_moe's guarantees with fake timings (no Triton): a seeded search that moves one axis at a time, any
failing candidate skipped, pruning before compiling, never a config slower than its seed on re-timing, the
published seeds translated, the tiny and schedule (PERSISTENT/TMA) axes. Split from test_gpu_session.py."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from moelink.benchmarks import moe_kernels, tune_moe
from moelink.kernels.moe_config import GemmConfig, MoELaunchConfig

# -- tune_moe's guarantees, with fake timings (no Triton) -------------------------------------------------------------------
SHAPE = moe_kernels.SMOKE_SHAPES["smoke-e8"]


def fake_times(monkeypatch, times):
    """time_config returns times(cfg) (seconds) and records what it was asked; no kernel runs."""
    asked = []

    def fake(cfg, sets, timer, iters, want=None):
        asked.append(cfg)
        return times(cfg)

    monkeypatch.setattr(tune_moe, "time_config", fake)
    return asked


def run_bucket(T=12, space="quick"):
    return tune_moe.tune_bucket(SHAPE, T, torch.bfloat16, torch.device("cpu"), None, tune_moe.SPACES[space], 1,
                                deadline=float("inf"), log=lambda *a: None)


def test_tune_keeps_the_seed_when_nothing_beats_it(monkeypatch):
    seeds = dict(tune_moe.seeds_for(SHAPE, 12, torch.device("cpu")))
    best_seed = seeds["default.json"]
    asked = fake_times(monkeypatch, lambda cfg: 1.0 if cfg == best_seed else 2.0)
    cfg, t, info = run_bucket()
    assert cfg == best_seed and t == 1.0 and info["kept_seed"] and info["seed"] == "default.json"
    assert asked[: len(seeds)] == list(seeds.values())  # every seed is timed first
    assert info["tried"] > len(seeds)  # and the search ran


def test_tune_moves_one_axis_at_a_time_and_confirms(monkeypatch):
    seeds = dict(tune_moe.seeds_for(SHAPE, 12, torch.device("cpu")))
    base = next(iter(seeds.values()))  # all seeds tie: the first (the current config) is the seed
    assert all(c.down.num_warps != 8 for c in seeds.values())
    faster = lambda cfg: cfg.down.num_warps == 8  # noqa: E731
    fake_times(monkeypatch, lambda cfg: 0.5 if faster(cfg) else 1.0)
    cfg, t, info = run_bucket()
    assert faster(cfg) and t == 0.5 and not info["kept_seed"] and info["seed"] == "current"
    assert cfg == replace(base, down=replace(base.down, num_warps=8))  # the seed, one axis moved


def test_tune_never_writes_a_config_slower_than_the_seed_on_re_timing(monkeypatch):
    """A candidate that looked faster in the search but is slower head to head loses to the seed."""
    seeds = dict(tune_moe.seeds_for(SHAPE, 12, torch.device("cpu")))
    base = seeds["default.json"]
    calls = {}

    def times(cfg):
        n = calls[cfg] = calls.get(cfg, 0) + 1
        if cfg == base:
            return 1.0
        if cfg.down.num_warps == 8:
            return 0.5 if n == 1 else 1.5  # lucky once, slower after
        return 2.0

    fake_times(monkeypatch, times)
    cfg, t, info = run_bucket()
    assert cfg == base and info["kept_seed"] and t == 1.0


def test_tune_skips_candidates_that_fail_for_any_reason(monkeypatch, capsys):
    from moelink.kernels import triton_moe

    cfg = MoELaunchConfig(16, GemmConfig(32, 32, 1, 4, 2), GemmConfig(32, 32, 1, 4, 2))
    run_once = lambda fn, sets, iters, warmup: fn(*sets[0])  # noqa: E731  (a Timer that runs the call once)

    class WeirdCompilerError(Exception):
        pass

    for exc in (WeirdCompilerError("unsupported layout\ndetails"), KeyError("BLOCK_K"), AssertionError("bad tile")):
        def boom(*a, _e=exc, **k):
            raise _e

        monkeypatch.setattr(triton_moe, "triton_fused_moe", boom)
        assert tune_moe.time_config(cfg, [(None,) * 5], run_once, 1) == float("inf")
        printed = capsys.readouterr().out
        assert f"skipped {json.dumps(cfg.to_dict())}: {type(exc).__name__}: " in printed
    # A CUDA fault poisons the context: nothing after it could be timed, so it stops the run.
    monkeypatch.setattr(triton_moe, "triton_fused_moe",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA error: an illegal memory access")))
    with pytest.raises(tune_moe.CudaFault):
        tune_moe.time_config(cfg, [(None,) * 5], run_once, 1)


def test_tune_prunes_before_compiling():
    D, I = 7168, 2048
    ok = MoELaunchConfig(64, GemmConfig(64, 64, 8, 4, 3), GemmConfig(128, 64, 8, 8, 3))
    assert tune_moe.feasible(ok, D, I) is None
    too_much_smem = MoELaunchConfig(128, GemmConfig(256, 256, 1, 8, 5), ok.down)
    assert "shared memory" in tune_moe.feasible(too_much_smem, D, I)
    too_many_regs = MoELaunchConfig(128, GemmConfig(128, 32, 1, 4, 2), ok.down)
    assert "accumulator registers" in tune_moe.feasible(too_many_regs, D, I)
    too_wide = MoELaunchConfig(16, GemmConfig(64, 64, 1, 4, 2), ok.down)
    assert "wider" in tune_moe.feasible(too_wide, 64, 32)


def test_published_seeds_are_translated_for_this_kernel():
    """vLLM's gate|up GEMM is one [M, 2I] product: the same tile width is BLOCK_N/2 per accumulator here."""
    E, K, D, I = moe_kernels.SHAPES["qwen3-30b-a3b"]
    ((bucket, cfg, src),) = tune_moe.published_seeds(E, I, D, 1000)
    assert bucket == 1024 and src == "vllm E=128,N=768"
    assert cfg.up.BLOCK_SIZE_N * 2 == cfg.down.BLOCK_SIZE_N == 256 and cfg.BLOCK_SIZE_M == 64
    E, K, D, I = moe_kernels.SHAPES["deepseek-v3"]
    assert tune_moe.published_seeds(E, I, D, 64) == []  # none published for it: default + current only
    for src, p in tune_moe.PUBLISHED.items():  # each one loads as a valid config
        for b, vals in p["configs"].items():
            MoELaunchConfig.from_dict(tune_moe.from_vllm(*vals).to_dict(), f"{src}[{b}]")


def test_tune_tiny_axis_moves_one_step_at_a_time():
    """The tiny-batch path as a tune axis: off -> on at the bucket's pair count; on -> off or one GEMV field moved;
    with it on, the sorted path's axes are not searched (they do not run); none of it above TINY_TUNE_MAX_PAIRS."""
    from dataclasses import replace

    from moelink.kernels.moe_config import DEFAULT_TINY_FLOAT

    base = MoELaunchConfig(16, GemmConfig(64, 64, 1, 4, 3), GemmConfig(64, 64, 1, 4, 3))
    space, axes = tune_moe.SPACES["quick"], tune_moe.TINY_AXES["quick"]
    off = list(tune_moe.neighbours(base, space, [16], 8, axes))
    assert off[0] == replace(base, tiny=replace(DEFAULT_TINY_FLOAT, max_pairs=8))
    assert all(c.tiny is None for c in off[1:]) and len(off) > 1  # the sorted axes follow
    on = off[0]
    moved = list(tune_moe.neighbours(on, space, [16], 8, axes))
    assert moved[0] == base  # tiny off again
    assert all(c.tiny is not None and c.tiny.max_pairs == 8 and (c.BLOCK_SIZE_M, c.up, c.down) == (16, base.up, base.down)
               for c in moved[1:])
    assert len(moved) - 1 == sum(len([v for v in vals if v != getattr(getattr(on.tiny, k.split("_", 1)[0]), k.split("_", 1)[1])])
                                 for k, vals in axes.items())
    assert all(c.tiny is None for c in tune_moe.neighbours(base, space, [16], tune_moe.TINY_TUNE_MAX_PAIRS + 1, axes))


def test_tune_prunes_tiny_tiles_that_would_spill_or_convert():
    """The float tiny GEMVs hold fp32 accumulators in registers beside their unrolled loads, and need a tile at least
    as wide as their warps' 16-byte lanes (else the activation row converts layout every tile): DEFAULT_TINY_FLOAT
    passes, every value of the quick axes around it is either tried or pruned by one of the two rules."""
    from dataclasses import replace

    from moelink.benchmarks.tune_space import tiny_feasible
    from moelink.kernels.moe_config import DEFAULT_TINY_FLOAT, TinyGemm

    base = MoELaunchConfig(16, GemmConfig(64, 64, 1, 4, 3), GemmConfig(64, 64, 1, 4, 3), DEFAULT_TINY_FLOAT)
    assert tune_moe.feasible(base, 2048, 768, 2, 8) is None
    fat_down = replace(base, tiny=replace(DEFAULT_TINY_FLOAT, down=TinyGemm(4, 1024, 1, 1)))
    assert "tiny down: 128 fp32 accumulator" in tune_moe.feasible(fat_down, 2048, 768, 2, 8)
    narrow_up = replace(base, tiny=replace(DEFAULT_TINY_FLOAT, up=TinyGemm(2, 512, 4, 1)))
    assert "warps would lie along N" in tune_moe.feasible(narrow_up, 2048, 768, 2, 8)
    assert tune_moe.feasible(narrow_up, 2048, 768, 4, 8) is None  # fp32 activations: 4 values a lane, 512 columns
    fat_up = replace(base, tiny=replace(DEFAULT_TINY_FLOAT, up=TinyGemm(4, 2048, 2, 1)))
    assert "tiny up" in tune_moe.feasible(fat_up, 2048, 768, 2, 8)
    # The CPU smoke turns the tiny path on at wider GEMVs (fewer interpreted programs) that are timed, not pruned,
    # at every smoke shape: the smoke runs the tiny kernels; a GPU run starts at DEFAULT_TINY_FLOAT.
    assert tune_moe.Bf16Kind().tiny_start is None
    smoke = tune_moe.Bf16Kind(smoke=True)
    for E, K, D, I in tune_moe.SMOKE_SHAPES.values():
        first = next(tune_moe.neighbours(replace(base, tiny=None), {}, [16], K, tune_moe.TINY_AXES["smoke"],
                                         smoke.tiny_start))
        assert first.tiny.up.BLOCK_SIZE_N == 8 and tiny_feasible(first.tiny, torch.bfloat16.itemsize) is None


def test_graph_timing_prefers_replays_and_falls_back_to_eager():
    class FakeTimer:
        def __init__(self, graph_s):
            self.graph_s, self.calls = graph_s, []

        def graph(self, fn, arg_sets, iters=30):
            self.calls.append(("graph", iters))
            return self.graph_s

        def __call__(self, fn, arg_sets, iters=30, warmup=3):
            self.calls.append(("eager", iters, warmup))
            return 9.0

    t = FakeTimer(0.5)
    assert tune_moe.GraphTiming(t)(None, [()], iters=7, warmup=1) == 0.5 and t.calls == [("graph", 7)]
    t = FakeTimer(None)  # capture failed (e.g. a host sync): eager
    assert tune_moe.GraphTiming(t)(None, [()], iters=7, warmup=1) == 9.0 and t.calls == [("graph", 7), ("eager", 7, 1)]


def test_tune_schedule_axes_move_each_gemm_and_prune_misaligned_tma():
    """PERSISTENT and TMA are searched per GEMM, one step from the current config, like the block axes; a TMA
    candidate whose operand rows are not 16-byte multiples is pruned (the kernel would fall back to pointers)."""
    from dataclasses import replace

    base = MoELaunchConfig(16, GemmConfig(64, 64, 1, 4, 3), GemmConfig(64, 64, 1, 4, 3))
    space = tune_moe.SPACES["quick"]
    cands = list(tune_moe.neighbours(base, space, [16]))
    for part in ("up", "down"):
        g = getattr(base, part)
        for p in space["PERSISTENT"][1:]:
            assert replace(base, **{part: replace(g, PERSISTENT=p)}) in cands
        assert replace(base, **{part: replace(g, TMA=True)}) in cands
    assert all(c.up.PERSISTENT == 0 or c.down == base.down for c in cands)  # one axis of one GEMM at a time
    tma = replace(base, up=replace(base.up, TMA=True))
    assert tune_moe.feasible(tma, 2048, 768) is None
    assert "TMA" in tune_moe.feasible(tma, 2884, 768)  # D = 2884: bf16 rows of 5768 bytes
    assert tune_moe.feasible(replace(base, down=replace(base.down, TMA=True)), 2048, 772) is not None


def test_tune_warp_specialize_axis_moves_the_down_gemm_only_and_needs_tma():
    """WARP_SPECIALIZE is the down GEMM's axis (the gate-up GEMM ignores the key); without TMA it is pruned, so
    the same kernel is never timed twice."""
    from dataclasses import replace

    base = MoELaunchConfig(64, GemmConfig(64, 64, 1, 4, 3, TMA=True), GemmConfig(64, 64, 1, 4, 3, TMA=True))
    cands = list(tune_moe.neighbours(base, tune_moe.SPACES["quick"], [64]))
    ws = replace(base, down=replace(base.down, WARP_SPECIALIZE=True))
    assert ws in cands and not any(c.up.WARP_SPECIALIZE for c in cands)
    assert tune_moe.feasible(ws, 2048, 768) is None
    no_tma = replace(ws, down=replace(ws.down, TMA=False))
    assert "WARP_SPECIALIZE needs TMA" in tune_moe.feasible(no_tma, 2048, 768)
