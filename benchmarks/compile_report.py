"""Offline sm_90 compile report: every Triton kernel in kernels/, at its default and tuned launch configs,
compiled for Hopper on a machine without a GPU, with what the compiler made of it.

    python -m moelink.benchmarks.compile_report [--out benchmarks/results/compile_report_sm90]
        [--no-published] [--only moe|attention|mla|norm|decode|fp8|mxfp4|nvfp4|int4|gdn|dsa|block_sparse|compressed|qsa|batch_invariant] [--quick]

How: a stand-in Triton driver answers "current target" with GPUTarget("cuda", 90, 32) (arch 90, warp
size 32: Triton then compiles for sm_90a), and each `kernel[grid](...)` launch in the wrappers becomes
`JITFunction.run(..., warmup=True)`: the real specialisation (signature, constexprs, divisibility of
pointers/strides/sizes) that a launch at that shape would compile, lowered by Triton through TTIR, TTGIR,
LLVM IR and PTX to a cubin by the ptxas Triton ships (triton/backends/nvidia/bin). The wrappers run on
meta tensors, so nothing executes and no memory is allocated. For every distinct compiled kernel:
- registers and local memory per thread from the cubin (`cuobjdump -res-usage`, the shipped cuobjdump);
- spill stores/loads and stack frame from `ptxas -v` on the same PTX (sm_90a);
- shared memory Triton allocated (`metadata.shared`; the sm_90 limit per block is 227 KB);
- tensor-core instructions: PTX `wgmma.mma_async` (Hopper warpgroup MMA; SASS HGMMA) or `mma.sync`
  (SASS HMMA); TMA: PTX `cp.async.bulk.tensor` (SASS UTMALDG); cp.async (LDGSTS) pipelining; counted
  from the SASS when cuobjdump can disassemble it, else from the PTX;
- cold compile seconds (a fresh Triton cache per run unless --cache-dir): an upper bound for the
  GPU machine's compile cost, which benchmarks/gpu_session.sh budgets from.

Configs covered (MoE GEMMs): every bucket of kernels/configs/default.json at each model shape (as it is, with the
fused gate-up tile, and with the PERSISTENT / TMA keys alone and together: compile_cases.NEW_KEY_VARIANTS), every
bucket of every tuned `E=..,N=..,device_name=...json` file at its own shape, and (unless --no-published)
the published seed configs tune_moe.py starts from (benchmarks/tune_moe.py PUBLISHED). The other kernels
(align, top-k sum, attention, KV write, RMSNorm, rotary, the fused decode inputs and router top-k) are compiled at the shapes the engine launches
for the three models; the FP8 block-scaled kernels (fused MoE, dense GEMM, activation quantization) at the
buckets of kernels/configs/fp8_moe_default.json (also with PERSISTENT / TMA), of tuned fp8_w8a8 files, and fp8_linear.json
(compile_cases.compile_fp8). Launches that agree on kernel, launch config, dtypes and shape class (the
divisibility specialisation) are one record (compile_report_text.record_key), also across --merge runs.
Output: <out>.json (every kernel) and <out>.md (tables and notes).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .compile_report_text import (ATTN_DOT_KERNELS, FP8_GEMM_KERNELS, GEMM_KERNELS, H100_SMEM, SLOW_OTHER_KERNELS,  # noqa: F401,E501
                                  markdown, notes, record_key, summarize)
from .compile_cases import (MODEL_SHAPES, TARGET_NAME, Recorder, compile_attention, compile_fp8,  # noqa: F401
                            compile_mla, compile_moe, compile_norm_rotary)
from .compile_cases_decode import compile_decode_inputs
from .compile_cases_block_sparse import compile_block_sparse
from .compile_cases_dsa import compile_dsa
from .compile_cases_compressed_attention import compile_compressed_attention
from .compile_cases_gdn import compile_gdn
from .compile_cases_qsa import compile_qsa
from .compile_cases_mxfp4 import compile_moe_mxfp4
from .compile_cases_nvfp4 import compile_moe_nvfp4
from .compile_cases_int4 import compile_moe_int4
from .compile_cases_batch_invariant import compile_batch_invariant

RESULTS = Path(__file__).parent / "results"


# -- what the compiler made of it ---------------------------------------------------------------------------------------
def nvidia_bin(tool: str) -> str | None:
    import triton

    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    return str(p) if p.is_file() and os.access(p, os.X_OK) else shutil.which(tool)


def triton_ptxas() -> str | None:
    """The ptxas Triton itself runs for sm_90 (Triton 3.9 picks the newer ptxas-blackwell: its PTX is 9.x)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(90).path
    except Exception:  # noqa: BLE001 - older/newer Triton: fall back to the shipped binary
        return nvidia_bin("ptxas")


