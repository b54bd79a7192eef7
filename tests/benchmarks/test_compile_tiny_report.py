"""The committed decode-size compile reports (benchmarks/results/compile_report_tiny_sm90.json / _sm100.json, from
`python -m moelink.benchmarks.compile_tiny`): the FP8 tiny GEMVs are there at every case with DEFAULT_TINY_FP8's
blocks as the wrapper launches them, and compile without spills on both targets. Reads JSON only: no compiler."""
from __future__ import annotations

import json

import pytest

from moelink.benchmarks.compile_tiny import CASES, RESULTS, SMS

REGENERATE = "regenerate it: python -m moelink.benchmarks.compile_tiny (Triton 3.6, docs/kernels.md)"


def _report(arch: int) -> dict:
    return json.loads((RESULTS / f"compile_report_tiny_sm{arch}.json").read_text())


@pytest.mark.parametrize("arch", [90, 100])
def test_fp8_tiny_gemvs_at_every_case_spill_free_with_the_default_blocks(arch):
    from moelink.kernels.triton_moe_fp8_tiny import (DEFAULT_TINY_FP8 as TINY, _k_walk, fp8_tiny_down_block_n,
                                                     fp8_tiny_up_block_n)

    rep = _report(arch)
    assert rep["target"].startswith(f"sm_{arch}"), rep["target"]
    for name, (E, K, D, I), T, _ in CASES:
        case = f"{name} T={T} fp8 tiny"
        got = {k["name"]: k for k in rep["kernels"] if k["case"] == case}
        assert {"_tiny_fp8_up_kernel", "_tiny_fp8_down_kernel"} <= set(got), f"{case} missing: {REGENERATE}"
        up, down = got["_tiny_fp8_up_kernel"], got["_tiny_fp8_down_kernel"]
        walk = _k_walk(TINY.up.BLOCK_SIZE_K, D, 128)
        assert up["blocks"] == dict(BLOCK_N=fp8_tiny_up_block_n(TINY.up.BLOCK_SIZE_N, 128, I),
                                    BLOCK_K=walk["BLOCK_K"], K_TILES=walk["K_TILES"]), f"{case}: {REGENERATE}"
        walk = _k_walk(TINY.down.BLOCK_SIZE_K, I, 128, copies=K)
        bn = fp8_tiny_down_block_n(TINY.down.BLOCK_SIZE_N, T, D, SMS, TINY.down.num_warps, 128)
        assert down["blocks"] == dict(BLOCK_N=bn, BLOCK_K=walk["BLOCK_K"], K_TILES=walk["K_TILES"]), REGENERATE
        assert (up["warps"], down["warps"]) == (TINY.up.num_warps, TINY.down.num_warps), REGENERATE
        for k in (up, down):
            assert k["spill_stores"] == 0 and k["spill_loads"] == 0, f"{case} {k['name']} spills on sm_{arch}"
            assert k["registers"] <= 255


@pytest.mark.parametrize("arch", [90, 100])
def test_fp8_two_launch_form_compiles_spill_free_and_its_h_quantization_costs_few_instructions_a_byte(arch):
    """Issue 80's two-launch FP8 form at every case: the norm that quantizes x for the experts (`_rms_norm_kernel`
    with QUANT) compiles spill-free beside the GEMVs, and the gate-up GEMV that quantizes h in its launch
    (`_quant_h_group`) adds little to what a thread issues a weight byte: at Qwen3 and DeepSeek-V3 it is compiled
    both ways ("h apart": the four-launch form), and the fused branch (run by one program in 64 at 2-row programs)
    adds at most 4 static instructions a byte, within 255 registers and no spills."""
    rep = _report(arch)
    by_case = {(k["case"], k["name"]): k for k in rep["kernels"]}
    for name, _, T, _ in CASES:
        norm = by_case.get((f"{name} T={T} fp8 tiny", "_rms_norm_kernel"))
        assert norm is not None, f"{name} T={T}: the norm's quantizing launch is missing: {REGENERATE}"
        assert norm["spill_stores"] == 0 and norm["spill_loads"] == 0
    for name in ("qwen3-30b-a3b", "deepseek-v3"):
        fused = by_case[(f"{name} T=1 fp8 tiny", "_tiny_fp8_up_kernel")]
        apart = by_case[(f"{name} T=1 fp8 tiny h apart", "_tiny_fp8_up_kernel")]
        assert fused["weight_bytes_thread"] == apart["weight_bytes_thread"], REGENERATE
        assert 0 < fused["instr_per_weight_byte"] - apart["instr_per_weight_byte"] <= 4, (fused, apart)
        assert fused["registers"] <= 255 and fused["spill_stores"] == 0


