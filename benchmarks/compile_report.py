"""Offline sm_90 compile report: every Triton kernel in kernels/, at its default and tuned launch configs,
compiled for Hopper on a machine without a GPU, with what the compiler made of it.

    python -m moelink.benchmarks.compile_report [--out benchmarks/results/compile_report_sm90]
        [--no-published] [--only moe|attention|mla|norm|fp8|mxfp4] [--quick]

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

Configs covered (MoE GEMMs): every bucket of kernels/configs/default.json at each model shape, every
bucket of every tuned `E=..,N=..,device_name=...json` file at its own shape, and (unless --no-published)
the published seed configs tune_moe.py starts from (benchmarks/tune_moe.py PUBLISHED). The other kernels
(align, top-k sum, attention, KV write, RMSNorm, rotary) are compiled at the shapes the engine launches
for the three models; the FP8 block-scaled kernels (fused MoE, dense GEMM, activation quantization) at the
buckets of kernels/configs/fp8_moe_default.json and fp8_linear.json (compile_cases.compile_fp8). Output: <out>.json (every kernel) and <out>.md (tables and notes).
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

from .compile_cases import (MODEL_SHAPES, TARGET_NAME, Recorder, compile_attention, compile_fp8,  # noqa: F401
                            compile_mla, compile_moe, compile_moe_mxfp4, compile_norm_rotary)

RESULTS = Path(__file__).parent / "results"
H100_SMEM = 227 * 1024  # max dynamic shared memory per block on sm_90
GEMM_KERNELS = ("_moe_up_kernel", "_moe_down_kernel", "_moe_mxfp4_up_kernel", "_moe_mxfp4_down_kernel")
FP8_GEMM_KERNELS = ("_moe_fp8_up_kernel", "_moe_fp8_down_kernel", "_fp8_gemm_kernel")
ATTN_DOT_KERNELS = ("_decode_kernel", "_prefill_kernel", "_mla_kernel")


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


def analyze(kernel, workdir: Path, ptxas: str | None, cuobjdump: str | None) -> dict:
    md = kernel.metadata
    ptx, cubin = kernel.asm["ptx"], kernel.asm["cubin"]
    name = md.name
    d = dict(name=name, num_warps=md.num_warps, num_stages=md.num_stages, shared=md.shared,
             target=f"sm_{md.target.arch}", ptx_wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
             ptx_mma_sync=len(re.findall(r"\bmma\.sync", ptx)), ptx_tma=len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
             wgmma_n=max(map(int, re.findall(r"wgmma\.mma_async\.sync\.aligned\.m\d+n(\d+)k", ptx)), default=0),
             ptx_cp_async=len(re.findall(r"\bcp\.async\.(?:ca|cg)", ptx)))
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
            d.update(sass_hgmma=len(re.findall(r"\bHGMMA\b", sass)), sass_qgmma=len(re.findall(r"\bQGMMA\b", sass)),
                     sass_hmma=len(re.findall(r"\bHMMA\b", sass)),
                     sass_utmaldg=len(re.findall(r"\bUTMALDG\b", sass)), sass_ldgsts=len(re.findall(r"\bLDGSTS\b", sass)))
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
    if only in (None, "attention"):
        compile_attention(rec, quick)
    if only in (None, "mla"):
        compile_mla(rec, quick)
    if only in (None, "norm"):
        compile_norm_rotary(rec, quick)
    if only in (None, "fp8"):
        compile_fp8(rec, quick)
    ptxas, cuobjdump = triton_ptxas(), nvidia_bin("cuobjdump")
    kernels: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in rec.records:
            k = r["kernel"]
            entry = kernels.get(k.hash)
            if entry is None:
                entry = kernels[k.hash] = analyze(k, Path(tmp), ptxas, cuobjdump)
                entry.update(hash=k.hash[:12], compile_s=round(r["seconds"], 3), constexprs=r["constexprs"], cases=[])
            if r["case"] not in entry["cases"]:
                entry["cases"].append(r["case"])
    return dict(target="cuda sm_90 (GPUTarget('cuda', 90, 32): sm_90a PTX)", triton=triton.__version__,
                torch=torch.__version__, ptxas=tool_version(ptxas), cuobjdump=tool_version(cuobjdump),
                ptxas_path=ptxas, kernels=list(kernels.values()))


# -- report ------------------------------------------------------------------------------------------------------------
def summarize(rep: dict) -> dict:
    ks = rep["kernels"]
    spilled = [k for k in ks if k.get("spill_stores", 0) or k.get("spill_loads", 0) or k.get("local", 0)]
    gemm = [k for k in ks if k["name"] in GEMM_KERNELS]
    gemm_lowp = [k for k in gemm if k["constexprs"].get("PREC", "tf32") != "ieee" and "float32" not in " ".join(k["cases"])]
    fp8 = [k for k in ks if k["name"] in FP8_GEMM_KERNELS]
    return dict(
        kernels_compiled=len(ks), kernel_names=sorted({k["name"] for k in ks}), spilling=[k["hash"] for k in spilled],
        over_smem_limit=[k["hash"] for k in ks if k["shared"] > H100_SMEM],
        gemm_bf16_fp16=len(gemm_lowp), gemm_wgmma=sum(k["tensor_cores"] == "wgmma" for k in gemm_lowp),
        gemm_mma_sync=sum(k["tensor_cores"] == "mma.sync" for k in gemm_lowp),
        gemm_no_tensor_cores=[k["hash"] for k in gemm_lowp if k["tensor_cores"] == "none"],
        gemm_fp8=len(fp8), gemm_fp8_wgmma=sum(k["tensor_cores"] == "wgmma" for k in fp8),
        gemm_fp8_mma_sync=sum(k["tensor_cores"] == "mma.sync" for k in fp8),
        tma=sum(k["tma"] for k in ks), max_registers=max((k.get("registers", 0) for k in ks), default=0),
        compile_s_total=round(sum(k["compile_s"] for k in ks), 1),
        compile_s_max={n: max(k["compile_s"] for k in ks if k["name"] == n) for n in sorted({k["name"] for k in ks})})


def _cfg(c: dict) -> str:
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
    return "x".join(str(c.get(k, "-")) for k in keys) + (" fused" if c.get("FUSED") else "")


def markdown(rep: dict) -> str:
    s = rep["summary"]
    lines = [
        "# Offline sm_90 compile report (no GPU)",
        "",
        f"Generated by `python -m moelink.benchmarks.compile_report` on {rep['date']} at commit {rep['commit']}: "
        f"Triton {rep['triton']}, torch {rep['torch']}, ptxas {rep['ptxas']}, cuobjdump {rep['cuobjdump']} (the ones "
        f"Triton ships). Target {rep['target']}. Every launch the wrappers make at the model shapes is compiled "
        "ahead of time on meta tensors (see the script's docstring); registers and local memory come from the cubin "
        "(`cuobjdump -res-usage`), spills from `ptxas -v`, tensor-core and TMA instructions from the SASS."
        + "".join(f" The {m['only']} kernels were recompiled and merged in on {m['date']} at commit {m['commit']} "
                  f"(`--only {m['only']} --merge`; the other kernels' records, compile seconds included, are the "
                  "full run's" + (f"; {m['kept_compile_s']} of its records whose launch config was unchanged keep "
                                  "the previous report's compile seconds (`--keep-compile-s`), the rest were timed "
                                  f"in this run and divided by {m['compile_load']}, how much slower this run "
                                  "compiled the kept ones" if m.get("kept_compile_s") else "") + ")."
                  for m in rep.get("merged", [])),
        "",
        f"- {s['kernels_compiled']} distinct compiled kernels ({', '.join(s['kernel_names'])}), "
        f"{s['compile_s_total']} s of cold compiles on this CPU machine.",
        f"- Spills: {'none (0 bytes spill stores/loads and 0 local memory in every kernel)' if not s['spilling'] else 'IN ' + ', '.join(s['spilling'])}.",
        f"- Shared memory over the 227 KB sm_90 limit: {'none' if not s['over_smem_limit'] else ', '.join(s['over_smem_limit'])}.",
        f"- MoE GEMM kernels (bf16/fp16): {s['gemm_bf16_fp16']} compiled, {s['gemm_wgmma']} use wgmma (SASS HGMMA), "
        f"{s['gemm_mma_sync']} use mma.sync (HMMA), "
        f"{'none without tensor cores' if not s['gemm_no_tensor_cores'] else 'WITHOUT tensor cores: ' + ', '.join(s['gemm_no_tensor_cores'])}.",
        f"- FP8 GEMM kernels (W8A8 block-scaled: fused MoE up/down, dense): {s.get('gemm_fp8', 0)} compiled, "
        f"{s.get('gemm_fp8_wgmma', 0)} use FP8 wgmma (SASS QGMMA), {s.get('gemm_fp8_mma_sync', 0)} mma.sync.",
        f"- TMA (cp.async.bulk.tensor / UTMALDG): used in {s['tma']} kernels. The kernels load through pointers "
        "(gathered rows for the up GEMM's A, per-expert weight tiles) and pipeline them with cp.async (LDGSTS).",
        "",
    ]
    lines += rep.get("notes", [])
    lines += ["", "## MoE GEMM kernels", "",
              "| kernel | BM x BN x BK x GROUP | warps | stages | shared KB | regs | spill st/ld B | local B | tensor cores | wgmma N | HGMMA / HMMA | TMA | compile s | configs (shape T source) |",
              "|---|---|---:|---:|---:|---:|---|---:|---|---:|---|---|---:|---|"]
    gemm = sorted((k for k in rep["kernels"] if k["name"] in GEMM_KERNELS),
                  key=lambda k: (k["name"], [k["constexprs"].get(x, 0) for x in ("BLOCK_M", "BLOCK_N", "BLOCK_K")]))
    for k in gemm:
        cases = "; ".join(k["cases"][:4]) + (f"; +{len(k['cases']) - 4} more" if len(k["cases"]) > 4 else "")
        lines.append(f"| {k['name']} | {_cfg(k['constexprs'])} | {k['num_warps']} | {k['num_stages']} | "
                     f"{k['shared'] / 1024:.0f} | {k.get('registers', '?')} | {k.get('spill_stores', '?')}/{k.get('spill_loads', '?')} | "
                     f"{k.get('local', '?')} | {k['tensor_cores']} | {k['wgmma_n'] or '-'} | "
                     f"{k.get('sass_hgmma', '?')} / {k.get('sass_hmma', '?')} | "
                     f"{'yes' if k['tma'] else 'no'} | {k['compile_s']:.1f} | {cases} |")
    lines += ["", "## FP8 GEMM kernels", "",
              "| kernel | BM x BN x BK x GROUP | warps | stages | shared KB | regs | spill st/ld B | local B | tensor cores | wgmma N | QGMMA / HMMA | compile s | configs (shape T source) |",
              "|---|---|---:|---:|---:|---:|---|---:|---|---:|---|---:|---|"]
    for k in sorted((k for k in rep["kernels"] if k["name"] in FP8_GEMM_KERNELS),
                    key=lambda k: (k["name"], [k["constexprs"].get(x, 0) for x in ("BLOCK_M", "BLOCK_N", "BLOCK_K")])):
        cases = "; ".join(k["cases"][:4]) + (f"; +{len(k['cases']) - 4} more" if len(k["cases"]) > 4 else "")
        lines.append(f"| {k['name']} | {_cfg(k['constexprs'])} | {k['num_warps']} | {k['num_stages']} | "
                     f"{k['shared'] / 1024:.0f} | {k.get('registers', '?')} | {k.get('spill_stores', '?')}/{k.get('spill_loads', '?')} | "
                     f"{k.get('local', '?')} | {k['tensor_cores']} | {k['wgmma_n'] or '-'} | "
                     f"{k.get('sass_qgmma', '?')} / {k.get('sass_hmma', '?')} | {k['compile_s']:.1f} | {cases} |")
    lines += ["", "## Other kernels", "",
              "| kernel | constexprs | warps | stages | shared KB | regs | spill st/ld B | local B | tensor cores | compile s | cases |",
              "|---|---|---:|---:|---:|---:|---|---:|---|---:|---|"]
    for k in sorted((k for k in rep["kernels"] if k["name"] not in GEMM_KERNELS + FP8_GEMM_KERNELS), key=lambda k: k["name"]):
        c = ", ".join(f"{a}={b}" for a, b in k["constexprs"].items() if a not in ("num_warps", "num_stages", "INTERPRET"))
        cases = "; ".join(k["cases"][:3]) + (f"; +{len(k['cases']) - 3} more" if len(k["cases"]) > 3 else "")
        lines.append(f"| {k['name']} | {c} | {k['num_warps']} | {k['num_stages']} | {k['shared'] / 1024:.1f} | "
                     f"{k.get('registers', '?')} | {k.get('spill_stores', '?')}/{k.get('spill_loads', '?')} | {k.get('local', '?')} | "
                     f"{k['tensor_cores']} | {k['compile_s']:.1f} | {cases} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(RESULTS / "compile_report_sm90"), help="path without suffix: writes .json and .md")
    ap.add_argument("--no-published", action="store_true", help="skip the published seed configs tune_moe starts from")
    ap.add_argument("--only", choices=["moe", "attention", "mla", "norm", "fp8", "mxfp4"], default=None, help="one kernel family")
    ap.add_argument("--quick", action="store_true", help="one default bucket per shape, bf16 only (tests)")
    ap.add_argument("--merge", action="store_true",
                    help="with --only: replace that family's kernels in the existing <out>.json and keep every other "
                    "kernel's record (compile seconds included) as it is")
    ap.add_argument("--keep-compile-s", action="store_true",
                    help="with --merge: records of the family whose launch config (kernel, constexprs, warps, stages) "
                    "the previous report has keep its compile seconds (a cold compile timed on a loaded machine is "
                    "noise); new configs are timed in this run, scaled by the kept ones' slowdown")
    ap.add_argument("--cache-dir", default=None,
                    help="Triton cache (default: a fresh temporary one, so compile_s is a cold compile)")
    args = ap.parse_args(argv)
    if args.merge and not args.only:
        ap.error("--merge needs --only FAMILY (the family whose kernels it replaces)")
    if args.keep_compile_s and not args.merge:
        ap.error("--keep-compile-s needs --merge (it keeps the existing report's compile seconds)")
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
        from moelink.engine.provenance import git_commit
        from datetime import date

        rep = collect(published=not args.no_published, quick=args.quick, only=args.only)
        rep.update(date=str(date.today()), commit=git_commit())
        if args.merge:
            rep = merge_into(json.loads(Path(f"{args.out}.json").read_text()), rep, args.only, args.keep_compile_s)
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


def launch_key(k: dict) -> tuple:
    """What a compiled record was compiled for: kernel, constexprs, warps and stages (not the source hash). A
    constexpr switch that is False is left out: a switch added since, and off, compiles no code."""
    switches = {n: v for n, v in k["constexprs"].items() if v is not False}
    return k["name"], json.dumps(switches, sort_keys=True), k["num_warps"], k["num_stages"]


def merge_into(old: dict, new: dict, only: str, keep_compile_s: bool = False) -> dict:
    """`old` with `new`'s kernels (one family, compiled now) in place of that family's: kernels only this family
    launches are replaced; kernels it shares with others (align, top-k sum: same hash, i.e. the same compiled
    specialisation) keep their record and gain the new cases. Compile seconds are a cold compile on whatever
    the machine was doing, so re-measuring every kernel for one family's change would only add noise."""
    # Owned: the family's named kernels, and any kernel name the old report did not have.
    own = set(FAMILY_KERNELS.get(only, ())) | ({k["name"] for k in new["kernels"]} - {k["name"] for k in old["kernels"]})
    kept = [k for k in old["kernels"] if k["name"] not in own]
    old_s = {launch_key(k): k["compile_s"] for k in old["kernels"] if k["name"] in own} if keep_compile_s else {}
    reused, timed_now, timed_before = 0, 0.0, 0.0
    fresh = []
    for k in new["kernels"] if old_s else ():
        if launch_key(k) in old_s:
            timed_now, timed_before = timed_now + k["compile_s"], timed_before + old_s[launch_key(k)]
            k["compile_s"], reused = old_s[launch_key(k)], reused + 1
        else:
            fresh.append(k)
    # New launch configs: their time this run, divided by how much slower this run compiled the kept ones (the
    # machine's load then vs now), so every record is on the full run's scale.
    load = timed_now / timed_before if reused and timed_before > 0 else 1.0
    for k in fresh:
        k["compile_s"] = round(k["compile_s"] / load, 3)
    # The family's records go where its old ones began (not at the end), so the committed report's diff is
    # that family's rows only.
    at = next((i for i, k in enumerate(old["kernels"]) if k["name"] in own), len(old["kernels"]))
    by_hash = {k["hash"]: k for k in kept}
    added = []
    for k in new["kernels"]:
        if k["hash"] in by_hash:
            by_hash[k["hash"]]["cases"] += [c for c in k["cases"] if c not in by_hash[k["hash"]]["cases"]]
        else:
            added.append(k)
    kept[at:at] = added
    if (old.get("triton"), old.get("ptxas")) != (new["triton"], new["ptxas"]):
        raise SystemExit(f"--merge: this Triton/ptxas ({new['triton']}, {new['ptxas']}) is not the report's "
                         f"({old['triton']}, {old['ptxas']}): regenerate the whole report instead.")
    merged = {**old, "kernels": kept}
    merged["merged"] = [m for m in old.get("merged", []) if m["only"] != only] + [
        dict(only=only, date=new["date"], commit=new["commit"],
             **({"kept_compile_s": reused, "compile_load": round(load, 2)} if reused else {}))]
    return merged


