"""benchmarks/gpu_session.sh's CPU smoke runs (`--cpu-smoke STEP`): the steps whose shell and Python logic matters run
for real at tiny sizes on CPU (preflight, pytest per file, tune's and tune-fp8's tarballs unpacked into configs, the
KV handoff between two processes, the mla-fp8-kv, int4, dsa, dsv4 and spec comparisons), and what each leaves in $OUT
is what the device tool returns. The plans and budgets of every step are test_gpu_session.py's.

Most of the file's CPU time: each run is at least a Python start that imports torch (kv-transfer, tests-kernels and
mla-fp8-kv the largest).
"""
from __future__ import annotations

import json
import re
import tarfile

import pytest

from moelink.benchmarks import moe_kernels
from moelink.kernels import moe_config

from tests.helpers.gpu_session import PLAN, assert_device_safe, session


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_cpu_smoke_kv_transfer_step_hands_kv_between_two_processes(tmp_path):
    """A spawned prefill process saves, this one loads over every transport: one row each, one JSON."""
    proc = session("--cpu-smoke", "kv-transfer", out=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_device_safe(tmp_path)
    (f,) = tmp_path.iterdir()
    rows = json.loads(f.read_text())["rows"]
    # NIXL is measured where its package is installed (the CPU lock has it; the GPU image may not).
    from moelink.engine.kv_transfer.nixl import nixl_available
    nixl = ["nixl"] if nixl_available() else []
    assert sorted(r["transport"] for r in rows) == sorted(["collective", "shm", "tcp"] + nixl)
    assert all(r["bytes"] == 61 * 4 * 16 * 576 * 2 and r["load_gbps"] > 0 and r["save_s"] > 0 for r in rows)


@pytest.mark.slow
def test_preflight_runs_on_cpu_and_says_what_it_will_do(tmp_path):
    proc = session("preflight", out=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for what in ("python", "torch", "triton", "triton NVIDIA backend + ptxas", "C compiler (Triton's launcher)",
                 "Python.h (Triton's launcher)", "pytest", "pytest-timeout", "pip + setuptools (editable install)"):
        assert re.search(rf"^(ok     |MISSING) {re.escape(what)}: ", out, re.M), f"no check of {what}:\n{out}"
    # Whatever is missing says what happens instead.
    for line in re.findall(r"^MISSING .*$", out, re.M):
        assert " -> " in line, line
    assert re.search(r"^plan    import: ", out, re.M) and "torch: " in out and "no CUDA device" in out
    assert re.search(r"^plan    Triton cache: .*/\.gpu_session/triton_cache", out, re.M)
    files = list(tmp_path.iterdir())
    assert [f.name for f in files] == ["preflight_cpu.txt"] and "plan    import" in files[0].read_text()


@pytest.mark.slow
def test_cpu_smoke_tests_step_runs_pytest_per_file(tmp_path):
    proc = session("--cpu-smoke", "tests-kernels", out=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_device_safe(tmp_path)
    log = (tmp_path / "gpu_tests_kernels_cpu_smoke.txt").read_text()
    assert "=== tests/kernels/test_triton_gpu.py" in log and re.search(r"\d+ skipped", log)  # no GPU here
    assert re.search(r"triton_gpu: exit 0 after \d+ s \(budget \d+ s\)", proc.stdout)


def _tune_step_unpacked(tmp_path, step: str, tarball_name: str, want: list[str]):
    """Run a tune step's CPU smoke: its one output is `tarball_name`, holding exactly the config files `want`, which
    the script's `unpack` puts in place. Returns (the step's process, the directory unpacked into)."""
    out, dest = tmp_path / "out", tmp_path / "configs"
    out.mkdir(), dest.mkdir()
    proc = session("--cpu-smoke", step, out=out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_device_safe(out)
    (tarball,) = out.iterdir()
    assert tarball.name == tarball_name
    with tarfile.open(tarball) as tf:
        assert sorted(tf.getnames()) == want
    unpacked = session("unpack", str(tarball), UNPACK_DEST=str(dest))
    assert unpacked.returncode == 0, unpacked.stderr
    assert sorted(p.name for p in dest.iterdir()) == want
    return proc, dest


@pytest.mark.slow
def test_cpu_smoke_tune_step_tarball_unpacks_into_configs(tmp_path):
    E, _, _, I = moe_kernels.SMOKE_SHAPES["smoke-e8"]  # the step tunes one smoke shape at one bucket
    want = [moe_config.config_file_name(E, I, "cpu")]
    _, dest = _tune_step_unpacked(tmp_path, "tune", "tuned_configs_cpu_smoke_smoke.tar.gz", want)
    for p in dest.iterdir():
        key, buckets = moe_config.load_config_file(str(p))
        assert key == "tokens" and [b for b, _ in buckets] == [1]
        tuning = json.loads(p.read_text())["tuning"]
        for b in [1]:  # what was written is never slower than its seed
            assert tuning[str(b)]["tuned_ms"] <= tuning[str(b)]["seed_ms"]


def _fp8_smoke_file():
    from moelink.benchmarks.tune_moe_fp8 import FP8_SMOKE_SHAPES
    from moelink.kernels.triton_moe_fp8 import fp8_config_file_name

    E, _, _, I = FP8_SMOKE_SHAPES["smoke-fp8-e8"]
    return fp8_config_file_name(E, I, "cpu")


def _mxfp4_smoke_file():
    from moelink.benchmarks.tune_moe_mxfp4 import MXFP4_SMOKE_SHAPES
    from moelink.kernels.triton_moe_mxfp4 import mxfp4_config_file_name

    E, _, _, I = MXFP4_SMOKE_SHAPES["smoke-mxfp4"]
    return mxfp4_config_file_name(E, I, "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("dtype,smoke,config_file,other_buckets", [
    ("fp8", "smoke-fp8-e8", _fp8_smoke_file, [12]),  # 12: the other smoke bucket, at the config used until now
    ("mxfp4", "smoke-mxfp4", _mxfp4_smoke_file, None),  # None: whatever the shipped table holds besides bucket 1
])
def test_cpu_smoke_quantized_tune_step_tarball_unpacks_into_configs(tmp_path, dtype, smoke, config_file,
                                                                    other_buckets):
    """The FP8 / MXFP4 step's tarball holds its dtype's config file (one smoke shape at one bucket), which unpack
    accepts and the dtype's config table would read; the tuner printed its ratio to bf16."""
    proc, dest = _tune_step_unpacked(tmp_path, f"tune-{dtype}", f"tuned_configs_{dtype}_cpu_smoke_smoke.tar.gz",
                                     [config_file()])
    assert re.search(rf"^RATIO {smoke} T=1: {dtype} ", proc.stdout, re.M), proc.stdout[-3000:]
    (p,) = dest.iterdir()
    key, buckets = moe_config.load_config_file(str(p))
    tuning = json.loads(p.read_text())["tuning"]
    got = [b for b, _ in buckets]
    assert key == "tokens" and set(tuning) == {"1"}
    assert (got == [1] + other_buckets) if other_buckets is not None else (1 in got)
    assert tuning["1"]["tuned_ms"] <= tuning["1"]["seed_ms"] and tuning["1"]["bf16_ms"] > 0


@pytest.mark.slow
def test_cpu_smoke_tune_invariant_step_tarball_unpacks_into_configs(tmp_path):
    """tune-invariant's tarball holds the batch-invariant mode's one-config file, which unpack accepts and the mode's
    lookup reads; the tuner printed its ratio to the normal engine's experts."""
    from moelink.kernels.batch_invariant_triton import invariant_file_name, tuned_invariant_config

    E, _, _, I = moe_kernels.SMOKE_SHAPES["smoke-e8"]
    proc, dest = _tune_step_unpacked(tmp_path, "tune-invariant", "tuned_configs_invariant_cpu_smoke_smoke.tar.gz",
                                     [invariant_file_name(E, I, "cpu")])
    assert re.search(r"^RATIO smoke-e8 T=1: invariant ", proc.stdout, re.M), proc.stdout[-3000:]
    assert tuned_invariant_config(E, I, "cpu", str(dest)) is not None
    assert "--weights 31,1" in session("--dry-run", "tune-invariant", "qwen3-30b-a3b").stdout


@pytest.mark.slow
def test_cpu_smoke_mla_fp8_kv_step_prints_the_ratios(tmp_path):
    """Its CPU smoke (toy shapes: the kernel in the interpreter, the engine on the reference kernels) prints one
    `RATIO` line per kernel case and one end to end, and writes one device-safe JSON."""
    proc = session("--cpu-smoke", "mla-fp8-kv", out=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_device_safe(tmp_path)
    ratios = re.findall(r"^RATIO (kernel|e2e) (.+): fp8 \S+ s / bf16 \S+ s = (\d+\.\d+)$", proc.stdout, re.M)
    assert [r[0] for r in ratios] == ["kernel"] * 4 + ["e2e"], proc.stdout
    (f,) = tmp_path.iterdir()
    doc = json.loads(f.read_text())
    assert f.name == "mla_fp8_kv_cpu_smoke.json" and len(doc["results"]) == 5 and doc["cpu_smoke"]


@pytest.mark.slow
def test_cpu_smoke_int4_step_runs_its_four_commands(tmp_path):
    """The int4 step's CPU smoke: its two benchmark commands as CPU counts (decode bytes at batches 1..64, both
    prefill paths counted; device-safe JSON), the two GPU test files through pytest (skipped on CPU, one log); its
    dry run times the decode batches 1..64 at Kimi's experts and both prefill paths at Kimi's EP-8 share, then both
    GPU test files."""
    proc = session("--cpu-smoke", "int4", out=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_device_safe(tmp_path)
    names = sorted(f.name for f in tmp_path.iterdir())
    assert names == ["gpu_tests_int4_cpu_smoke.txt", "moe_int4_bytes_cpu_smoke.json",
                     "moe_int4_prefill_counts_cpu_smoke.json"]
    dec = json.loads((tmp_path / "moe_int4_bytes_cpu_smoke.json").read_text())["results"]
    assert [r["tokens"] for r in dec] == [1, 2, 4, 8, 16, 32, 64] and all(r["ratio"] < 0.3 for r in dec)
    pre = json.loads((tmp_path / "moe_int4_prefill_counts_cpu_smoke.json").read_text())["results"]
    assert [r["shape"] for r in pre] == ["kimi-k2-ep8"] * 3 and all("dequant_hbm_ratio" in r for r in pre)
    log = (tmp_path / "gpu_tests_int4_cpu_smoke.txt").read_text()
    assert "test_triton_moe_int4_gpu.py" in log and "test_int4_gpu.py" in log and "skipped" in log
    plans = PLAN.findall(session("--dry-run", "int4").stdout)
    cmds = {p[1]: p[7] for p in plans}
    assert list(cmds) == ["moe_int4_decode", "moe_int4_prefill", "int4_kernels_gpu", "int4_engine_gpu"]
    assert "--shapes kimi-k2 --tokens 1,2,4,8,16,32,64 " in cmds["moe_int4_decode"]
    assert "--prefill --shapes kimi-k2-ep8 " in cmds["moe_int4_prefill"]


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_cpu_smoke_dsa_step_writes_both_paths_bytes_and_times(tmp_path):
    """The dsa step's CPU smoke (toy shapes, reference kernels): one device-safe JSON, every point with dense and DSA
    times and counted bytes, the latent bytes following top-k / context."""
    proc = session("--cpu-smoke", "dsa", out=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_device_safe(tmp_path)
    (f,) = tmp_path.iterdir()
    doc = json.loads(f.read_text())
    assert f.name == "dsa_decode_cpu_smoke.json" and len(doc["points"]) == 8
    for pt in doc["points"]:
        assert pt["dense_s"] > 0 and pt["dsa_s"] > 0
        assert pt["latent_bytes_ratio"] == pytest.approx(min(pt["context"], 16) / pt["context"])


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_cpu_smoke_dsv4_step_writes_each_path(tmp_path):
    """The dsv4 step's CPU smoke (toy shapes, reference kernels): one device-safe JSON, every point timed on each path
    with its counted bytes (the GPU run adds V3's MLA beside them)."""
    proc = session("--cpu-smoke", "dsv4", out=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_device_safe(tmp_path)
    (f,) = tmp_path.iterdir()
    doc = json.loads(f.read_text())
    assert f.name == "dsv4_decode_cpu_smoke.json" and len(doc["points"]) == 2
    for pt in doc["points"]:
        assert pt["full_s"] > 0 and pt["csa_s"] > 0 and pt["hca_s"] > 0
        assert pt["bytes"]["hca"] < pt["bytes"]["full"]


@pytest.mark.slow
def test_cpu_smoke_spec_step_compares_drafts_with_plain_decoding(tmp_path):
    """The spec step's CPU smoke (a tiny Qwen3-MoE): plain decoding in both loops and the oracle drafter at
    p = 0.8, outputs identical, one device-safe JSON; a GPU run takes a full-size shape."""
    proc = session("--cpu-smoke", "spec", out=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_device_safe(tmp_path)
    (f,) = tmp_path.iterdir()
    rows = json.loads(f.read_text())["batches"]["1"]
    floors = rows.pop("floors")
    assert f.name == "spec_decode_cpu_smoke.json" and set(rows) == {"plain", "plain_serial", "p=0.8"}
    assert rows["p=0.8"]["identical_to_plain"] and rows["p=0.8"]["tokens_per_request_step"] > 1
    # The verify step's floor from the tiny checkpoint's config.json: more experts touched than the decode step's;
    # no copy bandwidth on CPU, so no step over a floor.
    assert floors["ratio_verify_over_decode"] > 1 and "decode_ms" not in floors
    assert floors["verify"]["experts_touched_per_layer"] > floors["decode"]["experts_touched_per_layer"]
    assert rows["p=0.8"]["step_over_serial"] > 0 and "step_over_floor" not in rows["p=0.8"]
    (plan,) = PLAN.findall(session("--dry-run", "spec", "--model", "deepseek-v2-lite").stdout)
    assert "--shape deepseek-v2-lite" in plan[7] and "spec_decode_" in plan[7]
    assert session("--dry-run", "spec", "--model", "llama").returncode == 2
