"""The committed offline sm_90 compile report (benchmarks/results/compile_report_sm90.json) covers every Triton
kernel and every launch config in kernels/configs/ as they are now, with zero spills and tensor-core
instructions in the GEMM kernels; and benchmarks/compile_report.py runs here (no GPU).

When a config file or a kernel changes, regenerate the report (CPU only, ~4 min):
    python -m moelink.benchmarks.compile_report            # or: bash benchmarks/gpu_session.sh compile-report
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from moelink.benchmarks import compile_report
from moelink.kernels.moe_config import CONFIG_DIR, load_config_file

REPORT = compile_report.RESULTS / "compile_report_sm90.json"
REGENERATE = "regenerate it: python -m moelink.benchmarks.compile_report (see this test's docstring)"
ALL_KERNELS = {"_align_scatter_kernel", "_align_count_kernel", "_moe_up_kernel", "_moe_down_kernel", "_moe_sum_kernel",
               "_decode_kernel", "_merge_splits_kernel", "_prefill_kernel", "_write_kv_kernel", "_rms_norm_kernel",
               "_rotary_kernel", "_mla_kernel", "_mla_merge_kernel", "_write_latent_kernel", "_widen_kernel",
               "_plan_kernel", "_merge_plan_kernel", "_mla_merge_plan_kernel",
               "_group_quant_kernel", "_fp8_gemm_kernel", "_moe_fp8_up_kernel", "_moe_fp8_down_kernel",
               "_moe_mxfp4_up_kernel", "_moe_mxfp4_down_kernel", "_moe_nvfp4_up_kernel", "_moe_nvfp4_down_kernel",
               "_moe_int4_up_kernel", "_moe_int4_down_kernel", "_tiny_int4_up_kernel", "_tiny_int4_down_kernel",
               "_tiny_up_kernel", "_tiny_down_kernel", "_tiny_fp8_up_kernel", "_tiny_fp8_down_kernel",
               "_tiny_mxfp4_up_kernel", "_tiny_mxfp4_down_kernel",
               "_mxfp4_dequant_kernel", "_int4_dequant_kernel", "_rope_kv_kernel", "_mla_input_kernel", "_router_topk_kernel",
               "_silu_mul_kernel", "_gdn_recurrent_kernel", "_commit_kernel", "_gating_kernel", "_conv_varlen_kernel",
               "_conv_state_kernel", "_conv_update_kernel", "_index_scores_kernel", "_topk_kernel", "_sparse_mla_kernel",
               "_partial_topk_kernel", "_merge_topk_kernel", "_write_fp8_keys_kernel", "_sparse_gqa_kernel",
               "_compress_kv_kernel", "_compressed_index_scores_kernel", "_sink_attention_kernel",
               "_grouped_linear_kernel", "_hc_expand_kernel", "_paged_scores_kernel",
               "_paged_sink_attention_kernel", "_paged_merge_kernel", "_pool_scores_kernel", "_pool_select_kernel",
               "_block_scores_kernel", "_block_sparse_kernel", "_lora_shrink_kernel", "_lora_expand_kernel",
               "_sorted_lora_shrink_kernel", "_sorted_lora_expand_kernel", "_bi_split_kernel", "_bi_merge_kernel", "_bi_matmul_kernel",
               "_norm_qkv_kernel", "_linear_norm_kernel", "_gate_topk_kernel", "_mlp_gate_up_kernel",
               "_mlp_down_kernel", "_mamba1_recurrent_kernel", "_mamba2_recurrent_kernel"}


# Kernels not yet in the committed report: batch-invariant mode's (compile_cases_batch_invariant.py;
# tests/kernels/test_triton_compile.py compiles them for sm_90 and sm_100 and checks their spills meanwhile). A
# family merges in with the GPU image's Triton 3.6 installed beside this machine's 3.9 (`pip install --no-deps
# --target /tmp/triton36 triton==3.6.0`, then `PYTHONPATH=/tmp/triton36 python -m moelink.benchmarks.compile_report
# --only FAMILY --merge`: the decode family so, LoRA's kernels with it, 2026-11-29).
# The Mamba recurrences (Granite 4.0-H, Nemotron 3, Jamba) likewise: test_triton_compile compiles them for both archs
# and checks their spills.
AWAITING_REPORT: set[str] = {"_bi_split_kernel", "_bi_merge_kernel", "_bi_matmul_kernel", "_mamba1_recurrent_kernel",
                             "_mamba2_recurrent_kernel"}


def report() -> dict:
    assert REPORT.is_file(), f"{REPORT} is missing: {REGENERATE}"
    return json.loads(REPORT.read_text())


def kernel_sources() -> set[str]:
    """Every @triton.jit kernel (a name ending in _kernel) defined in kernels/."""
    names = set()
    for p in Path(compile_report.__file__).resolve().parents[1].joinpath("kernels").glob("*.py"):
        names |= set(re.findall(r"@triton\.jit(?:\([^)]*\))?[ \t]*(?:#[^\n]*)?\ndef (\w+_kernel)\(", p.read_text()))
    return names


def test_report_covers_every_kernel():
    names = {k["name"] for k in report()["kernels"]}
    # (_probe_kernel, triton_common's interpreter probe, is never launched)
    assert kernel_sources() - {"_probe_kernel"} == ALL_KERNELS, "a kernel was added or renamed: add it to the report and here"
    assert names >= ALL_KERNELS - AWAITING_REPORT, f"missing from the report: {sorted(ALL_KERNELS - names)}; {REGENERATE}"


def configs_in_repo():
    """(label, shape, MoELaunchConfig) for every default.json bucket at each model shape and every tuned file's bucket."""
    _, default = load_config_file(str(CONFIG_DIR / "default.json"))
    for shape in compile_report.MODEL_SHAPES:
        for bucket, cfg in default:
            yield f"default.json[{bucket}]", shape, cfg
    for path in sorted(CONFIG_DIR.glob("E=*,N=*,device_name=*.json")):
        E, I = map(int, re.match(r"E=(\d+),N=(\d+),", path.name).groups())
        shapes = [n for n, s in compile_report.MODEL_SHAPES.items() if (s[0], s[3]) == (E, I)]
        if shapes:
            for bucket, cfg in load_config_file(str(path))[1]:
                yield f"{path.name}[{bucket}]", shapes[0], cfg