def test_fp8_tiny_keeps_an_h100_sm_streaming():
    """What lets the e4m3 GEMVs reach the copy bandwidth on an H100 (half the bf16 GEMVs' bytes: issue 80's
    FP8 >= 1.6x bf16 row): each GEMV keeps at least the ~20 KB in flight an SM needs, at every case on sm_90."""
    for k in _report(90)["kernels"]:
        if k["name"] in ("_tiny_fp8_up_kernel", "_tiny_fp8_down_kernel"):
            assert k["kb_in_flight_sm"] >= 20, f"{k['case']} {k['name']}: {k['kb_in_flight_sm']} KB in flight an SM"


@pytest.mark.parametrize("arch", [90, 100])
def test_mxfp4_per_tile_gemms_decode_in_few_instructions_with_the_scales_one_step_ahead(arch):
    """The MXFP4 per-tile GEMMs (benchmarks/results/compile_report_mxfp4_sm90.json / _sm100.json, `compile_tiny
    --cases mxfp4`): at every case, the blocks mxfp4_moe_default.json's bucket gives, tensor cores (wgmma on sm_90,
    tcgen05 on sm_100), no spills; the K step's scale loads read at the step's end (loaded one step ahead, not
    waited for before the decode: the old loop read them ~40-70 instructions after the load); and the bf16 decode's
    instruction count a value (the fp16 -> fp32 -> bf16 decode it replaced issued 11.1 / 10.0 a value up / down at
    the old 64x64x64/8w blocks on sm_90)."""
    from moelink.benchmarks.compile_cases_mxfp4 import GPT_OSS_SHAPES
    from moelink.benchmarks.compile_tiny import MXFP4_TOKENS
    from moelink.kernels.moe_config import _pick, committed_config

    rep = json.loads((RESULTS / f"compile_report_mxfp4_sm{arch}.json").read_text())
    assert rep["target"].startswith(f"sm_{arch}") and rep["cases"] == "mxfp4", REGENERATE
    _, table = committed_config("mxfp4_moe_default.json")
    for name, (E, K, D, I) in GPT_OSS_SHAPES.items():
        for T in MXFP4_TOKENS:
            case = f"{name} T={T} MXFP4 per-tile"
            got = {k["name"]: k for k in rep["kernels"] if k["case"] == case}
            assert {"_moe_mxfp4_up_kernel", "_moe_mxfp4_down_kernel"} <= set(got), f"{case} missing: {REGENERATE}"
            cfg = _pick("rows_per_expert", table, T, K, E)
            for k, g in ((got["_moe_mxfp4_up_kernel"], cfg.up), (got["_moe_mxfp4_down_kernel"], cfg.down)):
                assert k["blocks"] == dict(BLOCK_M=cfg.BLOCK_SIZE_M, BLOCK_N=g.BLOCK_SIZE_N,
                                           BLOCK_K=max(32, g.BLOCK_SIZE_K)), f"{case}: {REGENERATE}"
                assert k["warps"] == g.num_warps, REGENERATE
                assert k["spill_stores"] == 0 and k["spill_loads"] == 0, f"{case} {k['name']} spills on sm_{arch}"
                assert (k["sass_gmma"] if arch == 90 else k["sass_utc"]) > 0, f"{case} {k['name']}: no wgmma/tcgen05"
                assert k["ldg_distance"] is not None and k["ldg_distance"] >= k["loop_instructions"] // 2, k
                assert k["instr_per_value"] <= 9.5, f"{case} {k['name']}: {k['instr_per_value']} a value"


@pytest.mark.parametrize("arch", [90, 100])
def test_mxfp4_pair_order_drops_the_byte_permutes(arch):
    """The MXFP4 blocks in the decode's pair order (kernels/mxfp4.to_pair_order, permuted once after load): at the
    128-row blocks (gpt-oss-20b, 1,024 tokens) one K step of either GEMM issues no PRMT and fewer instructions than
    the same kernel on the checkpoint's order (sm_90: 44 / 22 PRMT a step there), in the same registers."""
    rep = json.loads((RESULTS / f"compile_report_mxfp4_sm{arch}.json").read_text())
    by_case = {(k["case"], k["name"]): k for k in rep["kernels"]}
    for kernel in ("_moe_mxfp4_up_kernel", "_moe_mxfp4_down_kernel"):
        pairs = by_case[("gpt-oss-20b T=1024 MXFP4 per-tile", kernel)]
        natural = by_case.get(("gpt-oss-20b T=1024 MXFP4 per-tile checkpoint order", kernel))
        assert natural is not None, REGENERATE
        assert pairs["loop_mix"].get("PRMT", 0) == 0 < natural["loop_mix"].get("PRMT", 0), (pairs, natural)
        assert pairs["loop_instructions"] < natural["loop_instructions"]
        assert pairs["registers"] <= natural["registers"] and pairs["spill_stores"] == 0
