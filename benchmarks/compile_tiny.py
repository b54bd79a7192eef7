"""Offline compile of the MoE at issue 80's two ends for sm_90 and sm_100, no GPU needed.

- `--cases tiny` (default): the decode-size MoE (the float tiny path's two GEMVs, and the sorted path it replaces at
  one token): registers, spills, shared memory, barriers, and what decides a GEMV's bandwidth, the bytes each
  program keeps in flight (benchmarks/compile_sass.py) times the programs an SM holds.
- `--cases large`: the sorted GEMMs at 4,096 and 16,384 tokens of every shape, bf16 (the H100's tuned tables) and
  FP8 (DeepSeek-V3, Qwen3): which tensor-core instructions each compiles to (wgmma / HGMMA / QGMMA on sm_90,
  tcgen05.mma on sm_100, else mma.sync), TMA, registers, spills and shared memory.
- `--cases fused`: the decode layer's GEMVs that carry its small ops (the attention input and output, the router:
  kernels/triton_qkv_rope_kv.py, triton_linear_norm.py, triton_router_gemv.py): the same table as `tiny`.
- `--cases mxfp4`: the MXFP4 per-tile GEMMs (issue 80's MXFP4 row) at gpt-oss's 1,024 and 4,096 tokens with
  mxfp4_moe_default.json's blocks, forced per-tile: what one step of the K loop issues a thread
  (`compile_sass.mma_loop`), per weight value decoded, against the MMA work that value feeds.

    python -m moelink.benchmarks.compile_tiny [--cases tiny|large|mxfp4|fused] [--arch 90,100] [--out PREFIX]

Writes <out>_sm<arch>.json and .md per arch (default out: benchmarks/results/compile_report_<cases>). Run with the
GPU image's Triton (3.6: `PYTHONPATH=/path/to/triton36`).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .compile_cases import launch_fp8_tiny
from .compile_sass import count_ops, loads_in_flight, mma_loop, resident_programs

RESULTS = Path(__file__).parent / "results"
# (label, (E, K, D, I), T, gpt-oss biases + clamped swiglu?) at the engine's decode sizes.
CASES = (("qwen3-30b-a3b", (128, 8, 2048, 768), 1, False), ("qwen3-30b-a3b", (128, 8, 2048, 768), 8, False),
         ("deepseek-v3", (256, 8, 7168, 2048), 1, False), ("mixtral-8x7b", (8, 2, 4096, 14336), 1, False),
         ("gpt-oss-120b", (128, 4, 2880, 2880), 1, True))
SMS = 132  # the H100's (an H200 has as many; a B200 148): programs an SM gets = grid / SMS


def launch_cases(rec) -> None:
    """The float tiny path and the FP8 one (DEFAULT_TINY_FLOAT, DEFAULT_TINY_FP8) at every case, and the sorted path at
    Qwen3's one token."""
    from moelink.kernels.moe import MoEActivation
    from moelink.kernels.triton_moe import triton_fused_moe

    meta, bf = dict(device="meta"), dict(device="meta", dtype=torch.bfloat16)
    for name, (E, K, D, I), T, oai in CASES:
        extra = dict(b13_EF=torch.empty(E, 2 * I, **bf), b2_ED=torch.empty(E, D, **bf),
                     activation=MoEActivation("swiglu_oai")) if oai else {}
        for path in ("tiny", "sorted") if (name, T) == ("qwen3-30b-a3b", 1) else ("tiny",):
            with rec.labelled(f"{name} T={T} {path}"):
                triton_fused_moe(torch.empty(T, D, **bf), torch.empty(E, 2 * I, D, **bf), torch.empty(E, D, I, **bf),
                                 torch.empty(T, K, **meta), torch.empty(T, K, dtype=torch.long, **meta), path=path,
                                 **extra)
        with rec.labelled(f"{name} T={T} fp8 tiny"):  # the e4m3 GEMVs at every shape: spill-free everywhere
            # (the two-launch form: x quantized by the norm before, whose launch the case holds too)
            launch_fp8_tiny(E, K, D, I, T, extra.get("activation"), prequant=True)
        if T == 1 and name in ("qwen3-30b-a3b", "deepseek-v3"):  # the gate-up GEMV with h quantized apart: what
            with rec.labelled(f"{name} T={T} fp8 tiny h apart"):  # the fused h quantization adds to it
                launch_fp8_tiny(E, K, D, I, T, quant_h=False)


LARGE_TOKENS = (4096, 16384)