def test_report_covers_every_config_as_it_is_now():
    kernels = report()["kernels"]
    for label, shape, cfg in configs_in_repo():
        for name, g in (("_moe_up_kernel", cfg.up), ("_moe_down_kernel", cfg.down)):
            hits = [k for k in kernels if k["name"] == name and any(c.startswith(f"{shape} ") and c.endswith(f" {label}")
                                                                     for c in k["cases"])]
            assert hits, f"{name} for {shape} {label} is not in the report: {REGENERATE}"
            c = hits[0]["constexprs"]
            got = (c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["GROUP_M"], hits[0]["num_warps"], hits[0]["num_stages"])
            want = (cfg.BLOCK_SIZE_M, g.BLOCK_SIZE_N, g.BLOCK_SIZE_K, g.GROUP_SIZE_M, g.num_warps, g.num_stages)
            assert got == want, f"{name} {shape} {label}: report has {got}, the file {want}: {REGENERATE}"


def test_report_covers_the_tiny_path():
    """The float tiny-batch GEMVs (kernels/triton_moe_tiny.py) at every model shape with DEFAULT_TINY_FLOAT's blocks,
    K in steps of unrolled tiles (K_TILES, BLOCK_K clamped to the dimension), and (Qwen3, one token: 2048 / 2 = 1,024
    one-warp programs < 16 x 132) the down GEMV narrowed to one row. Spills are checked with every kernel below."""
    import triton

    from moelink.kernels.moe_config import DEFAULT_TINY_FLOAT as TINY
    from moelink.kernels.triton_moe_tiny import UNROLLED, gemv_block_n

    kernels = report()["kernels"]

    def launched(name, case):
        hits = [k for k in kernels if k["name"] == name and case in k["cases"]]
        assert hits, f"{name} for {case!r} is not in the report: {REGENERATE}"
        return hits[0]

    for shape, (E, K, D, I) in compile_report.MODEL_SHAPES.items():
        for T in (1, 8):
            case = f"{shape} T={T} tiny DEFAULT_TINY_FLOAT"
            up, down = launched("_tiny_up_kernel", case), launched("_tiny_down_kernel", case)
            bk, tiles = UNROLLED.tiles(TINY.up.BLOCK_SIZE_K, D)
            assert (up["constexprs"]["BLOCK_N"], up["constexprs"]["BLOCK_K"], up["constexprs"]["K_TILES"],
                    up["num_warps"]) == (TINY.up.BLOCK_SIZE_N, bk, tiles["K_TILES"], TINY.up.num_warps), REGENERATE
            assert bk == min(TINY.up.BLOCK_SIZE_K, triton.next_power_of_2(D)) and tiles["ONE_STEP"]  # (no K loop)
            c = down["constexprs"]
            assert c["BLOCK_N"] == gemv_block_n(TINY.down.BLOCK_SIZE_N, T, D, 132, TINY.down.num_warps), REGENERATE
            bk, tiles = UNROLLED.tiles(TINY.down.BLOCK_SIZE_K, I, K)
            assert (c["BLOCK_K"], c["K_TILES"], c["ONE_STEP"], c["TOP_K"]) == (bk, tiles["K_TILES"], tiles["ONE_STEP"],
                                                                                K), REGENERATE
    assert gemv_block_n(TINY.down.BLOCK_SIZE_N, 1, 2048, 132, 1) == 1  # (the narrowing this report shows)


