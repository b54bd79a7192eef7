"""benchmarks/batch_invariant.py runs (its --cpu-smoke, in this process) and saves both arms side by side with the
ratio, and its check reads what the mode gives: the invariant arm's request equal alone and batched."""
from __future__ import annotations

import json

import pytest


@pytest.mark.usefixtures("heap_held_frozen")
def test_smoke_saves_both_arms_and_the_ratio(tmp_path):
    from moelink.benchmarks.batch_invariant import main

    out = tmp_path / "bi.json"
    result = main(["--cpu-smoke", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    normal, invariant = saved["arms"]
    assert (normal["batch_invariant"], invariant["batch_invariant"]) == (False, True)
    assert invariant["kernels"] == "batch_invariant" and invariant["alone_equals_batched_bitwise"] is True
    # Which backend ran (on a GPU the mode's is batch_invariant_triton): the CPU's native kernels and the mode's
    # plain-torch ones here.
    assert (normal["backend"], invariant["backend"]) == ("cpu_native", "batch_invariant")
    assert saved["ratio_invariant_over_normal"] == pytest.approx(invariant["seconds"] / normal["seconds"])
    # The op probe ran first: every op keeps row 0's bits in the mode on this CPU, and at least one op does not off it.
    ops = {r["op"]: r for r in saved["ops"]}
    assert ops and all(r["mode"] is True for r in ops.values()), ops
    assert any(r["off"] is False for r in ops.values())


@pytest.mark.slow  # over 1 s (2026-11-27: 1.5 s alone, 0.2 s after the smoke above)
@pytest.mark.usefixtures("heap_held_frozen")
def test_shape_smoke_runs_both_arms_on_random_weights_of_the_shape_without_the_probe(tmp_path):
    """--shape (the full-size run the GPU plan's `rl` step makes after the tiny one): both arms on a config.json
    directory of the shape with load_format dummy; here engine_e2e's toy smoke shape. --skip-probe leaves the probe out."""
    from moelink.benchmarks.batch_invariant import main

    out = tmp_path / "bi_shape.json"
    result = main(["--shape", "qwen3-30b-a3b", "--cpu-smoke", "--skip-probe", "--kernel-times", "--out", str(out)])
    saved = json.loads(out.read_text())
    for arm in saved["arms"]:  # --kernel-times (round3 3): a profiled round per arm, by family and by name
        assert arm["kernel_us"] and set(arm["kernel_family_us"]) <= {"moe", "attention", "matmul", "norm", "other"}
    assert set(saved["gap_family_us"]) == set(saved["arms"][0]["kernel_family_us"]) | set(
        saved["arms"][1]["kernel_family_us"])
    assert saved["model"] == "qwen3-30b-a3b shape (toy smoke), 1 of 1 layers, random" and saved["ops"] is None
    normal, invariant = saved["arms"]
    assert invariant["alone_equals_batched_bitwise"] is True
    assert normal["decode_graphs"] == invariant["decode_graphs"] == []  # CPU: every step eager
    assert result["ratio_invariant_over_normal"] > 0
    with pytest.raises(SystemExit):
        main(["--layers", "2", "--cpu-smoke"])  # --layers without --shape


def test_kernel_families_name_what_each_arm_launches():
    """The names the two GPU arms' kernels carry (Triton kernels by their function's name, cuBLAS by its own)."""
    from moelink.benchmarks.kernel_profile import kernel_family

    assert [kernel_family(n) for n in ("_moe_up_kernel", "_align_scatter_kernel", "_bi_split_kernel",
                                       "_bi_merge_kernel", "_decode_kernel", "_bi_matmul_kernel",
                                       "sm90_xmma_gemm_bf16bf16_bf16f32", "nvjet_tst_64x8_64x16", "_rms_norm_kernel",
                                       "aten::linear", "_commit_kernel", "void at::native::elementwise_kernel",
                                       "_mlp_gate_up_kernel", "_mlp_down_kernel", "_linear_norm_kernel")] == [
        "moe", "moe", "attention", "attention", "attention", "matmul", "matmul", "matmul", "norm", "matmul", "other",
        "other", "matmul", "matmul", "matmul"]
