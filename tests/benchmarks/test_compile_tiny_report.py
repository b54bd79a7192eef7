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


def test_fp8_tiny_keeps_an_h100_sm_streaming():
    """What lets the e4m3 GEMVs reach the copy bandwidth on an H100 (half the bf16 GEMVs' bytes: issue 80's
    FP8 >= 1.6x bf16 row): each GEMV keeps at least the ~20 KB in flight an SM needs, at every case on sm_90."""
    for k in _report(90)["kernels"]:
        if k["name"] in ("_tiny_fp8_up_kernel", "_tiny_fp8_down_kernel"):
            assert k["kb_in_flight_sm"] >= 20, f"{k['case']} {k['name']}: {k['kb_in_flight_sm']} KB in flight an SM"