def test_report_covers_the_fp8_tiny_path():
    """The e4m3 tiny GEMVs (kernels/triton_moe_fp8_tiny.py) at one token of both FP8 model shapes with
    DEFAULT_TINY_FP8's blocks as the wrapper launches them (K walk, rows narrowed to one 128-row scale block, the
    down GEMV's grid narrowing); spill-free like every kernel (checked below)."""
    from moelink.kernels.triton_moe_fp8_tiny import (DEFAULT_TINY_FP8 as TINY, _k_walk, fp8_tiny_down_block_n,
                                                     fp8_tiny_up_block_n)

    kernels = report()["kernels"]
    for shape in ("qwen3-30b-a3b", "deepseek-v3"):
        E, K, D, I = compile_report.MODEL_SHAPES[shape]
        case = f"{shape} T=1 fp8 tiny DEFAULT_TINY_FP8"
        for name, gemv, want in (
                ("_tiny_fp8_up_kernel", TINY.up, dict(BLOCK_N=fp8_tiny_up_block_n(TINY.up.BLOCK_SIZE_N, 128, I),
                                                      **_k_walk(TINY.up.BLOCK_SIZE_K, D, 128))),
                ("_tiny_fp8_down_kernel", TINY.down,
                 dict(BLOCK_N=fp8_tiny_down_block_n(TINY.down.BLOCK_SIZE_N, 1, D, 132, TINY.down.num_warps, 128),
                      **_k_walk(TINY.down.BLOCK_SIZE_K, I, 128, copies=K)))):
            hits = [k for k in kernels if k["name"] == name and case in k["cases"]]
            assert hits, f"{name} for {case!r} is not in the report: {REGENERATE}"
            got = {a: hits[0]["constexprs"][a] for a in want}
            assert got == want and hits[0]["num_warps"] == gemv.num_warps, f"{name} {case}: {got}: {REGENERATE}"


