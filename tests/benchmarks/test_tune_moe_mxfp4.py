"""tune_moe --dtype mxfp4 (benchmarks/tune_moe_mxfp4.py): with fake timings, the search times only what
triton_fused_moe_mxfp4 launches (BLOCK_K >= 32, no fused tile, no persistent or TMA keys), each launch once, every
DEQUANT candidate as one launch, and per-tile against dequantize-once decided by time (not where TINY covers the
batch); then its --cpu-smoke run in the interpreter: the file's name and buckets, the recorded tuning with the bf16
time, the RATIO lines, and the configs read back by mxfp4_config_table through a config_dir."""
from __future__ import annotations

import json
import re
import sys
from dataclasses import replace

import pytest
import torch

from moelink.benchmarks import moe_kernels, tune_moe, tune_moe_mxfp4
from moelink.kernels.moe_config import CONFIG_DIR, load_config_file
from tests.helpers import zygote
from tests.helpers.fast_interpreter import interpreter_env

CPU = torch.device("cpu")
SHAPE = tune_moe_mxfp4.MXFP4_SMOKE_SHAPES["smoke-mxfp4"]
TUNED = re.compile(r"^(\S+) T=(\d+): ([0-9.]+) ms with (\{.*\})$", re.M)
RATIO = re.compile(r"^RATIO (\S+) T=(\d+): mxfp4 ([0-9.]+) ms / bf16 ([0-9.]+) ms = ([0-9.]+)", re.M)


def fake_times(monkeypatch, times, bf16_s=2.0):
    asked = []

    def fake(cfg, sets, timer, iters, want=None):
        asked.append(cfg)
        return times(cfg)

    monkeypatch.setattr(tune_moe_mxfp4, "time_config_mxfp4", fake)
    monkeypatch.setattr(tune_moe_mxfp4, "time_config", lambda cfg, sets, timer, iters, want=None: bf16_s)
    return asked


def run_bucket(T):
    return tune_moe.tune_bucket(SHAPE, T, torch.bfloat16, CPU, None, tune_moe.SPACES["quick"], 1,
                                deadline=float("inf"), log=lambda *a: None, kind=tune_moe_mxfp4.Mxfp4Kind())


def launches_as_mxfp4(cfg) -> bool:
    gemms = (cfg.up, cfg.down)
    return (min(g.BLOCK_SIZE_K for g in gemms) >= 32 and not any(g.FUSED_GATE_UP or g.PERSISTENT or g.TMA
                                                                 or g.WARP_SPECIALIZE for g in gemms))


def test_mxfp4_search_times_each_launch_once_and_dequant_once(monkeypatch):
    """T=12 (24 pairs: past the interpreter table's TINY): the seeds are the current per-tile config, it with
    DEQUANT, and the 128-row per-tile blocks; the faster DEQUANT one is kept, and no block move of it is timed
    (the dequantize-once path runs the float config, not these blocks)."""
    asked = fake_times(monkeypatch, lambda cfg: 0.5 if cfg.dequant else 1.0)
    cfg, t, info = run_bucket(12)
    assert cfg.dequant and t == 0.5 and info["seed"] == "DEQUANT flipped" and info["bf16_ms"] == 2000.0
    assert all(launches_as_mxfp4(c) for c in asked) and len(asked) == len(set(asked)) == info["tried"] == 3
    assert sum(c.dequant for c in asked) == 1 and info["same"] >= 10


def test_mxfp4_search_moves_the_per_tile_blocks_from_the_faster_seed(monkeypatch):
    seeds = dict(tune_moe_mxfp4.Mxfp4Kind().seeds(SHAPE, 12, CPU))
    assert set(seeds) == {"current", "DEQUANT flipped", "per-tile 128-row blocks"}
    base = seeds["per-tile 128-row blocks"]
    assert (base.BLOCK_SIZE_M, base.up.num_warps, base.dequant) == (128, 4, False)
    fake_times(monkeypatch, lambda cfg: 0.5 if cfg == replace(base, down=replace(base.down, num_warps=8)) else
               0.8 if cfg == base else 1.0)
    cfg, t, info = run_bucket(12)
    assert cfg == replace(base, down=replace(base.down, num_warps=8)) and t == 0.5 and not info["kept_seed"]


def test_a_bucket_the_gemvs_cover_keeps_its_path(monkeypatch):
    """T=1 (2 pairs, within TINY's 8): the GEMVs run whatever DEQUANT says, so it is not a seed."""
    assert [label for label, _ in tune_moe_mxfp4.Mxfp4Kind().seeds(SHAPE, 1, CPU)] == ["current"]
    asked = fake_times(monkeypatch, lambda cfg: 1.0)
    cfg, _, info = run_bucket(1)
    assert cfg.tiny is not None and not any(c.dequant for c in asked) and info["kept_seed"]


@pytest.mark.slow
def test_mxfp4_cpu_smoke_writes_a_file_mxfp4_config_table_reads(tmp_path, monkeypatch):
    """The smoke shape at its buckets in the interpreter: the file holds every smoke bucket as printed, records the
    bf16 time and a RATIO line per bucket, and reads back through a config_dir on a GPU named so."""
    from moelink.kernels import moe_config
    from moelink.kernels.triton_moe_mxfp4 import mxfp4_config_file_name, mxfp4_config_table

    out = tmp_path / "configs"
    before = set(CONFIG_DIR.iterdir())
    proc = zygote.run([sys.executable, "-m", "moelink.benchmarks.tune_moe", "--cpu-smoke", "--dtype", "mxfp4",
                       "--out-dir", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                      env=interpreter_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert set(CONFIG_DIR.iterdir()) == before
    printed = {int(m[2]): json.loads(m[4]) for m in TUNED.finditer(proc.stdout)}
    ratios = {int(m[2]) for m in RATIO.finditer(proc.stdout)}
    assert set(printed) == ratios == set(moe_kernels.SMOKE_TOKENS), proc.stdout
    E, K, D, I = SHAPE
    path = out / mxfp4_config_file_name(E, I, "cpu")
    data = json.loads(path.read_text())
    assert data["dtype"] == "mxfp4" and data["shape"]["model"] == "smoke-mxfp4"
    buckets = dict(load_config_file(str(path))[1])
    assert {T: c.to_dict() for T, c in buckets.items()} == printed
    assert all(rec["bf16_ms"] > 0 and rec["tuned_ms"] <= rec["seed_ms"] for rec in data["tuning"].values())
    path.rename(path.with_name(path.name.replace("device_name=cpu", "device_name=Smoke_GPU")))
    monkeypatch.setattr(moe_config, "device_name", lambda device: "Smoke_GPU")
    key, table = mxfp4_config_table(E, I, "Smoke_GPU", config_dir=out)
    assert key == "tokens" and {T: c.to_dict() for T, c in table} == printed
