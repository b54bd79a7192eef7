"""The GPU benchmark scripts end to end on CPU: each one's `--cpu-smoke` run in a subprocess.

The smoke runs use tiny shapes and the Triton interpreter, so their times say
nothing about speed; what is checked is the script: every system, shape and
token count is there with finite positive times, the correctness check ran,
tune_moe's file reads back through moelink.kernels.moe_config, and
engine_decode reports a step time and floor ratio per batch. Output goes to
tmp_path only (never benchmarks/results/ or kernels/configs/). About 30 s
of CPU, nearly all of it the tune_moe, moe_kernels and engine_decode --graphs runs (6-8 s each).
"""
from __future__ import annotations

import importlib.util
import itertools
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moelink.benchmarks import engine_decode, moe_kernels, tune_moe
from moelink.kernels import moe_config
from moelink.kernels.moe_config import GemmConfig, MoELaunchConfig
from tests.helpers.fast_interpreter import interpreter_env
from tests.helpers import zygote

CPU = torch.device("cpu")
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _snapshot() -> set[Path]:
    """Files the default output paths would hold: a smoke run given --out/--out-dir must add none."""
    return set(moe_kernels.RESULTS.glob("*")) | set(moe_config.CONFIG_DIR.glob("*"))


def run_smoke(module: str, tmp_path: Path, *args: str) -> str:
    """stdout of `python -m moelink.benchmarks.<module> --cpu-smoke ARGS`, run in tmp_path; fails on a non-zero exit."""
    before = _snapshot()
    # Explicit, not inherited: the scripts only setdefault it, and a compiled CPU Triton would not run these kernels.
    env = interpreter_env()
    proc = zygote.run([sys.executable, "-m", f"moelink.benchmarks.{module}", "--cpu-smoke", *args],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, (f"{module} --cpu-smoke exited {proc.returncode}:\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    assert _snapshot() == before, f"{module} --cpu-smoke wrote outside tmp_path: {sorted(map(str, _snapshot() ^ before))}"
    return proc.stdout


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


# -- moe_kernels ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_moe_kernels_smoke_rows_checks_summary_and_plot(tmp_path):
    out = tmp_path / "mk" / "moe_kernels.json"
    stdout = run_smoke("moe_kernels", tmp_path, "--out", str(out))
    res = json.loads(out.read_text())
    assert res["benchmark"] == "moe_kernels" and res["device"] == "cpu" and res["dtype"] == "bfloat16"
    assert {"date", "commit", "torch", "triton", "python", "timing", "iters"} <= res.keys()
    assert res["iters"] == moe_kernels.SMOKE_ITERS
    assert positive(res["ceilings"]["copy_GBps"]) and positive(res["ceilings"]["matmul_TFLOPs"])

    has_gmm = moe_kernels._grouped_mm_works(CPU)
    systems = list(moe_kernels.systems(has_gmm))
    assert {"moelink-triton", "moelink-triton-atomic", "moelink-triton-tiny", "per-expert-loop"} <= set(systems)
    rows = {(r["shape"], r["tokens"], r["system"]): r for r in res["results"]}
    assert len(rows) == len(res["results"]), "a (shape, tokens, system) row is duplicated"
    assert set(rows) == set(itertools.product(moe_kernels.SMOKE_SHAPES, moe_kernels.SMOKE_TOKENS, systems))
    for (shape, T, system), r in rows.items():
        E, K, D, I = moe_kernels.SMOKE_SHAPES[shape]
        assert (r["E"], r["K"], r["D"], r["I"]) == (E, K, D, I)
        for key in ("median_ms", "eager_ms", "TFLOPs", "GBps", "frac_copy_bw", "frac_matmul", "intensity"):
            assert positive(r[key]), f"{shape} T={T} {system}: {key}={r[key]!r}"
        assert r["graph_ms"] is None and r["median_ms"] == r["eager_ms"]  # no CUDA graphs on CPU
        assert r["flops"] == 6.0 * T * K * D * I
        # One token routes to K distinct experts; more tokens touch at most all E.
        assert r["experts_touched"] == K if T == 1 else K <= r["experts_touched"] <= E
        # The correctness check ran against the per-expert loop (the reference itself: exactly 0).
        err = r["rel_err_vs_loop"]
        assert err == 0.0 if system == "per-expert-loop" else (math.isfinite(err) and 0 <= err <= 2e-2), (system, err)

    s = res["summary"]
    assert set(s) == {"geomean_speedup_vs_grouped_mm", "min_frac_copy_bw_le64_tokens", "min_frac_matmul_ge4096_tokens",
                      "tiny_speedup_vs_moelink_triton", "frac_copy_bw_1_token", "targets"}
    # each system's fraction of copy bandwidth at one token, per shape: the rows' own value
    one = {f"{r['shape']} {r['system']}": r["frac_copy_bw"] for r in res["results"]
           if r["tokens"] == 1 and r["system"].startswith("moelink")}
    assert s["frac_copy_bw_1_token"].keys() == one.keys()
    assert all(abs(s["frac_copy_bw_1_token"][k] - v) <= 5e-5 for k, v in one.items())
    # every smoke point is within the tiny path's pair limit: one ratio per (shape, tokens), each the rows' quotient
    assert set(s["tiny_speedup_vs_moelink_triton"]) == {f"{n} T={T}" for n, T in
                                                        itertools.product(moe_kernels.SMOKE_SHAPES, moe_kernels.SMOKE_TOKENS)}
    for (shape, T, system), r in rows.items():
        if system == "moelink-triton":
            want = r["median_ms"] / rows[(shape, T, "moelink-triton-tiny")]["median_ms"]
            assert s["tiny_speedup_vs_moelink_triton"][f"{shape} T={T}"] == pytest.approx(want, rel=1e-3)
    assert positive(s["geomean_speedup_vs_grouped_mm"]) if has_gmm else s["geomean_speedup_vs_grouped_mm"] is None
    assert positive(s["min_frac_copy_bw_le64_tokens"])  # every smoke token count is <= 64
    assert s["min_frac_matmul_ge4096_tokens"] is None and s["targets"]["matmul_ge_70pct"] is None
    assert set(s["targets"]) == {"speedup_ge_1_2", "copy_bw_ge_80pct", "matmul_ge_70pct"}

    png = out.with_suffix(".png")
    if HAS_MATPLOTLIB:
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
        assert f"wrote {out} and {png}" in stdout
    else:
        assert not png.exists() and "matplotlib is not installed" in stdout


@pytest.mark.parametrize("wrong", [lambda y: y * 1.05, lambda y: torch.full_like(y, float("nan"))], ids=["5pct", "nan"])
def test_moe_kernels_check_catches_a_wrong_system(monkeypatch, wrong):
    """In process and without Triton: a system 5% off (or NaN) fails the check before it is timed."""
    def off(*args):
        return wrong(moe_kernels.per_expert_loop(*args))

    monkeypatch.setattr(moe_kernels, "systems",
                        lambda has_gmm, tiny=None: {"wrong": off, "per-expert-loop": moe_kernels.per_expert_loop})
    ceilings = dict(copy_GBps=1.0, matmul_TFLOPs=1.0)
    with pytest.raises(AssertionError, match="wrong smoke-e8 T=4: relative error"):
        moe_kernels.bench_shape("smoke-e8", moe_kernels.SMOKE_SHAPES["smoke-e8"], [4], torch.bfloat16, CPU,
                                moe_kernels.Timer(CPU), ceilings, iters=1, check=True, graphs=False)


# -- tune_moe --------------------------------------------------------------------------------------------------------------
TUNED_LINE = re.compile(r"^(\S+) T=(\d+): ([0-9.]+) ms with (\{.*\})$", re.M)
OLD_BUCKET = 4096  # seeded before the run: tune_moe must merge into the file, not replace it
OLD_CONFIG = MoELaunchConfig(64, GemmConfig(128, 64, 8, 8, 3), GemmConfig(64, 128, 1, 4, 4))


def seed_config_file(out_dir: Path) -> Path:
    E, _, _, I = moe_kernels.SMOKE_SHAPES["smoke-e8"]
    path = out_dir / moe_config.config_file_name(E, I, "cpu")
    out_dir.mkdir(parents=True)
    moe_config.write_config_file(path, {OLD_BUCKET: OLD_CONFIG}, meta=dict(note="seeded by the test"))
    return path


@pytest.mark.slow
def test_tune_moe_smoke_writes_configs_that_load_back(tmp_path, monkeypatch):
    out_dir = tmp_path / "configs"
    seeded = seed_config_file(out_dir)
    stdout = run_smoke("tune_moe", tmp_path, "--out-dir", str(out_dir))
    printed = {(m[1], int(m[2])): (float(m[3]), json.loads(m[4])) for m in TUNED_LINE.finditer(stdout)}
    assert set(printed) == set(itertools.product(moe_kernels.SMOKE_SHAPES, moe_kernels.SMOKE_TOKENS)), stdout

    space = tune_moe.SPACES["smoke"]
    paths = set()
    for name, (E, K, D, I) in moe_kernels.SMOKE_SHAPES.items():
        path = out_dir / moe_config.config_file_name(E, I, "cpu")
        paths.add(path)
        assert f"wrote {path}" in stdout
        data = json.loads(path.read_text())
        assert data["shape"] == dict(model=name, E=E, top_k=K, D=D, I=I)
        assert data["tuned_on"] == "cpu" and data["dtype"] == "bfloat16" and data["key"] == "tokens"
        key, buckets = moe_config.load_config_file(str(path))
        assert key == "tokens"
        tuned = dict(buckets)
        want = set(moe_kernels.SMOKE_TOKENS) | ({OLD_BUCKET} if path == seeded else set())
        assert set(tuned) == want
        if path == seeded:
            assert tuned[OLD_BUCKET] == OLD_CONFIG
        for T in moe_kernels.SMOKE_TOKENS:
            ms, cfg = printed[(name, T)]
            assert positive(ms)
            assert tuned[T].to_dict() == cfg
            # The written config is a seed (current config, default.json) or one searched axis value away
            # from one, for each GEMM: every field is a seed's value or one of the space's values.
            seeds = [c for _, c in tune_moe.seeds_for((E, K, D, I), T, CPU)]
            got = tuned[T]
            assert got.BLOCK_SIZE_M in {s.BLOCK_SIZE_M for s in seeds} | set(tune_moe.block_m_candidates(T, K, E, space))
            for part in ("up", "down"):
                for axis in tune_moe.GEMM_AXES + tune_moe.SCHEDULE_AXES:
                    allowed = {getattr(getattr(s, part), axis) for s in seeds} | set(space[axis])
                    assert getattr(getattr(got, part), axis) in allowed, (name, T, part, axis)
            if got.tiny is not None:  # the tiny path's axis: on at this bucket's pair count, blocks from the space
                assert got.tiny.max_pairs == T * K and T * K <= tune_moe.TINY_TUNE_MAX_PAIRS
                for key, values in tune_moe.TINY_AXES["smoke"].items():
                    part, axis = key.split("_", 1)
                    assert getattr(getattr(got.tiny, part), axis) in set(values) | {
                        getattr(getattr(tune_moe.Bf16Kind(smoke=True).tiny_start, part), axis)}
    assert set(out_dir.iterdir()) == paths

    # The engine's lookup finds them: a GPU named "Smoke_GPU" with these files picks the nearest bucket.
    for path in paths:
        path.rename(path.with_name(path.name.replace("device_name=cpu", "device_name=Smoke_GPU")))
    monkeypatch.setattr(moe_config, "device_name", lambda device: "Smoke_GPU")
    for name, (E, K, D, I) in moe_kernels.SMOKE_SHAPES.items():
        for T in moe_kernels.SMOKE_TOKENS:
            got = moe_config.get_moe_config(E, I, T, K, CPU, config_dir=out_dir)
            assert got.to_dict() == printed[(name, T)][1]
    E, K, _, I = moe_kernels.SMOKE_SHAPES["smoke-e8"]
    assert moe_config.get_moe_config(E, I, 3000, K, CPU, config_dir=out_dir) == OLD_CONFIG


@pytest.mark.slow  # the interpreter's tuning (~7 s)
def test_tune_moe_invariant_smoke_writes_one_config_the_mode_reads(tmp_path):
    """tune_moe_invariant: one config for a mix of counts, weighted; its file holds that config alone, with per count
    the tuned, built-in and normal engine's times, and reads back through the mode's lookup; a RATIO line a count."""
    from moelink.kernels import batch_invariant_triton as bit

    out_dir = tmp_path / "configs"
    stdout = run_smoke("tune_moe_invariant", tmp_path, "--shapes", "smoke-e8", "--tokens", "2,12",
                       "--weights", "4,1", "--out-dir", str(out_dir))
    E, K, D, I = moe_kernels.SMOKE_SHAPES["smoke-e8"]
    path = out_dir / bit.invariant_file_name(E, I, "cpu")
    assert set(out_dir.iterdir()) == {path} and f"wrote {path}" in stdout
    data = json.loads(path.read_text())
    assert data["batch_invariant"] is True and data["mix"] == dict(tokens=[2, 12], weights=[4.0, 1.0])
    rows = data["tuning"]["per_count"]
    assert set(rows) == {"2", "12"} and all(positive(v) for r in rows.values() for v in r.values())
    got = bit.tuned_invariant_config(E, I, "cpu", str(out_dir))
    assert got is not None and got.tiny is None
    assert [m[1] for m in re.finditer(r"^RATIO smoke-e8 T=(\d+): invariant ", stdout, re.M)] == ["2", "12"]
    # The mixes' M blocks: the search's BLOCK_SIZE_M is a seed's or one a count of the mix wants.
    space = tune_moe.SPACES["smoke"]
    assert got.BLOCK_SIZE_M in {bit.builtin_moe_config(False, None).BLOCK_SIZE_M} | {
        bm for t in (2, 12) for bm in tune_moe.block_m_candidates(t, K, E, space)} | {
        moe_config.get_moe_config(E, I, t, K, CPU).BLOCK_SIZE_M for t in (2, 12)}


@pytest.mark.parametrize("argv,why", [
    (["--tokens", "2,12", "--weights", "1"], "one positive number per --tokens count"),
    (["--tokens", "2,12", "--weights", "1,0"], "one positive number per --tokens count"),
    (["--tokens", "2,x"], "not a comma list of positive integers"),
    (["--shapes", "nope"], "is not one of"),
    (["--dtype", "fp8"], "invalid choice"),
])
def test_tune_moe_invariant_refuses_bad_arguments(argv, why, capsys):
    from moelink.benchmarks import tune_moe_invariant

    with pytest.raises(SystemExit) as e:
        tune_moe_invariant.main(["--cpu-smoke", *argv])
    assert e.value.code == 2 and why in capsys.readouterr().err


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_tune_moe_out_of_budget_tunes_nothing(tmp_path):
    out_dir = tmp_path / "configs"
    seeded = seed_config_file(out_dir)
    before = seeded.read_bytes()
    stdout = run_smoke("tune_moe", tmp_path, "--out-dir", str(out_dir), "--budget-s", "0")
    assert not TUNED_LINE.search(stdout)
    for name, T in itertools.product(moe_kernels.SMOKE_SHAPES, moe_kernels.SMOKE_TOKENS):
        assert f"{name} T={T}: out of time budget, not tuned" in stdout
    assert seeded.read_bytes() == before and list(out_dir.iterdir()) == [seeded]


# -- engine_decode ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_engine_decode_smoke_step_and_floor_per_batch(tmp_path):
    out = tmp_path / "engine_decode.json"
    stdout = run_smoke("engine_decode", tmp_path, "--out", str(out))
    assert f"wrote {out}" in stdout
    res = json.loads(out.read_text())
    hf = engine_decode.SMOKE
    layers = hf["num_hidden_layers"]
    assert res["benchmark"] == "engine_decode" and res["device"] == "cpu"
    assert res["kernels"] == "cpu_native"  # --kernels auto on CPU: the native CPU kernels (this machine compiles them)
    assert res["note"] == f"all {layers} layers built"
    copy_GBps = res["ceilings"]["copy_GBps"]
    assert positive(copy_GBps) and positive(res["ceilings"]["matmul_TFLOPs"])
    assert [r["batch"] for r in res["results"]] == list(engine_decode.SMOKE_BATCHES)
    for r in res["results"]:
        B = r["batch"]
        assert r["context"] == engine_decode.SMOKE_CONTEXT and r["layers"] == layers
        for key in ("step_ms", "tokens_per_s", "floor_ms", "step_over_floor", "head_ms", "bytes_read_floor",
                    "full_model_step_ms", "full_model_floor_ms"):
            assert positive(r[key]), f"batch {B}: {key}={r[key]!r}"
        assert r["per_layer_ms"] >= 0 and r["graph_step_ms"] is None
        assert r["step_over_floor"] == pytest.approx(r["step_ms"] / r["floor_ms"])
        assert r["floor_ms"] == pytest.approx(r["bytes_read_floor"] / (copy_GBps * 1e9) * 1e3)
        assert r["tokens_per_s"] == pytest.approx(B / r["step_ms"] * 1e3)
        # Every layer built: the "full model" is the measured one.
        assert r["full_model_step_ms"] == pytest.approx(r["step_ms"])
        assert r["full_model_floor_ms"] == pytest.approx(r["floor_ms"])
        K, E = hf["num_experts_per_tok"], hf["num_experts"]
        assert r["experts_touched_per_layer"] == K if B == 1 else K <= r["experts_touched_per_layer"] <= E


def _dsv2_floor_bytes(hf: dict, batch: int, context: int, touched_per_moe_layer: float) -> float:
    """DeepSeek-V2-Lite's step floor counted by hand from config.json (bf16, the router gate in float32): MLA
    without q LoRA in every layer, the dense MLP in the first, router + 2 shared experts in the others, the
    routed experts touched, one latent + rope key cached per token and layer, the LM head and embedding rows."""
    D, N, C, P = hf["hidden_size"], hf["num_attention_heads"], hf["kv_lora_rank"], hf["qk_rope_head_dim"]
    Dn, Dv, I, E, L = hf["qk_nope_head_dim"], hf["v_head_dim"], hf["moe_intermediate_size"], hf["n_routed_experts"], hf["num_hidden_layers"]
    attn = D * N * (Dn + P) + D * (C + P) + C * N * (Dn + Dv) + N * Dv * D + C + 2 * D  # + kv_a_layernorm, 2 norms
    dense = hf["first_k_dense_replace"]
    layers_b = 2 * (L * attn + dense * 3 * D * hf["intermediate_size"] + (L - dense) * 3 * D * I * hf["n_shared_experts"])
    router_b = 4 * (L - dense) * E * D
    experts_b = 2 * 3 * D * I * touched_per_moe_layer * (L - dense)
    kv_b = 2 * (C + P) * batch * (context + 1) * L
    return layers_b + router_b + experts_b + kv_b + 2 * (hf["vocab_size"] + batch) * D


@pytest.mark.slow
def test_engine_decode_smoke_deepseek_v2_lite(tmp_path):
    """--model deepseek-v2-lite: the engine's DeepSeek-V2 model (MLA, dense first layer, shared experts) decodes,
    and the floor is the bytes counted by hand (a GQA-shaped cache, a missed shared expert or dense layer fails)."""
    out = tmp_path / "engine_decode_dsv2.json"
    run_smoke("engine_decode", tmp_path, "--model", "deepseek-v2-lite", "--out", str(out))
    res = json.loads(out.read_text())
    hf = engine_decode.SMOKE_DSV2
    assert res["model_key"] == "deepseek-v2-lite" and res["model"].startswith("DeepSeek-V2-Lite")
    assert [r["batch"] for r in res["results"]] == list(engine_decode.SMOKE_BATCHES)
    for r in res["results"]:
        assert r["layers"] == hf["num_hidden_layers"] and positive(r["step_ms"]) and positive(r["floor_ms"])
        K, E = hf["num_experts_per_tok"], hf["n_routed_experts"]
        assert r["experts_touched_per_layer"] == K if r["batch"] == 1 else K <= r["experts_touched_per_layer"] <= E
        want = _dsv2_floor_bytes(hf, r["batch"], engine_decode.SMOKE_CONTEXT, r["experts_touched_per_layer"])
        assert r["bytes_read_floor"] == pytest.approx(want, rel=1e-9)


@pytest.mark.slow
def test_engine_decode_smoke_times_the_engine_graph_path(tmp_path):
    """--graphs with the Triton kernels (interpreter): the step through engine/rank/cuda_graph.py's DecodeGraphs
    (capture stood in by a re-run on CPU), reported beside the eager step. One batch, one step, one of the smoke
    model's two layers (the rest extrapolated, as on a GPU that cannot hold them all): the interpreter's time."""
    out = tmp_path / "engine_decode_graphs.json"
    run_smoke("engine_decode", tmp_path, "--graphs", "--kernels", "triton", "--steps", "1", "--batches", "2",
              "--layers", "1", "--kernel-times", "--out", str(out))
    res = json.loads(out.read_text())
    assert res["kernels"] == "triton" and res["note"].startswith("built 1 of 2 layers")
    (r,) = res["results"]
    assert r["batch"] == 2
    assert positive(r["graph_step_ms"]) and positive(r["step_ms"])
    assert r["graph_step_over_floor"] == pytest.approx(r["graph_step_ms"] / r["floor_ms"])
    assert r["graph_tokens_per_s"] == pytest.approx(2 / r["graph_step_ms"] * 1e3)
    # --kernel-times: the graph step profiled, summed by kernel family (on CPU the torch ops' self time: the
    # interpreter's Triton launches are no profiler events there).
    assert r["kernel_times_of"] == "graph" and r["kernel_us"] and r["kernel_family_us"]
    assert set(r["kernel_family_us"]) <= {"moe", "attention", "matmul", "norm", "other"}


@pytest.mark.slow
def test_engine_decode_smoke_fp8_checkpoint(tmp_path):
    """--fp8 (round3 5's FP8 decode): Qwen3-30B-A3B's FP8 checkpoint form (e4m3 projections and experts in 128 x 128
    blocks) decodes through the engine's graph path on the Triton kernels (their FP8 attention launches), and the
    floor is its bytes counted by hand: one byte a weight, the block scales, the router and norms in bf16."""
    out = tmp_path / "engine_decode_fp8.json"
    run_smoke("engine_decode", tmp_path, "--fp8", "--graphs", "--kernels", "triton", "--steps", "1", "--batches", "1",
              "--layers", "1", "--out", str(out))
    res = json.loads(out.read_text())
    assert res["fp8"] is True and res["model"].startswith("Qwen3-30B-A3B-FP8") and "e4m3" in res["model"]
    (r,) = res["results"]
    assert positive(r["graph_step_ms"]) and positive(r["step_ms"]) and r["experts_touched_per_layer"] == 4
    hf = engine_decode.SMOKE
    D, N, K, H, I = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"], \
        hf["moe_intermediate_size"]

    def fp8(n: int, k: int) -> int:  # an e4m3 [n, k] weight and its float32 [n / 128, k / 128] scales
        return n * k + -(-n // 128) * -(-k // 128) * 4

    attn = fp8((N + 2 * K) * H, D) + fp8(D, N * H) + 2 * (2 * D + 2 * H)  # + the two norms and the q/k norms (bf16)
    router = 2 * hf["num_experts"] * D
    expert = fp8(2 * I, D) + fp8(D, I)
    kv = 2 * 2 * K * H * (engine_decode.SMOKE_CONTEXT + 1)
    head = 2 * (hf["vocab_size"] + 1) * D
    assert r["bytes_read_floor"] == attn + router + 4 * expert + kv + head