def test_report_covers_the_mxfp4_paths():
    """Every bucket of mxfp4_moe_default.json at gpt-oss-120b's shape as its path launches it: the two MXFP4 GEMVs
    (with the config's TINY blocks), the pre-pass and the float GEMMs (DEQUANT), or the per-tile kernels."""
    kernels = report()["kernels"]
    _, table = load_config_file(str(CONFIG_DIR / "mxfp4_moe_default.json"))
    E, K = 128, 4
    for bucket, cfg in table:
        case = f"gpt-oss-120b MXFP4 T={max(1, -(-bucket * E // K))} mxfp4_moe_default.json[{bucket}]"
        names = (["_tiny_mxfp4_up_kernel", "_tiny_mxfp4_down_kernel"] if cfg.tiny is not None else
                 ["_mxfp4_dequant_kernel", "_moe_up_kernel", "_moe_down_kernel"] if cfg.dequant else
                 ["_moe_mxfp4_up_kernel", "_moe_mxfp4_down_kernel"])
        for name in names:
            hits = [k for k in kernels if k["name"] == name and case in k["cases"]]
            assert hits, f"{name} for {case!r} is not in the report: {REGENERATE}"
            if name == "_tiny_mxfp4_up_kernel":
                c = hits[0]["constexprs"]
                assert (c["BLOCK_N"], c["BLOCK_K"]) == (cfg.tiny.up.BLOCK_SIZE_N, cfg.tiny.up.BLOCK_SIZE_K), REGENERATE
            if name == "_moe_mxfp4_up_kernel":
                assert hits[0]["constexprs"]["BLOCK_M"] == cfg.BLOCK_SIZE_M, REGENERATE


def test_report_zero_spills_tensor_cores_in_gemms_and_shared_memory_fits():
    rep = report()
    for k in rep["kernels"]:
        what = f"{k['name']} {k['constexprs']} ({'; '.join(k['cases'][:2])})"
        assert k["spill_stores"] == 0 and k["spill_loads"] == 0 and k["local"] == 0, f"spills: {what}"
        assert k["shared"] <= compile_report.H100_SMEM, f"shared memory {k['shared']}: {what}"
        assert k["registers"] <= 255
        fp32 = any("float32" in c or "fp32" in c for c in k["cases"])
        if (k["name"] in compile_report.GEMM_KERNELS + compile_report.ATTN_DOT_KERNELS + compile_report.FP8_GEMM_KERNELS
                and not fp32):
            assert k["tensor_cores"] in ("wgmma", "mma.sync"), f"no tensor-core instruction: {what}"
        if k["tensor_cores"] == "wgmma":
            assert k["constexprs"].get("BLOCK_M", 64) >= 64 or k["name"] in compile_report.ATTN_DOT_KERNELS
    gemm = [k for k in rep["kernels"] if k["name"] in compile_report.GEMM_KERNELS]
    assert any(k["tensor_cores"] == "wgmma" and k.get("sass_hgmma", 0) > 0 for k in gemm)  # Hopper's MMA in SASS
    assert rep["summary"]["spilling"] == [] and rep["target"].startswith("cuda sm_90")
    # FP8: every default bucket's gate-up and down GEMM compiled, and the large ones on FP8 wgmma (SASS QGMMA).
    fp8 = [k for k in rep["kernels"] if k["name"] in compile_report.FP8_GEMM_KERNELS]
    assert {k["name"] for k in fp8} == set(compile_report.FP8_GEMM_KERNELS)
    assert all(k.get("sass_qgmma", 0) > 0 for k in fp8 if k["constexprs"]["BLOCK_M"] >= 64)


@pytest.mark.slow
@pytest.mark.xdist_group("mla_compile_report")  # the worker that ran the report (tests/kernels/conftest.py)
def test_compile_report_script_runs_without_a_gpu(mla_compile_report):
    """`python -m moelink.benchmarks.compile_report --only mla --quick` as a user runs it: the session's one run
    (`mla_compile_report`, which test_mla.py reads too; this test ran `--only norm` in a child of its own): it exits
    0 and writes the JSON and the Markdown, cuobjdump and ptxas both answered for every kernel."""
    proc, out = mla_compile_report
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(Path(f"{out}.json").read_text())
    assert "_mla_kernel" in {k["name"] for k in rep["kernels"]}
    for k in rep["kernels"]:  # cuobjdump and ptxas both answered
        assert k["registers"] > 0 and k["spill_stores"] == 0 and k["target"] == "sm_90"
    assert "| _mla_kernel |" in Path(f"{out}.md").read_text()