def tool_version(tool: str | None) -> str | None:
    if not tool:
        return None
    out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return m[2] if m else out.strip().splitlines()[-1] if out.strip() else None


def count_at_word_start(pattern: str, text: str) -> int:
    """`len(re.findall(r"\\b" + pattern, text))` for a `pattern` that starts with a word character and cannot overlap
    itself (an instruction's name), in one fast pass: a leading `\\b` keeps `re` from searching for the literal
    start, so each such findall walked a kernel's SASS character by character (~15 % of a compile report's CPU,
    py-spy). Here the literal-led pattern is found and a match kept where no word character precedes it."""
    return sum(1 for m in re.finditer(pattern, text)
               if m.start() == 0 or not (text[m.start() - 1].isalnum() or text[m.start() - 1] == "_"))


def analyze(kernel, workdir: Path, ptxas: str | None, cuobjdump: str | None) -> dict:
    md = kernel.metadata
    ptx, cubin = kernel.asm["ptx"], kernel.asm["cubin"]
    name = md.name
    d = dict(name=name, num_warps=md.num_warps, num_stages=md.num_stages, shared=md.shared,
             target=f"sm_{md.target.arch}", ptx_wgmma=count_at_word_start(r"wgmma\.mma_async", ptx),
             ptx_mma_sync=count_at_word_start(r"mma\.sync", ptx),
             ptx_tma=len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
             wgmma_n=max(map(int, re.findall(r"wgmma\.mma_async\.sync\.aligned\.m\d+n(\d+)k", ptx)), default=0),
             ptx_cp_async=count_at_word_start(r"cp\.async\.(?:ca|cg)", ptx))
    cub = workdir / f"{kernel.hash}.cubin"
    cub.write_bytes(cubin)
    if cuobjdump:
        res = subprocess.run([cuobjdump, "-res-usage", str(cub)], capture_output=True, text=True, timeout=60).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
        if m:
            d.update(registers=int(m[1]), stack=int(m[2]), static_shared=int(m[3]), local=int(m[4]))
        sass = subprocess.run([cuobjdump, "-sass", str(cub)], capture_output=True, text=True, timeout=120).stdout
        if sass:
            # (FP8 wgmma is QGMMA in SASS; Triton runs FP8 mma.sync below 64 rows as fp16 HMMA)
            d.update(sass_hgmma=count_at_word_start(r"HGMMA\b", sass), sass_qgmma=count_at_word_start(r"QGMMA\b", sass),
                     sass_hmma=count_at_word_start(r"HMMA\b", sass),
                     sass_utmaldg=count_at_word_start(r"UTMALDG\b", sass),
                     sass_ldgsts=count_at_word_start(r"LDGSTS\b", sass))
    if ptxas:
        p = workdir / f"{kernel.hash}.ptx"
        p.write_text(ptx)
        arch = "sm_90a" if ".target sm_90a" in ptx else f"sm_{md.target.arch}"
        out = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", str(p), "-o", str(workdir / "x.cubin")],
                             capture_output=True, text=True, timeout=300)
        log = out.stdout + out.stderr
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
        if m:
            d.update(stack_frame=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        m = re.search(r"Used (\d+) registers", log)
        if m:
            d["ptxas_registers"] = int(m[1])
    gmma = d["sass_hgmma"] + d["sass_qgmma"] if "sass_hgmma" in d else d["ptx_wgmma"]
    d["tensor_cores"] = ("wgmma" if gmma else
                         "mma.sync" if d.get("sass_hmma", d["ptx_mma_sync"]) else "none")
    d["tma"] = bool(d.get("sass_utmaldg", d["ptx_tma"]))
    return d


def collect(published: bool = True, quick: bool = False, only: str | None = None) -> dict:
    import triton

    rec = Recorder()
    rec.install(90)
    if only in (None, "moe"):
        compile_moe(rec, published, quick)
    if only in (None, "mxfp4"):
        compile_moe_mxfp4(rec, quick)
    if only in (None, "nvfp4"):
        compile_moe_nvfp4(rec, quick)
    if only in (None, "int4"):
        compile_moe_int4(rec, quick)
    if only in (None, "attention"):
        compile_attention(rec, quick)
    if only in (None, "mla"):
        compile_mla(rec, quick)
    if only in (None, "norm"):
        compile_norm_rotary(rec, quick)
    if only in (None, "decode"):
        compile_decode_inputs(rec, quick)
    if only in (None, "fp8"):
        compile_fp8(rec, quick)
    if only in (None, "gdn"):
        compile_gdn(rec, quick)
    if only in (None, "dsa"):
        compile_dsa(rec, quick)
    if only in (None, "block_sparse"):
        compile_block_sparse(rec, quick)
    if only in (None, "compressed"):
        compile_compressed_attention(rec, quick)
    if only in (None, "qsa"):
        compile_qsa(rec, quick)
    if only in (None, "batch_invariant"):
        compile_batch_invariant(rec, quick)
    ptxas, cuobjdump = triton_ptxas(), nvidia_bin("cuobjdump")
    kernels: dict[tuple, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in rec.records:
            k = r["kernel"]
            key = record_key(dict(name=k.metadata.name, constexprs=r["constexprs"], num_warps=k.metadata.num_warps,
                                  num_stages=k.metadata.num_stages, dtypes=r["dtypes"], shape_class=r["shape_class"]))
            entry = kernels.get(key)
            if entry is None:
                entry = kernels[key] = analyze(k, Path(tmp), ptxas, cuobjdump)
                entry.update(hash=k.hash[:12], compile_s=round(r["seconds"], 3), constexprs=r["constexprs"],
                             dtypes=r["dtypes"], shape_class=r["shape_class"], cases=[])
            if r["case"] not in entry["cases"]:
                entry["cases"].append(r["case"])
    return dict(target="cuda sm_90 (GPUTarget('cuda', 90, 32): sm_90a PTX)", triton=triton.__version__,
                torch=torch.__version__, ptxas=tool_version(ptxas), cuobjdump=tool_version(cuobjdump),
                ptxas_path=ptxas, kernels=list(kernels.values()))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(RESULTS / "compile_report_sm90"), help="path without suffix: writes .json and .md")
    ap.add_argument("--no-published", action="store_true", help="skip the published seed configs tune_moe starts from")
    ap.add_argument("--only", choices=["moe", "attention", "mla", "norm", "decode", "fp8", "mxfp4", "nvfp4", "int4", "gdn", "dsa",
                                          "block_sparse", "compressed", "qsa", "batch_invariant"],
                    default=None, help="one kernel family")
    ap.add_argument("--quick", action="store_true", help="one default bucket per shape, bf16 only (tests)")
    ap.add_argument("--merge", action="store_true",
                    help="with --only: replace that family's kernels in the existing <out>.json and keep every other "
                    "kernel's record (compile seconds included) as it is")
    ap.add_argument("--retime", action="store_true",
                    help="recompile every launch (cold cache) and replace only the compile seconds of the records in the "
                    "existing <out>.json, matched by record key; the analysis (registers, spills, instructions) is kept")
    ap.add_argument("--cache-dir", default=None,
                    help="Triton cache (default: a fresh temporary one, so compile_s is a cold compile)")
    args = ap.parse_args(argv)
    if args.merge and not args.only:
        ap.error("--merge needs --only FAMILY (the family whose kernels it replaces)")
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as e:
        sys.exit(f"compile_report: Triton has no NVIDIA backend here ({e}): nothing to compile for sm_90 with.")
    tmp_cache = None
    if args.cache_dir:
        os.environ["TRITON_CACHE_DIR"] = args.cache_dir
    else:
        tmp_cache = tempfile.mkdtemp(prefix="moelink-triton-cache-")
        os.environ["TRITON_CACHE_DIR"] = tmp_cache
    try:
        from moelink.engine.api.provenance import git_commit
        from datetime import date

        if args.retime:
            rep = retime(json.loads(Path(f"{args.out}.json").read_text()), published=not args.no_published)
        else:
            rep = collect(published=not args.no_published, quick=args.quick, only=args.only)
            rep.update(date=str(date.today()), commit=git_commit())
        if args.merge:
            rep = merge_into(json.loads(Path(f"{args.out}.json").read_text()), rep, args.only)
        rep["summary"] = summarize(rep)
        rep["notes"] = notes(rep)
    finally:
        if tmp_cache:
            shutil.rmtree(tmp_cache, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    js, md = Path(f"{out}.json"), Path(f"{out}.md")  # (not with_suffix: a name may hold a version's dots)
    js.write_text(json.dumps(rep, indent=1) + "\n")
    md.write_text(markdown(rep))
    print(json.dumps(rep["summary"], indent=1))
    print(f"wrote {js} and {md}")
    return rep


def retime(rep: dict, published: bool = True) -> dict:
    """`rep` with every record's compile_s re-measured now (CPU seconds of a cold compile, compile_cases.cpu_seconds),
    matched by record key; a record this run does not compile keeps its value. For a report whose analysis is current
    but whose compile seconds were taken as wall time on a loaded machine."""
    import triton

    if rep.get("triton") != triton.__version__:
        raise SystemExit(f"--retime: this Triton ({triton.__version__}) is not the report's ({rep.get('triton')}).")
    rec = Recorder()
    rec.install(90)
    for run in (lambda: compile_moe(rec, published, False), lambda: compile_moe_mxfp4(rec, False),
                lambda: compile_moe_nvfp4(rec, False), lambda: compile_moe_int4(rec, False),
                lambda: compile_attention(rec, False), lambda: compile_mla(rec, False),
                lambda: compile_norm_rotary(rec, False), lambda: compile_decode_inputs(rec, False),
                lambda: compile_fp8(rec, False), lambda: compile_gdn(rec, False), lambda: compile_dsa(rec, False),
                lambda: compile_block_sparse(rec, False),
                lambda: compile_compressed_attention(rec, False), lambda: compile_qsa(rec, False)):
        run()
    seconds = {}
    for r in rec.records:
        k = r["kernel"]
        key = record_key(dict(name=k.metadata.name, constexprs=r["constexprs"], num_warps=k.metadata.num_warps,
                              num_stages=k.metadata.num_stages, dtypes=r["dtypes"], shape_class=r["shape_class"]))
        seconds.setdefault(key, round(r["seconds"], 3))  # (the first launch compiles; later ones hit the cache)
    for k in rep["kernels"]:
        k["compile_s"] = seconds.get(record_key(k), k["compile_s"])
    rep["compile_seconds"] = "CPU seconds (process + ptxas) of one cold compile, re-measured with --retime"
    return rep


def merge_into(old: dict, new: dict, only: str) -> dict:
    """`old` with `new`'s kernels (one family, compiled now) in place of that family's: kernels only this family
    launches are replaced; kernels it shares with others (align, top-k sum: same hash, i.e. the same compiled
    specialisation) keep their record and gain the new cases. Compile seconds are a cold compile on whatever
    the machine was doing, so re-measuring every kernel for one family's change would only add noise."""
    # Owned: the family's named kernels, and any kernel name the old report did not have.
    own = set(FAMILY_KERNELS.get(only, ())) | ({k["name"] for k in new["kernels"]} - {k["name"] for k in old["kernels"]})
    kept = [k for k in old["kernels"] if k["name"] not in own]
    same = {record_key(k): k for k in kept if record_key(k) is not None}
    by_hash = {k["hash"]: k for k in kept}
    # The family's records go where its old ones began (not at the end), so the committed report's diff is
    # that family's rows only.
    at = next((i for i, k in enumerate(old["kernels"]) if k["name"] in own), len(kept))
    at = sum(1 for k in old["kernels"][:at] if k["name"] not in own)
    added = []
    for k in new["kernels"]:
        twin = by_hash.get(k["hash"]) or same.get(record_key(k))  # (one record per key: no duplicate rows)
        if twin is not None:
            twin["cases"] += [c for c in k["cases"] if c not in twin["cases"]]
        else:
            added.append(k)
    kept[at:at] = added
    if (old.get("triton"), old.get("ptxas")) != (new["triton"], new["ptxas"]):
        raise SystemExit(f"--merge: this Triton/ptxas ({new['triton']}, {new['ptxas']}) is not the report's "
                         f"({old['triton']}, {old['ptxas']}): regenerate the whole report instead.")
    merged = {**old, "kernels": kept}
    merged["merged"] = [m for m in old.get("merged", []) if m["only"] != only] + [
        dict(only=only, date=new["date"], commit=new["commit"])]
    return merged


# Kernels a family owns (replaced by --merge); kernels several families launch are shared.
FAMILY_KERNELS = {"fp8": FP8_GEMM_KERNELS + ("_group_quant_kernel", "_tiny_fp8_up_kernel", "_tiny_fp8_down_kernel"),
                  "mla": ("_mla_kernel", "_mla_merge_kernel", "_mla_merge_plan_kernel", "_write_latent_kernel",
                          "_widen_kernel"),
                  "moe": ("_moe_up_kernel", "_moe_down_kernel", "_tiny_up_kernel", "_tiny_down_kernel"),
                  "mxfp4": ("_moe_mxfp4_up_kernel", "_moe_mxfp4_down_kernel"),
                  "nvfp4": ("_moe_nvfp4_up_kernel", "_moe_nvfp4_down_kernel"),
                  "int4": ("_moe_int4_up_kernel", "_moe_int4_down_kernel", "_tiny_int4_up_kernel",
                           "_tiny_int4_down_kernel"),
                  "dsa": ("_index_scores_kernel", "_topk_kernel", "_partial_topk_kernel", "_merge_topk_kernel",
                          "_sparse_mla_kernel", "_write_fp8_keys_kernel", "_pool_scores_kernel", "_pool_select_kernel"),
                  "block_sparse": ("_block_scores_kernel", "_block_sparse_kernel"),
                  # compressed-KV attention and hyper-connections, DeepSeek-V4's (its top-k runs DSA's selection
                  # kernels: those stay the dsa family's)
                  "compressed": ("_compress_kv_kernel", "_compressed_index_scores_kernel", "_sink_attention_kernel",
                           "_grouped_linear_kernel", "_hc_expand_kernel"),
                  "gdn": ("_gdn_recurrent_kernel", "_commit_kernel", "_gating_kernel", "_conv_varlen_kernel",
                          "_conv_state_kernel", "_conv_update_kernel"),
                  "qsa": ("_sparse_gqa_kernel",),
                  # (its MoE launches share the float MoE's kernels: those stay the moe family's)
                  "batch_invariant": ("_bi_split_kernel", "_bi_merge_kernel", "_bi_matmul_kernel"),
                  "attention": ("_decode_kernel", "_prefill_kernel", "_merge_splits_kernel", "_merge_plan_kernel",
                                "_write_kv_kernel")}
# _plan_kernel (the decode split plan) is shared: attention and MLA both launch it.


if __name__ == "__main__":
    main()
