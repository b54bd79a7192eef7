"""benchmarks/decode_launches.py --small (a subprocess: the Triton interpreter must be on before the kernels are
defined; seconds): the launch list of one batch-1 decode layer, and the fusions it must show (issue 31)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tests.helpers.fast_interpreter import interpreter_env
from tests.helpers import zygote


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """Both models as float checkpoints ("float") and as FP8 ones ("fp8", `--fp8`), in one child: model key -> result."""
    out = tmp_path_factory.mktemp("launches")
    env = interpreter_env()
    script = ("from moelink.benchmarks.decode_launches import main; "
              f"main(['--small', '--context', '40', '--out', {str(out / 'float.json')!r}]); "
              f"main(['--small', '--context', '40', '--fp8', '--out', {str(out / 'fp8.json')!r}])")
    proc = zygote.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env,
                      fork_code=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {}
    for kind in ("float", "fp8"):
        res = json.loads((out / f"{kind}.json").read_text())
        assert res["command"].endswith(f"--small --context 40{' --fp8' if kind == 'fp8' else ''} --out "
                                       + str(out / f"{kind}.json"))
        got[kind] = {r["model_key"]: r for r in res["results"]}
    return got


@pytest.fixture(scope="module")
def counts(runs) -> dict:
    return runs["float"]


def names(res: dict) -> list[str]:
    return [r["name"] for r in res["per_launch"]]


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_every_launch_is_listed_with_its_bytes_and_the_floor(counts):
    assert set(counts) == {"qwen3-30b-a3b", "deepseek-v2-lite"}
    for res in counts.values():
        assert res["launches"] == res["triton_launches"] + res["torch_launches"] == len(res["per_launch"])
        assert res["host_syncs"] == 0  # a decode graph captures this layer: no sync may sit in it
        f = res["floor_bytes"]
        assert f["total"] == f["weights_but_experts"] + f["routed_experts"] + f["kv"] > 0
        # The launches read every floor byte (the weights, the K/V) and move little more at batch 1.
        assert 1.0 <= res["launch_bytes_over_floor"] < 1.2
        assert all(r["read"] >= 0 and r["write"] >= 0 and r["site"] != "?" for r in res["per_launch"])


def test_decode_fusions_show_in_the_count(counts):
    qwen, dsv2 = names(counts["qwen3-30b-a3b"]), names(counts["deepseek-v2-lite"])
    # GQA: the input norm, the q/k/v GEMV and q/k norm + rotary + KV write in one launch; MLA: latent norm +
    # rotary + latent write in one.
    assert qwen.count("_norm_qkv_kernel") == 1 and "_rope_kv_kernel" not in qwen
    assert "_rotary_kernel" not in qwen and "_write_kv_kernel" not in qwen
    assert dsv2.count("_mla_input_kernel") == 1 and "_write_latent_kernel" not in dsv2
    # o_proj, the residual add and the FFN block's norm in one (GQA and MLA).
    assert qwen.count("_linear_norm_kernel") == 1 and dsv2.count("_linear_norm_kernel") == 1
    # The router (the gate GEMV, scores, top-k, renormalisation, padding mask, expert counts) in one launch; the
    # DeepSeek family's float32 cast of x inside it.
    for launched in (qwen, dsv2):
        assert launched.count("_gate_topk_kernel") == 1 and "_router_topk_kernel" not in launched
        assert not {"softmax.int", "topk.default", "masked_fill.Scalar", "index_add_.default", "to.dtype"} & set(
            launched)
    # The shared experts in two launches: gate-up with SiLU·up, down with the routed experts' sum added
    # (engine/models/mlp_fusion.py): no GEMM, activation or add launch of their own.
    assert dsv2.count("_mlp_gate_up_kernel") == 1 and dsv2.count("_mlp_down_kernel") == 1
    assert not {"_silu_mul_kernel", "silu.default", "add.Tensor"} & set(dsv2), dsv2
    # Norms: none of their own in a Qwen3 layer; MLA's input norm alone (its output norm is in the o_proj launch).
    assert "_rms_norm_kernel" not in qwen and dsv2.count("_rms_norm_kernel") == 1
    # A Qwen3 layer runs no torch op: every launch is a Triton kernel.
    assert "linear.default" not in qwen and counts["qwen3-30b-a3b"]["torch_launches"] == 0


@pytest.mark.slow  # over 1 s
def test_fp8_checkpoints_keep_the_fused_launches(runs):
    """An FP8 checkpoint (e4m3 projections and experts, 128 x 128 blocks) runs the same attention launches as a
    float one: no norm, activation-quantization or FP8 GEMM launch of their own around attention in a Qwen3 layer
    (the experts' input quantized by the output launch), MLA's o_proj and norm in one launch too."""
    qwen, dsv2 = names(runs["fp8"]["qwen3-30b-a3b"]), names(runs["fp8"]["deepseek-v2-lite"])
    assert runs["fp8"]["qwen3-30b-a3b"]["model"].startswith("Qwen3-30B-A3B-FP8")
    assert qwen.count("_norm_qkv_kernel") == 1 and qwen.count("_linear_norm_kernel") == 1
    assert not {"_rms_norm_kernel", "_group_quant_kernel", "_fp8_gemm_kernel", "_rope_kv_kernel"} & set(qwen), qwen
    assert any(n.startswith("_moe_fp8") or "fp8" in n for n in qwen), "the experts are FP8"
    assert dsv2.count("_linear_norm_kernel") == 1 and dsv2.count("_gate_topk_kernel") == 1
    # The FP8 shared experts in the same two launches (each quantizing its own input row): the one activation
    # quantization and FP8 GEMM left are MLA's fused q / kv_a projection's.
    assert dsv2.count("_mlp_gate_up_kernel") == 1 and dsv2.count("_mlp_down_kernel") == 1
    assert dsv2.count("_group_quant_kernel") == dsv2.count("_fp8_gemm_kernel") == 1, dsv2
    for res in runs["fp8"].values():
        assert res["host_syncs"] == 0 and 1.0 <= res["launch_bytes_over_floor"] < 1.2