def test_report_covers_every_fp8_config_as_it_is_now():
    """Every bucket of fp8_moe_default.json (gate-up and down, at both FP8 model shapes) and of fp8_linear.json is
    in the report with the blocks, warps and stages the wrapper launches it with (BK capped at 128, the gate-up
    BN raised to a multiple of it)."""
    from moelink.kernels.triton_fp8 import _linear_buckets
    from moelink.kernels.triton_moe_fp8 import _blocks

    kernels = report()["kernels"]

    def launched(name, label):
        hits = [k for k in kernels if k["name"] == name and any(c.endswith(f" {label}") for c in k["cases"])]
        assert hits, f"{name} {label} is not in the report: {REGENERATE}"
        c = hits[0]["constexprs"]
        return c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["GROUP_M"], hits[0]["num_warps"], hits[0]["num_stages"]

    _, default = load_config_file(str(CONFIG_DIR / "fp8_moe_default.json"))
    for bucket, cfg in default:
        up_bn, up_bk, down_bn, down_bk = _blocks(cfg, 128)
        label = f"fp8_moe_default.json[{bucket}]"
        assert launched("_moe_fp8_up_kernel", label) == (cfg.BLOCK_SIZE_M, up_bn, up_bk, cfg.up.GROUP_SIZE_M,
                                                         cfg.up.num_warps, cfg.up.num_stages), REGENERATE
        assert launched("_moe_fp8_down_kernel", label) == (cfg.BLOCK_SIZE_M, down_bn, down_bk, cfg.down.GROUP_SIZE_M,
                                                           cfg.down.num_warps, cfg.down.num_stages), REGENERATE
    for bucket, cfg in _linear_buckets("gpu"):
        g = cfg.up
        assert launched("_fp8_gemm_kernel", f"fp8_linear.json[{bucket}]") == (
            cfg.BLOCK_SIZE_M, g.BLOCK_SIZE_N, min(g.BLOCK_SIZE_K, 128), g.GROUP_SIZE_M, g.num_warps, g.num_stages), REGENERATE


def test_merge_replaces_a_family_where_its_rows_were():
    """`--only F --merge`: F's old rows go, its new ones take their place (not the end), the rest stay as they were;
    a new kernel name counts as F's."""
    row = lambda name, h: dict(name=name, hash=h, cases=[f"case {h}"])  # noqa: E731
    old = dict(triton="3.6.0", ptxas="12.8", kernels=[row("_moe_up_kernel", 1), row("_decode_kernel", 2),
                                                       row("_prefill_kernel", 3), row("_rms_norm_kernel", 4)])
    new = dict(triton="3.6.0", ptxas="12.8", date="d", commit="c",
               kernels=[row("_plan_kernel", 5), row("_decode_kernel", 6), row("_prefill_kernel", 7)])
    merged = compile_report.merge_into(old, new, "attention")
    assert [k["hash"] for k in merged["kernels"]] == [1, 5, 6, 7, 4]
    assert merged["merged"][-1] == dict(only="attention", date="d", commit="c")


def test_report_has_one_record_per_kernel_config_dtypes_and_shape_class():
    kernels = report()["kernels"]
    keys = [compile_report.record_key(k) for k in kernels]
    assert None not in keys, f"records without dtypes / shape_class: {REGENERATE}"
    assert len(keys) == len(set(keys)), f"duplicate records: {REGENERATE}"