def launch_large(rec) -> None:
    """The sorted fused MoE at LARGE_TOKENS: bf16 at every shape (the configs the H100's tables pick: the Recorder
    names the device so), FP8 block-scaled at DeepSeek-V3 and Qwen3-30B-A3B (fp8_moe_default.json's buckets)."""
    from moelink.kernels.fp8 import block_scale_shape
    from moelink.kernels.triton_moe import triton_fused_moe
    from moelink.kernels.triton_moe_fp8 import triton_fused_moe_fp8

    from .compile_cases import MODEL_SHAPES

    meta, bf, f8 = dict(device="meta"), dict(device="meta", dtype=torch.bfloat16), torch.float8_e4m3fn
    for name, (E, K, D, I) in MODEL_SHAPES.items():
        for T in LARGE_TOKENS:
            routing = (torch.empty(T, K, **meta), torch.empty(T, K, dtype=torch.long, **meta))
            with rec.labelled(f"{name} T={T} bf16"):
                triton_fused_moe(torch.empty(T, D, **bf), torch.empty(E, 2 * I, D, **bf), torch.empty(E, D, I, **bf),
                                 *routing, path="sorted")
            if name == "mixtral-8x7b":  # (no FP8 checkpoint of this shape is served)
                continue
            with rec.labelled(f"{name} T={T} fp8"):
                triton_fused_moe_fp8(torch.empty(T, D, **bf), torch.empty(E, 2 * I, D, dtype=f8, **meta),
                                     torch.empty(E, *block_scale_shape(2 * I, D), **meta),
                                     torch.empty(E, D, I, dtype=f8, **meta),
                                     torch.empty(E, *block_scale_shape(D, I), **meta), *routing)


MXFP4_TOKENS = (1024, 4096)


