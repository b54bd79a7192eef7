"""Offline sm_100 (Blackwell) compile of the NVFP4 fused MoE, no GPU needed: the native `tl.dot_scaled` path
and the dequantizing path at every case of benchmarks/compile_cases_nvfp4.py, with registers, spills, shared
memory and the tensor-core instructions (tcgen05 MMA kinds) from Triton's Blackwell ptxas.

    python -m moelink.benchmarks.compile_nvfp4_sm100 OUT.json [native,dequant]

The native path needs Triton >= 3.9 (3.6's compiler aborts on e4m3 scales for sm_100); run the dequantizing path
with Triton 3.6 (`PYTHONPATH=/path/to/triton36`) as on the GPU machines. Committed results:
benchmarks/results/compile_report_sm100_nvfp4_native_triton3.9.json and ..._dequant_triton3.6.json.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def main(argv=None) -> int:
    argv = sys.argv if argv is None else ["compile_nvfp4_sm100", *argv]
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="nvfp4-sm100-")
    import triton  # (imported here: after TRITON_INTERPRET is cleared, so the kernels compile)
    from moelink.benchmarks.compile_cases import Recorder
    from moelink.benchmarks.compile_cases_nvfp4 import compile_moe_nvfp4

    rec = Recorder()
    rec.install(100)
    modes = argv[2].split(",") if len(argv) > 2 else ["native", "dequant"]  # which paths
    if "native" in modes:
        compile_moe_nvfp4(rec, quick=False, native=True)
    n_native = len(rec.records)
    if "dequant" in modes:
        compile_moe_nvfp4(rec, quick=False, native=False)
    ptxas = str(Path(triton.__file__).parent / "backends/nvidia/bin/ptxas-blackwell")
    seen, rows = set(), []
    tmp = Path(tempfile.mkdtemp())
    for i, r in enumerate(rec.records):
        k = r["kernel"]
        if k.hash in seen or "nvfp4" not in k.metadata.name:
            continue
        seen.add(k.hash)
        ptx = k.asm["ptx"]
        tgt = re.search(r"\.target (\S+)", ptx)[1]
        p = tmp / f"{k.hash}.ptx"
        p.write_text(ptx)
        log = subprocess.run([ptxas, "-v", f"--gpu-name={tgt}", str(p), "-o", str(tmp / "x.cubin")], capture_output=True,
                             text=True).stderr
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
        regs = re.search(r"Used (\d+) registers", log)
        kinds = sorted(set(re.findall(r"tcgen05\.mma\.cta_group::\d\.kind::(\w+)", ptx)))
        c = r["constexprs"]
        rows.append(dict(native=i < n_native, name=k.metadata.name, target=tgt, BM=c.get("BLOCK_M"), BN=c.get("BLOCK_N"),
                         BK=c.get("BLOCK_K"), warps=k.metadata.num_warps, stages=k.metadata.num_stages,
                         registers=int(regs[1]) if regs else None, stack=int(m[1]) if m else None,
                         spill_stores=int(m[2]) if m else None, spill_loads=int(m[3]) if m else None, shared=k.metadata.shared,
                         tcgen05_mma=len(re.findall(r"\btcgen05\.mma\.", ptx)), tcgen05_kinds=kinds,
                         wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)), mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
                         cases=[x["case"] for x in rec.records if x["kernel"].hash == k.hash]))
    out = dict(triton=triton.__version__, target="GPUTarget('cuda', 100, 32)", ptxas=ptxas, kernels=rows)
    Path(argv[1]).write_text(json.dumps(out, indent=1))
    for r in rows:
        print(("native " if r["native"] else "dequant"), r["name"][10:-7], r["BM"], r["BN"], r["BK"], "w", r["warps"], "s",
              r["stages"], "reg", r["registers"], "spill", r["spill_stores"], r["spill_loads"], "smem", r["shared"],
              "tcgen05", r["tcgen05_mma"], r["tcgen05_kinds"], "wgmma", r["wgmma"], "mma.sync", r["mma_sync"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