# Kernels a family owns (replaced by --merge); kernels several families launch are shared.
FAMILY_KERNELS = {"fp8": FP8_GEMM_KERNELS + ("_group_quant_kernel",),
                  "mla": ("_mla_kernel", "_mla_merge_kernel", "_mla_merge_plan_kernel", "_write_latent_kernel"),
                  "moe": ("_moe_up_kernel", "_moe_down_kernel"),
                  "mxfp4": ("_moe_mxfp4_up_kernel", "_moe_mxfp4_down_kernel"),
                  "attention": ("_decode_kernel", "_prefill_kernel", "_merge_splits_kernel", "_merge_plan_kernel",
                                "_write_kv_kernel")}
# _plan_kernel (the decode split plan) is shared: attention and MLA both launch it.


def notes(rep: dict) -> list[str]:
    """What a reader should take from the numbers (computed, so the note cannot go stale)."""
    ks = rep["kernels"]
    out = ["## Notes", ""]
    gemm = [k for k in ks if k["name"] in GEMM_KERNELS and k["tensor_cores"] != "none"]
    bm = lambda k: k["constexprs"].get("BLOCK_M", 0)  # noqa: E731
    small = sorted({bm(k) for k in gemm if k["tensor_cores"] == "mma.sync"})
    big = sorted({bm(k) for k in gemm if k["tensor_cores"] == "wgmma"})
    out.append(f"- wgmma needs 64 rows per warpgroup: the GEMMs use it at BLOCK_M {big or 'none'} and fall back to "
               f"mma.sync (HMMA, still tensor cores) at BLOCK_M {small or 'none'} (the decode-size buckets).")
    fused = [k for k in ks if k["name"] == "_moe_up_kernel" and k["constexprs"].get("FUSED") and k["wgmma_n"]]
    if fused:
        pairs = []
        for f in fused:
            twin = [k for k in ks if k["name"] == "_moe_up_kernel" and not k["constexprs"].get("FUSED")
                    and {x: k["constexprs"].get(x) for x in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
                    == {x: f["constexprs"].get(x) for x in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
                    and k["num_warps"] == f["num_warps"] and k["num_stages"] == f["num_stages"] and k["wgmma_n"]]
            if twin:
                pairs.append(f"{_cfg(f['constexprs'])}/{f['num_warps']}w: N {twin[0]['wgmma_n']} -> {f['wgmma_n']}, "
                             f"HGMMA {twin[0].get('sass_hgmma')} -> {f.get('sass_hgmma')}, regs {twin[0].get('registers')} -> "
                             f"{f.get('registers')}")
        out.append("- FUSED_GATE_UP (one interleaved gate|up tile, one dot): the wgmma is twice as wide with half the "
                   "instructions, no spills (" + "; ".join(sorted(set(pairs))[:4]) + "). Opt-in per config: "
                   "tune_moe tries it as one axis, so it is kept only where it measures faster.")
    f8 = [k for k in ks if k["name"] in FP8_GEMM_KERNELS]
    if f8:
        f8_big = sorted({bm(k) for k in f8 if k["tensor_cores"] == "wgmma"})
        f8_small = sorted({bm(k) for k in f8 if k["tensor_cores"] == "mma.sync"})
        out.append(f"- FP8 GEMMs (W8A8, scales applied per 128-channel K block in fp32): FP8 wgmma (SASS QGMMA, "
                   f"e4m3 x e4m3) at BLOCK_M {f8_big or 'none'}; at BLOCK_M {f8_small or 'none'} Triton has no FP8 "
                   "mma.sync on sm_90 and widens the fp8 tiles to fp16 for HMMA (exact: every e4m3 value is an fp16). "
                   "The gate-up kernel's warps are picked for zero spills (kernels/configs/fp8_moe_default.json).")
    fp32 = [k for k in ks if k["name"] in GEMM_KERNELS and k["tensor_cores"] == "none"]
    if fp32:
        out.append(f"- {len(fp32)} GEMM specialisations without tensor cores are the fp32-activation variants "
                   "(input_precision='ieee': fp32 must not drop to TF32), as intended.")
    spilled = [k for k in ks if k.get("spill_stores", 0) or k.get("spill_loads", 0) or k.get("local", 0)]
    if spilled:
        for k in spilled:
            out.append(f"- SPILL: {k['name']} {_cfg(k['constexprs'])} warps={k['num_warps']} stages={k['num_stages']}: "
                       f"{k.get('spill_stores')} B stores / {k.get('spill_loads')} B loads, local {k.get('local')} B "
                       f"({'; '.join(k['cases'][:3])}).")
    else:
        out.append("- No kernel spills: every one has 0 bytes of spill stores and loads and no local memory.")
    top = max(ks, key=lambda k: k.get("registers", 0))
    out.append(f"- Most registers: {top['name']} {_cfg(top['constexprs'])} with {top.get('registers')} per thread "
               f"(of 255) at {top['num_warps']} warps.")
    out.append(f"- Compiled with Triton {rep['triton']}. The script uses the Triton that is installed; the GPU image has "
               "Triton 3.6 (first session), which installs beside the CPU machines' one with `pip install --no-deps "
               "--target /tmp/triton36 triton==3.6.0` and runs with `PYTHONPATH=/tmp/triton36` first.")
    out.append("- compile s is one cold compile on a 2-core CPU machine (TTIR to cubin, no launcher): the per-class "
               "maxima are what benchmarks/gpu_session.sh budgets each compile at.")
    return out


if __name__ == "__main__":
    main()