def launch_mxfp4(rec) -> None:
    """The MXFP4 per-tile path (path="sorted") at gpt-oss's shapes and MXFP4_TOKENS, blocks from
    mxfp4_moe_default.json's bucket (the DEQUANT buckets' blocks are what the forced per-tile path runs), the blocks
    in the decode's pair order; gpt-oss-20b at 1,024 tokens in the checkpoint's order too."""
    from moelink.kernels.moe import MoEActivation
    from moelink.kernels.triton_moe_mxfp4 import triton_fused_moe_mxfp4

    from .compile_cases_mxfp4 import GPT_OSS_SHAPES

    meta, bf = dict(device="meta"), dict(device="meta", dtype=torch.bfloat16)
    u8 = lambda *s: torch.empty(*s, dtype=torch.uint8, **meta)  # noqa: E731
    for name, (E, K, D, I) in GPT_OSS_SHAPES.items():
        for T in MXFP4_TOKENS:
            # the blocks in the decode's pair order (as the engine holds them on a GPU: moe/layer.py), and at the
            # 128-row blocks once in the checkpoint's order, what the permutation saves
            orders = (("", True), (" checkpoint order", False)) if (name, T) == ("gpt-oss-20b", 1024) else (("", True),)
            for label, pairs in orders:
                with rec.labelled(f"{name} T={T} MXFP4 per-tile{label}"):
                    triton_fused_moe_mxfp4(torch.empty(T, D, **bf), u8(E, 2 * I, D // 32, 16), u8(E, 2 * I, D // 32),
                                           u8(E, D, I // 32, 16), u8(E, D, I // 32), torch.empty(T, K, **meta),
                                           torch.empty(T, K, dtype=torch.long, **meta),
                                           b13_EF=torch.empty(E, 2 * I, **bf), b2_ED=torch.empty(E, D, **bf),
                                           activation=MoEActivation("swiglu_oai"), path="sorted", pair_order=pairs)


def launch_fused_decode(rec) -> None:
    """The decode GEMVs that carry a layer's small ops (issue 80's first row): the attention input (norm + q/k/v
    GEMV + rotary + KV write) and output (o_proj + residual add + norm) at Qwen3-30B-A3B, gpt-oss-120b and
    GLM-4.5-Air, and the router (gate GEMV + top-k) at Qwen3 and the DeepSeek shapes; batches 1 and 4."""
    from .compile_cases_decode import compile_fused_decode

    compile_fused_decode(rec)


def loop_per_value(name: str, c: dict, warps: int, sass: str) -> dict:
    """The K loop of a GEMM kernel per weight value it decodes (a packed format's per-tile GEMMs: the gate-up
    kernel decodes 2 x BN x BK values a step, gate and up, the down kernel BN x BK, shared by 32 x warps threads)
    and the MMA work each value feeds (BLOCK_M rows): `issue_over_mma` is the step's issue time (instructions x
    warps over an SM's 4 schedulers) over its wgmma time at an H100 / H200 SM's 2,048 bf16 FMAs a clock (> 1: the
    loop is bound by issuing the decode, not by the tensor cores)."""
    loop = mma_loop(sass)
    if loop is None or "BLOCK_K" not in c:
        return {}
    values = (2 if "up" in name else 1) * c["BLOCK_N"] * c["BLOCK_K"] // (32 * warps)
    mma_clk = (2 if "up" in name else 1) * c["BLOCK_M"] * c["BLOCK_N"] * c["BLOCK_K"] / 2048
    return dict(loop_instructions=loop["instructions"], values_per_thread=values,
                instr_per_value=round(loop["instructions"] / values, 2), ldg_distance=loop["ldg_distance"],
                loop_mix={k: v for k, v in list(loop["mix"].items())[:12]},
                issue_over_mma=round(loop["instructions"] * warps / 4 / mma_clk, 2))


def per_weight_byte(name: str, c: dict, warps: int, sass: str) -> dict:
    """The FP8 tiny GEMVs' issue cost per e4m3 weight byte: every SASS instruction a thread issues (ONE_STEP: the K
    walk is straight-line, each instruction issued once) over the weight bytes its program's tiles span (gate-up:
    gate and up rows; down: TOP_K pairs' rows), a thread's share. An SM issues 128 thread-instructions a clock (4
    schedulers x 32 lanes) and streams its share of HBM, 14.5 B a clock on an H100 (3.35 TB/s / 132 SMs / 1.75 GHz;
    an H200 20.8): a GEMV stays bound by its bytes below ~8.8 instructions a byte (an H200 ~6.2)."""
    if name not in ("_tiny_fp8_up_kernel", "_tiny_fp8_down_kernel") or not c.get("ONE_STEP"):
        return {}
    copies = 2 if "up" in name else c["TOP_K"]
    nbytes = copies * c["BLOCK_N"] * c["BLOCK_K"] * c["K_TILES"] / (32 * warps)
    instr = sum(1 for line in sass.splitlines() if re.search(r"/\*[0-9a-f]{4,}\*/\s+\S", line))
    return dict(instructions=instr, weight_bytes_thread=nbytes, instr_per_weight_byte=round(instr / nbytes, 2))


def tensor_cores(ptx: str, sass: str) -> dict:
    """Tensor-core instructions of one kernel: PTX wgmma (sm_90), tcgen05.mma (sm_100), mma.sync; SASS HGMMA / QGMMA
    (sm_90 wgmma, bf16 / fp8), UTCHMMA / UTCQMMA (sm_100 tcgen05), HMMA; TMA loads (UTMALDG)."""
    from .compile_report import count_at_word_start

    return dict(wgmma=count_at_word_start(r"wgmma\.mma_async", ptx), tcgen05=len(re.findall(r"tcgen05\.mma\b", ptx)),
                mma_sync=count_at_word_start(r"mma\.sync", ptx), sass_gmma=count_ops(sass, "HGMMA") + count_ops(sass, "QGMMA"),
                sass_utc=count_ops(sass, "UTC"), sass_hmma=count_ops(sass, "HMMA"), tma=count_ops(sass, "UTMALDG"))


def ptxas_for(arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def analyze(r: dict, arch: int, tmp: Path) -> dict:
    """One launch's compiled kernel: resources from ptxas -v and cuobjdump, loads in flight from its SASS."""
    from .compile_report import nvidia_bin

    k = r["kernel"]
    ptx = k.asm["ptx"]
    target = re.search(r"\.target (\S+)", ptx)[1]
    if not target.startswith(f"sm_{arch}"):
        raise RuntimeError(f"compile_tiny: {k.metadata.name} was compiled for {target}, not sm_{arch}")
    (tmp / "k.ptx").write_text(ptx)
    log = subprocess.run([ptxas_for(arch), "-v", f"--gpu-name={target}", str(tmp / "k.ptx"), "-o", str(tmp / "x.cubin")],
                         capture_output=True, text=True, timeout=300)
    log_text = log.stdout + log.stderr
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log_text)
    regs = int(re.search(r"Used (\d+) registers", log_text)[1])
    (tmp / "k.cubin").write_bytes(k.asm["cubin"])
    sass = subprocess.run([nvidia_bin("cuobjdump"), "-sass", str(tmp / "k.cubin")], capture_output=True, text=True,
                          timeout=120).stdout
    n, per_thread = loads_in_flight(sass)
    warps = k.metadata.num_warps
    grid = [int(g) for g in r.get("grid", (1,))] if not callable(r.get("grid")) else [0]
    programs = 1
    for g in grid:
        programs *= g
    resident = resident_programs(regs, warps, k.metadata.shared)
    per_program_kb = per_thread * 32 * warps / 1024
    c = r["constexprs"]
    return dict(case=r["case"], name=k.metadata.name, target=target, warps=warps, stages=k.metadata.num_stages,
                **tensor_cores(ptx, sass),
                blocks={a: c[a] for a in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "K_TILES") if a in c},
                registers=regs, spill_stores=int(spill[1]) if spill else None,
                spill_loads=int(spill[2]) if spill else None, shared=k.metadata.shared,
                ldg=count_ops(sass, "LDG") - count_ops(sass, "LDGSTS"), ldgsts=count_ops(sass, "LDGSTS"),
                barriers=count_ops(sass, "BAR"), loads_in_flight=n, bytes_in_flight_thread=per_thread,
                kb_in_flight_program=round(per_program_kb, 2), programs=programs, resident_per_sm=resident,
                kb_in_flight_sm=round(min(resident, -(-programs // SMS)) * per_program_kb, 1),
                **loop_per_value(k.metadata.name, c, warps, sass), **per_weight_byte(k.metadata.name, c, warps, sass))


def markdown_large(rep: dict) -> str:
    rows = ["| case | kernel | blocks | warps | stages | regs | spills st/ld | shared KB | wgmma / tcgen05 / mma.sync (PTX) "
            "| SASS GMMA / UTC*MMA / HMMA | TMA loads |", "|---|---|---|---:|---:|---:|---|---:|---|---|---:|"]
    for k in rep["kernels"]:
        if k["wgmma"] + k["tcgen05"] + k["mma_sync"] == 0:
            continue  # (align, sum, quantization: the GEMMs are the point here)
        blocks = "x".join(f"{v}" for v in k["blocks"].values())
        rows.append(f"| {k['case']} | {k['name']} | {blocks} | {k['warps']} | {k['stages']} | {k['registers']} | "
                    f"{k['spill_stores']}/{k['spill_loads']} | {k['shared'] / 1024:.0f} | {k['wgmma']} / {k['tcgen05']} / "
                    f"{k['mma_sync']} | {k['sass_gmma']} / {k['sass_utc']} / {k['sass_hmma']} | {k['tma']} |")
    head = (f"# MoE GEMMs at >= 4,096 tokens, compiled offline for {rep['target']} (no GPU)\n\n"
            f"`python -m moelink.benchmarks.compile_tiny --cases large`, {rep['date']}, commit {rep['commit']}, Triton "
            f"{rep['triton']}. The configs the H100's tables pick (a B200 has no tuned table yet: the same blocks), "
            "bf16 at every shape, FP8 block-scaled at DeepSeek-V3 and Qwen3-30B-A3B. Blocks: BLOCK_M x BLOCK_N x "
            "BLOCK_K.\n\n")
    return head + "\n".join(rows) + "\n"


def markdown_mxfp4(rep: dict) -> str:
    rows = ["| case | kernel | blocks | warps | regs | spills st/ld | shared KB | MMA (SASS GMMA / UTC*MMA / HMMA) | loop "
            "instructions | values a thread | instructions a value | issue / MMA | LDG read after (instructions) | "
            "resident / SM |", "|---|---|---|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for k in rep["kernels"]:
        if "instr_per_value" not in k:
            continue
        blocks = "x".join(f"{v}" for v in k["blocks"].values())
        rows.append(f"| {k['case']} | {k['name']} | {blocks} | {k['warps']} | {k['registers']} | {k['spill_stores']}/"
                    f"{k['spill_loads']} | {k['shared'] / 1024:.0f} | {k['sass_gmma']} / {k['sass_utc']} / "
                    f"{k['sass_hmma']} | {k['loop_instructions']} | {k['values_per_thread']} | {k['instr_per_value']} | "
                    f"{k['issue_over_mma']} | {k['ldg_distance']} | {k['resident_per_sm']} |")
    head = (f"# MXFP4 per-tile GEMMs (gpt-oss), compiled offline for {rep['target']} (no GPU)\n\n"
            f"`python -m moelink.benchmarks.compile_tiny --cases mxfp4`, {rep['date']}, commit {rep['commit']}, Triton "
            f"{rep['triton']}. Blocks: BLOCK_M x BLOCK_N x BLOCK_K. Loop instructions: one K step of the innermost loop "
            "holding the MMA, a thread; values a thread: the weight values it decodes a step (gate-up: gate and up); "
            "issue / MMA: the step's issue time (x warps / 4 schedulers) over its tensor-core time at 2,048 bf16 FMAs "
            "a clock an SM (> 1: bound by issuing the decode); LDG read after: the fewest instructions between a plain "
            "load in the step (the scales) and its first reader (the step's length: read at the step's end, one step "
            "ahead). docs/kernels.md (MXFP4) has the estimate these feed.\n\n")
    return head + "\n".join(rows) + "\n"


def markdown(rep: dict) -> str:
    if rep.get("cases") == "large":
        return markdown_large(rep)
    if rep.get("cases") == "mxfp4":
        return markdown_mxfp4(rep)
    rows = ["| case | kernel | blocks | warps | regs | spills st/ld | shared B | LDG | LDGSTS | BAR | loads in flight "
            "(n / B a thread / KB a program) | programs | resident / SM | KB in flight / SM |",
            "|---|---|---|---:|---:|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for k in rep["kernels"]:
        blocks = "x".join(f"{v}" for v in k["blocks"].values())
        rows.append(f"| {k['case']} | {k['name']} | {blocks} | {k['warps']} | {k['registers']} | "
                    f"{k['spill_stores']}/{k['spill_loads']} | {k['shared']} | {k['ldg']} | {k['ldgsts']} | "
                    f"{k['barriers']} | {k['loads_in_flight']} / {k['bytes_in_flight_thread']} / "
                    f"{k['kb_in_flight_program']} | {k['programs']} | {k['resident_per_sm']} | {k['kb_in_flight_sm']} |")
    what = ("Decode layer's fused GEMVs (attention input, output, router)" if rep.get("cases") == "fused"
            else "Decode-size MoE")
    head = (f"# {what}, compiled offline for {rep['target']} (no GPU)\n\n"
            f"`python -m moelink.benchmarks.compile_tiny --cases {rep.get('cases', 'tiny')}`, {rep['date']}, commit {rep['commit']}, Triton "
            f"{rep['triton']}. Blocks: BLOCK_M x BLOCK_N x BLOCK_K (x K_TILES, the unrolled K tiles). KB in flight / SM: "
            f"the bytes a program issues before its first wait, times min(resident programs, programs / {SMS} SMs); an "
            "H100 SM needs ~20 KB in flight to stream at full bandwidth, an H200 SM ~35-40 KB "
            "(benchmarks/compile_sass.py). LDGSTS loads (cp.async, the sorted GEMMs') are pipelined by stages and not "
            "counted in flight.\n\n")
    return head + "\n".join(rows) + "\n"


def collect(arch: int, cases: str = "tiny") -> dict:
    import triton

    from moelink.engine.api.provenance import git_commit
    from datetime import date

    from .compile_cases import Recorder

    rec = Recorder()
    rec.install(arch)
    {"large": launch_large, "mxfp4": launch_mxfp4, "fused": launch_fused_decode}.get(cases, launch_cases)(rec)
    with tempfile.TemporaryDirectory() as tmp:
        kernels = [analyze(r, arch, Path(tmp)) for r in rec.records]
    return dict(target=f"sm_{arch}", cases=cases, triton=triton.__version__, date=str(date.today()),
                commit=git_commit(), kernels=kernels)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="90,100", help="comma-separated compute capabilities (90: H100/H200, 100: B200)")
    ap.add_argument("--cases", default="tiny", choices=["tiny", "large", "mxfp4", "fused"],
                    help="which of issue 80's rows: decode, >= 4,096 tokens, MXFP4, the decode layer's fused GEMVs")
    ap.add_argument("--out", default=None, help="path prefix: writes <out>_sm<arch>.* (default "
                    "benchmarks/results/compile_report_<cases>)")
    args = ap.parse_args(argv)
    prefix = args.out or str(RESULTS / f"compile_report_{args.cases}")
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="moelink-tiny-"))
    archs = [int(a) for a in args.arch.split(",")]
    if len(archs) > 1:  # one process per target: a JIT function keeps its compiled kernels per device, not per target,
        for arch in archs:  # so a second target in this process would get the first one's cubins back
            subprocess.run([sys.executable, "-m", "moelink.benchmarks.compile_tiny", "--arch", str(arch), "--cases",
                            args.cases, "--out", prefix], check=True)
        return
    for arch in archs:
        rep = collect(arch, args.cases)
        out = Path(f"{prefix}_sm{arch}")
        Path(f"{out}.json").write_text(json.dumps(rep, indent=1) + "\n")
        Path(f"{out}.md").write_text(markdown(rep))
        print(markdown(rep))


if __name__ == "__main__":
    main()
