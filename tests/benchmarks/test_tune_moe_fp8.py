"""tune_moe --dtype fp8 (benchmarks/tune_moe_fp8.py): with fake timings, the search times only what the FP8 wrapper
launches (BLOCK_K <= 128, gate-up BLOCK_N a multiple of 128, no fused tile or tiny path) and each launch once, its
pruning rules, its seeds (the bf16 tuned config adapted); then its --cpu-smoke run in the interpreter: the file's
name and buckets, the recorded tuning with the bf16 time, the RATIO lines, the merge, and the config read back by
get_fp8_moe_config through a config_dir."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from moelink.benchmarks import moe_kernels, tune_moe, tune_moe_fp8
from moelink.kernels import moe_config
from moelink.kernels.moe_config import CONFIG_DIR, GemmConfig, MoELaunchConfig, load_config_file
from tests.helpers.fast_interpreter import interpreter_env
from tests.helpers import zygote

def fp8_config_file_name(*args):
    # (moelink.kernels.triton_* imported when a test runs, not when this module is collected: Triton reads
    # TRITON_INTERPRET when a kernel is defined, and tests/kernels/conftest.py sets it after this directory)
    from moelink.kernels.triton_moe_fp8 import fp8_config_file_name

    return fp8_config_file_name(*args)


def get_fp8_moe_config(*args, **kwargs):
    from moelink.kernels.triton_moe_fp8 import get_fp8_moe_config

    return get_fp8_moe_config(*args, **kwargs)

CPU = torch.device("cpu")
SHAPE = tune_moe_fp8.FP8_SMOKE_SHAPES["smoke-fp8-e8"]
DSV3 = moe_kernels.SHAPES["deepseek-v3"]


def fake_times(monkeypatch, times, bf16_s=2.0):
    """The FP8 timing returns times(cfg) and records what it was asked; the bf16 comparison takes bf16_s."""
    asked = []

    def fake(cfg, sets, timer, iters, want=None):
        asked.append(cfg)
        return times(cfg)

    monkeypatch.setattr(tune_moe_fp8, "time_config_fp8", fake)
    monkeypatch.setattr(tune_moe_fp8, "time_config", lambda cfg, sets, timer, iters, want=None: bf16_s)
    return asked


def run_bucket(T=12, space="quick"):
    return tune_moe.tune_bucket(SHAPE, T, torch.bfloat16, CPU, None, tune_moe.SPACES[space], 1, deadline=float("inf"),
                                log=lambda *a: None, kind=tune_moe_fp8.Fp8Kind())


def launches_as_fp8(cfg) -> bool:
    return (cfg.up.BLOCK_SIZE_N % 128 == 0 and max(cfg.up.BLOCK_SIZE_K, cfg.down.BLOCK_SIZE_K) <= 128
            and not cfg.up.FUSED_GATE_UP and cfg.tiny is None)


def test_fp8_search_times_each_launch_once_in_the_form_the_wrapper_launches(monkeypatch):
    asked = fake_times(monkeypatch, lambda cfg: 1.0)
    cfg, t, info = run_bucket()
    assert info["kept_seed"] and t == 1.0 and info["seed"] == "current"
    assert all(launches_as_fp8(c) for c in asked), [c for c in asked if not launches_as_fp8(c)]
    assert len(asked) == len(set(asked)) == info["tried"]  # nothing timed twice (no confirmation: the seed kept)
    # up BLOCK_N 32/64 (-> 128), BLOCK_K 256 (-> 128) of each GEMM, FUSED_GATE_UP: launches already timed
    assert info["same"] >= 4
    assert info["bf16_ms"] == 2000.0  # the bf16 comparison, recorded in ms


def test_fp8_search_moves_one_axis_and_keeps_what_is_faster_on_re_timing(monkeypatch):
    seeds = dict(tune_moe_fp8.fp8_seeds(SHAPE, 12, CPU))
    base = seeds["current"]
    fake_times(monkeypatch, lambda cfg: 0.5 if cfg.down.num_warps == 8 else 1.0)
    cfg, t, info = run_bucket()
    assert cfg == replace(base, down=replace(base.down, num_warps=8)) and t == 0.5 and not info["kept_seed"]


def test_fp8_pruning_rules():
    E, K, D, I = DSV3
    _, default = load_config_file(str(CONFIG_DIR / "fp8_moe_default.json"))
    for bucket, cfg in default:  # the shipped defaults compile without spills (compile report): none is pruned
        for name in tune_moe_fp8.FP8_SHAPES:
            _, _, d, i = moe_kernels.SHAPES[name]
            assert tune_moe_fp8.feasible_fp8(cfg, d, i) is None, (name, bucket)
    ok = MoELaunchConfig(64, GemmConfig(128, 128, 8, 8, 3), GemmConfig(128, 128, 8, 4, 3))
    assert tune_moe_fp8.feasible_fp8(ok, D, I) is None
    # BLOCK_M 128: two [128, 128] fp32 accumulators are 128 values a thread at 8 warps (bf16 allows it)
    big_m = replace(ok, BLOCK_SIZE_M=128, down=replace(ok.down, num_warps=8))
    assert "accumulator registers" in tune_moe_fp8.feasible_fp8(big_m, D, I)
    assert tune_moe.feasible(big_m, D, I) is None
    # num_stages buffers of 1-byte tiles: 5 x (64 + 256) x 128 B = 200 KB fits, 6 do not
    assert tune_moe_fp8.feasible_fp8(replace(ok, up=replace(ok.up, num_stages=5)), D, I) is None
    assert "shared memory" in tune_moe_fp8.feasible_fp8(replace(ok, up=replace(ok.up, num_stages=6)), D, I)
    # BLOCK_M < 64 compiles to mma.sync: 32 accumulator values a thread (down 32x256 at 4 warps spilled 144 stores),
    # and num_stages - 1 pipelined tiles (6 x 36 KB of a 32x256x128 gate-up tile at 7 stages do not fit, 5 at 6 do)
    m32 = MoELaunchConfig(32, GemmConfig(128, 128, 1, 8, 3), GemmConfig(256, 128, 1, 8, 3))
    assert tune_moe_fp8.feasible_fp8(m32, D, I) is None
    assert "accumulator registers" in tune_moe_fp8.feasible_fp8(replace(m32, down=replace(m32.down, num_warps=4)), D, I)
    assert tune_moe_fp8.feasible_fp8(replace(m32, up=replace(m32.up, num_stages=6)), D, I) is None
    assert "shared memory" in tune_moe_fp8.feasible_fp8(replace(m32, up=replace(m32.up, num_stages=7)), D, I)
    # judged as launched: BLOCK_K 256 is 128
    assert tune_moe_fp8.feasible_fp8(replace(ok, up=replace(ok.up, BLOCK_SIZE_K=256, num_stages=5)), D, I) is None
    # the gate-up BLOCK_N the wrapper forces is never "wider than the GEMM" (a 32-wide I); the down one is
    small = MoELaunchConfig(16, GemmConfig(32, 32, 1, 4, 2), GemmConfig(32, 32, 1, 4, 2))
    assert tune_moe_fp8.feasible_fp8(small, 64, 32) is None
    assert "wider" in tune_moe_fp8.feasible_fp8(replace(small, down=replace(small.down, BLOCK_SIZE_N=128)), 64, 32)
    # TMA needs 16-byte rows: fp8 rows of 7176 bytes are not
    tma = replace(ok, up=replace(ok.up, TMA=True))
    assert tune_moe_fp8.feasible_fp8(tma, D, I) is None and "TMA" in tune_moe_fp8.feasible_fp8(tma, 7176, I)


def test_fp8_seeds_are_current_default_and_the_bf16_tuned_config_adapted(tmp_path):
    E, K, D, I = SHAPE
    bf16 = MoELaunchConfig(64, GemmConfig(64, 256, 8, 4, 3), GemmConfig(256, 256, 1, 4, 4, TMA=True),
                           tiny=moe_config.DEFAULT_TINY)
    moe_config.write_config_file(tmp_path / moe_config.config_file_name(E, I, "cpu"), {16: bf16})
    seeds = tune_moe_fp8.fp8_seeds(SHAPE, 12, CPU, bf16_dir=tmp_path)
    labels = [label for label, _ in seeds]
    assert labels[0] == "current" and labels[-1] == f"bf16 {moe_config.config_file_name(E, I, 'cpu')}"
    assert dict(seeds)["current"] == tune_moe_fp8.launched(get_fp8_moe_config(E, I, 12, K, CPU))
    got = seeds[-1][1]
    # as launched (BK 128, up BN 128, no tiny path), warps doubled until 64 accumulator values a thread
    assert got == MoELaunchConfig(64, GemmConfig(128, 128, 8, 8, 3), GemmConfig(256, 128, 1, 8, 4, TMA=True))
    assert all(launches_as_fp8(c) for _, c in seeds) and len({c for _, c in seeds}) == len(seeds)
    assert [label for label, _ in tune_moe_fp8.fp8_seeds(SHAPE, 12, CPU, bf16_dir=tmp_path / "none")] == labels[:-1]
    # bf16's 128-row tiles: at 8 warps still 128 values a thread in the gate-up GEMM -> BLOCK_M 64
    big = MoELaunchConfig(128, GemmConfig(128, 64, 8, 8, 3), GemmConfig(128, 64, 8, 4, 3))
    assert tune_moe_fp8.adapt_bf16(big) == MoELaunchConfig(64, big.up, replace(big.down, num_warps=8))
    assert tune_moe_fp8.feasible_fp8(tune_moe_fp8.adapt_bf16(big), *DSV3[2:]) is None


# -- the --cpu-smoke run ---------------------------------------------------------------------------------------------------
OLD_BUCKET = 4096
OLD = MoELaunchConfig(64, GemmConfig(128, 128, 8, 8, 3), GemmConfig(128, 128, 8, 4, 3))
TUNED = re.compile(r"^(\S+) T=(\d+): ([0-9.]+) ms with (\{.*\})$", re.M)
RATIO = re.compile(r"^RATIO (\S+) T=(\d+): fp8 ([0-9.]+) ms / bf16 ([0-9.]+) ms = ([0-9.]+) \(bf16/fp8 ([0-9.]+)x\)$", re.M)


@pytest.mark.slow
def test_fp8_cpu_smoke_writes_files_get_fp8_moe_config_reads(tmp_path, monkeypatch):
    """Both smoke shapes at one token: the seeded file keeps its old bucket (merge), the new one also holds the
    smoke bucket it did not tune at the config used until now; the files read back through a config_dir."""
    out = tmp_path / "configs"
    out.mkdir()
    E8, _, _, I8 = SHAPE
    seeded = out / fp8_config_file_name(E8, I8, "cpu")
    moe_config.write_config_file(seeded, {OLD_BUCKET: OLD}, meta=dict(note="seeded by the test"))
    before = set(CONFIG_DIR.iterdir())
    proc = zygote.run([sys.executable, "-m", "moelink.benchmarks.tune_moe", "--cpu-smoke", "--dtype", "fp8",
                           "--tokens", "1", "--out-dir", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env=interpreter_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert set(CONFIG_DIR.iterdir()) == before
    printed = {(m[1], int(m[2])): json.loads(m[4]) for m in TUNED.finditer(proc.stdout)}
    ratios = {(m[1], int(m[2])): m for m in RATIO.finditer(proc.stdout)}
    assert set(printed) == set(ratios) == {(n, 1) for n in tune_moe_fp8.FP8_SMOKE_SHAPES}, proc.stdout
    paths = set()
    for name, (E, K, D, I) in tune_moe_fp8.FP8_SMOKE_SHAPES.items():
        path = out / fp8_config_file_name(E, I, "cpu")
        paths.add(path)
        data = json.loads(path.read_text())
        assert data["dtype"] == "fp8" and data["weight_block"] == [128, 128] and data["shape"]["model"] == name
        buckets = dict(load_config_file(str(path))[1])
        # the seeded file keeps its bucket; the new one holds every smoke bucket (12: the config used until now)
        assert set(buckets) == ({1, OLD_BUCKET} if path == seeded else set(moe_kernels.SMOKE_TOKENS))
        if path == seeded:
            assert buckets[OLD_BUCKET] == OLD
        else:
            assert buckets[12] == get_fp8_moe_config(E, I, 12, K, CPU)
        assert buckets[1].to_dict() == printed[(name, 1)] and launches_as_fp8(buckets[1])
        rec = data["tuning"]["1"]
        assert set(data["tuning"]) == {"1"} and rec["tuned_ms"] <= rec["seed_ms"] and rec["bf16_ms"] > 0
        assert rec["tried"] >= 2 and rec["same_launch"] >= 1  # up BLOCK_N 64 launches as 128: not timed again
        m = ratios[(name, 1)]
        assert float(m[4]) == pytest.approx(rec["bf16_ms"], abs=1e-3) and float(m[5]) == pytest.approx(
            float(m[3]) / float(m[4]), abs=2e-3)
    assert set(out.iterdir()) == paths
    # A GPU named Smoke_GPU with these files: get_fp8_moe_config picks the nearest bucket from the config_dir.
    for path in paths:
        path.rename(path.with_name(path.name.replace("device_name=cpu", "device_name=Smoke_GPU")))
    monkeypatch.setattr(moe_config, "device_name", lambda device: "Smoke_GPU")
    for name, (E, K, D, I) in tune_moe_fp8.FP8_SMOKE_SHAPES.items():
        assert get_fp8_moe_config(E, I, 2, K, CPU, config_dir=out).to_dict() == printed[(name, 1)]
    assert get_fp8_moe_config(E8, I8, 3000, 2, CPU, config_dir=out) == OLD
    assert get_fp8_moe_config(E8, I8, 3000, 2, CPU, config_dir=tmp_path) != OLD  # (no file there: the defaults)


def test_tuned_fp8_files_are_compile_report_cases(tmp_path, monkeypatch):
    """compile_cases.compile_fp8 launches every bucket of a tuned fp8_w8a8 file at its shape, so the sm_90 report
    (zero spills) covers what tune_moe --dtype fp8 writes; a file of another shape is skipped."""
    import shutil
    from contextlib import contextmanager

    from moelink.benchmarks import compile_cases
    from moelink.kernels import triton_fp8, triton_moe_fp8

    E, K, D, I = DSV3
    shutil.copy(CONFIG_DIR / "fp8_moe_default.json", tmp_path)
    tuned = {4096: OLD, 16384: replace(OLD, up=replace(OLD.up, num_stages=4))}
    moe_config.write_config_file(tmp_path / fp8_config_file_name(E, I, "Some_GPU"), tuned)
    moe_config.write_config_file(tmp_path / fp8_config_file_name(8, 32, "Some_GPU"), {1: OLD})
    monkeypatch.setattr(moe_config, "CONFIG_DIR", tmp_path)
    launched_with = []

    class Rec:
        case = None

        @contextmanager
        def labelled(self, case):
            self.case = case
            yield

    rec = Rec()
    monkeypatch.setattr(triton_moe_fp8, "triton_fused_moe_fp8",
                        lambda x, *a, config=None, **k: launched_with.append((rec.case, x.shape[0], config)))
    monkeypatch.setattr(triton_fp8, "triton_fp8_linear", lambda *a, **k: None)
    compile_cases.compile_fp8(rec, quick=True)
    name = fp8_config_file_name(E, I, "Some_GPU")
    got = {T: cfg for case, T, cfg in launched_with if name in case}
    assert got == tuned and all(case.startswith("deepseek-v3 ") for case, _, _ in launched_with if name in case)
    assert not [case for case, _, _ in launched_with if "E=8," in case]


def test_fp8_search_has_the_tiny_axis_from_the_fp8_gemvs_blocks():
    """The FP8 kind turns the tiny path on at DEFAULT_TINY_FP8 (not the float GEMVs' blocks), keeps a TINY entry in
    the launched form it writes, and prunes e4m3 tiles narrower than their warps' 16-byte lanes (512 columns a warp)."""
    from moelink.benchmarks.tune_space import TINY_AXES, neighbours
    from moelink.kernels.moe_config import TinyGemm
    from moelink.kernels.triton_moe_fp8_tiny import DEFAULT_TINY_FP8

    E, K, D, I = DSV3
    kind = tune_moe_fp8.Fp8Kind()
    cfg = MoELaunchConfig(16, GemmConfig(128, 128, 1, 4, 3), GemmConfig(128, 128, 1, 4, 3))
    first = next(neighbours(cfg, {}, [16], 8, TINY_AXES["quick"], kind.tiny_start))
    assert kind.tiny and first.tiny == replace(DEFAULT_TINY_FP8, max_pairs=8)
    assert kind.launched(first).tiny == first.tiny and kind.feasible(first, DSV3, None) is None
    narrow = replace(first, tiny=replace(first.tiny, down=TinyGemm(1, 256, 1, 1)))  # (under 512: one warp's lanes)
    assert "lanes" in tune_moe_fp8.feasible_fp8(narrow, D, I)
    # The CPU smoke starts the tiny path at wider GEMVs (fewer interpreted programs) that are still timed, not pruned:
    # the smoke runs the FP8 tiny kernels.
    smoke = tune_moe_fp8.Fp8Kind(smoke=True)
    for E, K, D, I in tune_moe_fp8.FP8_SMOKE_SHAPES.values():
        first = next(neighbours(cfg, {}, [16], K, TINY_AXES["smoke"], smoke.tiny_start))
        assert first.tiny.up.BLOCK_SIZE_N == 16 and smoke.feasible(first, (E, K, D, I), None) is None