def test_report_covers_the_schedule_keys_at_every_default_bucket():
    """PERSISTENT, TMA and WARP_SPECIALIZE (kernels/moe_schedule.py), alone and together, compiled for both GEMMs at
    every default.json bucket and model shape (bf16) and every fp8_moe_default.json bucket (FP8); TMA kernels issue
    UTMALDG and keep their tensor-core instructions."""
    from moelink.benchmarks.compile_cases import NEW_KEY_VARIANTS

    kernels = report()["kernels"]
    _, default = load_config_file(str(CONFIG_DIR / "default.json"))
    _, fp8_default = load_config_file(str(CONFIG_DIR / "fp8_moe_default.json"))
    want = [(n, f"default.json[{b}]", ("_moe_up_kernel", "_moe_down_kernel"), NEW_KEY_VARIANTS)
            for n in compile_report.MODEL_SHAPES for b, _ in default]
    want += [(n, f"fp8_moe_default.json[{b}]", ("_moe_fp8_up_kernel", "_moe_fp8_down_kernel"), NEW_KEY_VARIANTS[:3])
             for n in ("deepseek-v3", "qwen3-30b-a3b") for b, _ in fp8_default]
    for shape, label, names, variants in want:
        for variant, keys in variants:
            for name in names:
                hits = [k for k in kernels if k["name"] == name
                        and any(c.startswith(f"{shape} ") and c.endswith(f" {label} {variant}") for c in k["cases"])]
                assert hits, f"{name} {shape} {label} {variant} is not in the report: {REGENERATE}"
                k = hits[0]
                assert bool(k["constexprs"]["PERSISTENT"]) == bool(keys.get("PERSISTENT"))
                # the TMA constexpr: 0 pointers, 1 TMA, 2 TMA + warp-specialized K loop (the bf16 down GEMM only)
                ws = keys.get("WARP_SPECIALIZE") and name == "_moe_down_kernel"
                mode = (2 if ws else 1) if keys.get("TMA") else 0
                assert k["constexprs"]["TMA"] == mode and bool(k["tma"]) == bool(mode), (name, shape, label, variant)
                if k["tma"]:
                    assert k.get("sass_utmaldg", 0) > 0 and k["tensor_cores"] != "none", (name, shape, label, variant)
    # Warp specialization takes where the down GEMM runs wgmma with 4 warps: a producer warp group joins two
    # consumer groups (12 warps), with no spills.
    ws = [k for k in kernels if k["name"] == "_moe_down_kernel" and k["constexprs"].get("TMA") == 2]
    assert any(k["num_warps"] == 12 and k["sass_hgmma"] > 0 for k in ws) and all(k["spill_stores"] == 0 for k in ws)


def test_merge_keeps_one_record_per_key():
    """A shared kernel recompiled by `--only X --merge` at another commit (another source hash, same key) joins
    the old record instead of adding a duplicate row."""
    base = dict(name="_moe_sum_kernel", constexprs={"BLOCK_D": 1024}, num_warps=4, num_stages=3, dtypes="*bf16",
                shape_class="div16[] eq1[]")
    old = dict(triton="3.6.0", ptxas="12.8", kernels=[dict(base, hash="aaa", cases=["a"])])
    new = dict(triton="3.6.0", ptxas="12.8", date="d", commit="c",
               kernels=[dict(base, hash="bbb", cases=["a", "b"]), dict(base, hash="ccc", dtypes="*fp32", cases=["c"])])
    merged = compile_report.merge_into(old, new, "moe")
    assert [(k["hash"], k["cases"]) for k in merged["kernels"]] == [("aaa", ["a", "b"]), ("ccc", ["c"])]


@pytest.mark.parametrize("pattern", [r"HGMMA\b", r"HMMA\b", r"LDGSTS\b", r"wgmma\.mma_async", r"mma\.sync",
                                     r"cp\.async\.(?:ca|cg)"])
def test_instruction_counts_equal_the_word_boundary_findall(pattern):
    r"""The report's one-pass instruction count gives `re.findall(r"\b" + pattern)`'s count: at the text's start,
    after spaces, dots, tabs, braces and non-ASCII letters (not after a letter, digit or underscore)."""
    text = ("HGMMA.64x128 R0; xHGMMA _HGMMA 9HGMMA HGMMAB HGMMA_ \tHGMMA\n{HGMMA} éHGMMA .HGMMA HMMA.16816 "
            "QHMMA HMMA\n"
            "LDGSTS.E [R1]; ULDGSTS LDGSTS\nwgmma.mma_async.sync.aligned.m64n128k16 xwgmma.mma_async wgmma.mma_async\n"
            "mma.sync.aligned @p mma.sync wgmma.mma.sync _mma.sync cp.async.ca.shared cp.async.cg x.cp.async.cg "
            "bcp.async.ca cp.async.bulk.tensor\n")
    for t in (text, text[1:], text * 3, ""):
        assert compile_report.count_at_word_start(pattern, t) == len(re.findall(r"\b" + pattern, t)), (pattern, t)
    assert compile_report.count_at_word_start(pattern, text) > 0
