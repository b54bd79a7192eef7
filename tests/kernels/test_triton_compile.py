"""Every Triton kernel compiles for Hopper (sm_90) at real model shapes, on a machine without a GPU.

The interpreter tests check what the kernels compute; this checks that the
compiler accepts them (types of loop-carried values, layouts, shared memory)
with the launch configs the wrappers would pick on an H100. A child process
(TRITON_INTERPRET unset, so kernels are real JIT functions) runs every wrapper
on meta tensors; each launch is turned into an ahead-of-time compile for
GPUTarget('cuda', 90, 32) through a stand-in driver, and nothing runs.
With a GPU this is skipped: the GPU tests compile and run the same kernels.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

from pathlib import Path

import pytest
import torch

from tests.helpers import zygote

ROOT = Path(__file__).resolve().parents[2]

H100_SMEM = 227 * 1024  # max dynamic shared memory per block on sm_90


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile these for the real device")
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_all_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    # As `python -m` of this file from the repository root, forked by the test zygote (torch imported once).
    proc = zygote.run([sys.executable, "-m", "tests.kernels.test_triton_compile"], capture_output=True, text=True,
                      env=env, timeout=900, cwd=str(ROOT))
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr[-4000:]
    compiled = json.loads(proc.stdout.strip().splitlines()[-1])
    names = {c["name"] for c in compiled}
    # Batch-invariant mode's kernels (kernels/batch_invariant_triton.py) and the experts' LoRA pipeline
    # (kernels/triton_lora_moe.py), for sm_90 and sm_100: no spills.
    bi = [c for c in compiled if c.get("spill_stores") is not None]
    assert {(c["name"], c["arch"]) for c in bi} >= {(n, a) for n in ("_bi_split_kernel", "_bi_merge_kernel",
                                                                       "_bi_matmul_kernel", "_moe_up_kernel",
                                                                       "_moe_down_kernel") for a in (90, 100)}, bi
    spilling = [c for c in bi if c["spill_stores"] or c["spill_loads"]]
    assert not spilling, f"batch-invariant kernels spill: {spilling}"
    assert {(c["name"], c["arch"]) for c in bi} >= {(n, a) for n in ("_sorted_lora_shrink_kernel",
                                                                       "_sorted_lora_expand_kernel") for a in (90, 100)}
    # The Mamba recurrences (Granite 4.0-H, Nemotron 3, Jamba), for sm_90 and sm_100: no spills (checked above).
    assert {(c["name"], c["arch"]) for c in bi} >= {(n, a) for n in ("_mamba1_recurrent_kernel",
                                                                       "_mamba2_recurrent_kernel") for a in (90, 100)}
    assert names >= {"_align_scatter_kernel", "_align_count_kernel", "_moe_up_kernel", "_moe_down_kernel",
                     "_moe_sum_kernel", "_decode_kernel", "_merge_splits_kernel", "_prefill_kernel",
                     "_plan_kernel", "_merge_plan_kernel",
                     "_write_kv_kernel", "_rms_norm_kernel", "_rotary_kernel"}, names
    too_big = [c for c in compiled if c["shared"] > H100_SMEM]
    assert not too_big, f"shared memory over the sm_90 limit: {too_big}"


def _compile_all() -> list[dict]:
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    class StandInDriver:  # what JITFunction.run asks of a driver when it only compiles
        arch = 90  # the device id too: Triton keeps one kernel cache per device, so another arch compiles anew

        def get_current_device(self):
            return self.arch

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", self.arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    _ptx_only()
    stand_in = StandInDriver()
    driver.set_active(stand_in)
    compiled = []
    spills = {"on": False}

    def compile_instead_of_launch(self, grid):
        def launch(*args, **kwargs):
            k = self.run(*args, grid=grid, warmup=True, **kwargs)
            rec = dict(name=self.fn.__name__, shared=k.metadata.shared, num_warps=k.metadata.num_warps,
                       arch=stand_in.arch)
            if spills["on"]:
                rec.update(_ptxas_spills(k.asm["ptx"], stand_in.arch))
            compiled.append(rec)
        return launch

    JITFunction.__getitem__ = compile_instead_of_launch
    from moelink.kernels import moe_config, triton_common
    from moelink.kernels.attention import AttentionMetadata
    from moelink.kernels.triton_attention import triton_paged_attention, triton_write_kv
    from moelink.kernels.triton_moe import triton_fused_moe
    from moelink.kernels.triton_norm import triton_add_rms_norm, triton_rms_norm
    from moelink.kernels.triton_rotary import triton_rotary

    triton_common.interpreting = lambda t: False
    moe_config.device_name = lambda d: "NVIDIA_H100_80GB_HBM3"  # its tuned file if present, else default.json
    meta = dict(device="meta")
    # MoE: Qwen3-30B-A3B at a decode count (the align's SINGLE program), a mid count in each dtype with the expert map,
    # and a prefill count (the TMA gate-up and the atomic combine). Every constexpr branch of the align, GEMM and sum
    # kernels is taken here; Mixtral's and DeepSeek-V3's shapes only pick other tile sizes of the same branches, and
    # every config bucket at every model shape (shared memory and spills included) is in the committed compile report
    # (tests/kernels/test_compile_report.py). Compiling them here too cost ~8 s of a cold-cache suite run.
    for E, K, D, I in [(128, 8, 2048, 768)]:
        for T in (1, 64, 4096):
            for dt in (torch.bfloat16,) + ((torch.float32, torch.float16) if T == 64 else ()):
                emap = torch.empty(E, dtype=torch.int32, **meta) if T == 64 else None
                triton_fused_moe(torch.empty(T, D, dtype=dt, **meta), torch.empty(E, 2 * I, D, dtype=dt, **meta),
                                 torch.empty(E, D, I, dtype=dt, **meta), torch.empty(T, K, **meta),
                                 torch.empty(T, K, dtype=torch.long, **meta), emap,
                                 combine="atomic" if (E, T) == (128, 4096) else "sum")
    # Attention: Qwen3's heads (GQA 8) in bf16 and fp32, and 16 heads of their own (MHA) in fp16; a mixed batch (decode
    # planned over 4 x S programs + a chunk) and a pure decode batch.
    for N, Kh, dt in [(32, 4, torch.bfloat16), (32, 4, torch.float32), (16, 16, torch.float16)]:
        H, L, S, T = 128, 16, 8, 40
        i32 = lambda *s: torch.empty(*s, dtype=torch.int32, **meta)  # noqa: E731
        q = torch.empty(T, N, H, dtype=dt, **meta)
        cache = torch.empty(100, L, Kh, H, dtype=dt, **meta)
        mixed = AttentionMetadata(i32(S + 1), i32(S), i32(S, 64), torch.empty(T, dtype=torch.long, **meta),
                                  [1] * 7 + [33], [100] * 8, 33, 1000, 99)
        triton_paged_attention(q, cache, cache, mixed, 0.1, num_splits=4)
        triton_paged_attention(q, cache, cache, mixed, 0.1, prefill_splits=4)  # split prefill + token reduce
        decode = AttentionMetadata(i32(S + 1), i32(S), i32(S, 64), torch.empty(S, dtype=torch.long, **meta),
                                   [1] * 8, [100] * 8, 1, 1000, 99)
        triton_paged_attention(q[:S], cache, cache, decode, 0.1, num_splits=1)
        kv = torch.empty(T, Kh, H, dtype=dt, **meta)
        triton_write_kv(kv, kv, cache, cache, torch.empty(T, dtype=torch.long, **meta))
    # gpt-oss: 64 heads over 8 kv heads of 64 dims, with sinks and a 128-token window (the WINDOW / SINKS
    # variants of the decode, prefill and merge kernels), in its bf16 (fp32 compiled the same variants again).
    # Qwen3's cases above take both branches' other sides; sinks without a window took no branch of its own (~3 s).
    for dt in (torch.bfloat16,):
        H, L, S, T = 64, 16, 8, 40
        i32 = lambda *s: torch.empty(*s, dtype=torch.int32, **meta)  # noqa: E731
        q = torch.empty(T, 64, H, dtype=dt, **meta)
        cache = torch.empty(100, L, 8, H, dtype=dt, **meta)
        sinks = torch.empty(64, dtype=dt, **meta)
        mixed = AttentionMetadata(i32(S + 1), i32(S), i32(S, 64), torch.empty(T, dtype=torch.long, **meta),
                                  [1] * 7 + [33], [100] * 8, 33, 1000, 99)
        for extra in (dict(sinks_N=sinks, sliding_window=128),):
            triton_paged_attention(q, cache, cache, mixed, 0.1, num_splits=4, **extra)
            triton_paged_attention(q, cache, cache, mixed, 0.1, prefill_splits=4, **extra)
            triton_paged_attention(q[:S], cache, cache, AttentionMetadata(
                i32(S + 1), i32(S), i32(S, 64), torch.empty(S, dtype=torch.long, **meta), [1] * 8, [100] * 8, 1,
                1000, 99), 0.1, num_splits=1, **extra)
    # Norms (per-head q/k views; hidden sizes 2048 in each dtype, DeepSeek-V3's 7168 with its 16 warps in bf16) and
    # rotary.
    for dt in (torch.bfloat16, torch.float32, torch.float16):
        for D in (2048, 7168) if dt == torch.bfloat16 else (2048,):
            x = torch.empty(33, D, dtype=dt, **meta)
            triton_rms_norm(x, torch.empty(D, dtype=dt, **meta), 1e-6)
            triton_add_rms_norm(x, x, torch.empty(D, dtype=dt, **meta), 1e-6)
        qkv = torch.empty(33, 40 * 128, dtype=dt, **meta)
        q, k = qkv[:, :4096].view(33, 32, 128), qkv[:, 4096:4608].view(33, 4, 128)
        triton_rms_norm(q, torch.empty(128, dtype=dt, **meta), 1e-6)
        triton_rotary(q, k, torch.empty(33, dtype=torch.long, **meta), torch.empty(100, 128, **meta))
    spills["on"] = True
    for arch in (90, 100):
        stand_in.arch = arch
        _compile_batch_invariant(arch)
        _compile_lora_moe()
        _compile_mamba()
    return compiled


def _ptx_only() -> None:
    """Triton's compile stops at the PTX: its last stage (ptxas to a cubin, nothing here loads one) returns no
    binary. What this test reads is known before it: the shared memory and warps (the TTGIR / LLVM lowering), and the
    PTX, which `_ptxas_spills` hands to ptxas itself for the kernels whose spills it checks. ptxas's full -O3 was most
    of a cold-cache run of this file (every kernel variant assembled for nothing). The compiled kernels go to a cache
    directory of their own beside Triton's, so an empty cubin never answers a real compile.
    `MOELINK_COMPILE_TEST_PTXAS=1` assembles every kernel as before."""
    if os.environ.get("MOELINK_COMPILE_TEST_PTXAS") == "1":
        return
    from triton import knobs
    from triton.backends.nvidia.compiler import CUDABackend

    knobs.cache.dir = os.path.join(knobs.cache.dir, "moelink-ptx-only")
    CUDABackend.make_cubin = lambda self, src, metadata, opt, capability: b""


_SPILLS: dict[tuple[str, int], dict] = {}


def _ptxas_spills(ptx: str, arch: int) -> dict:
    """spill_stores / spill_loads of `ptx` from the ptxas Triton runs for `arch` (`ptxas -v`), once per distinct PTX
    and ptxas: launches Triton serves from one compiled kernel hand over the same PTX (this run), and a PTX this ptxas
    already read (an earlier run) is answered from its record beside Triton's own cache, as Triton's cache answers
    the compile itself: ptxas is deterministic in its input and version (its ~0.1 s a run was most of this script's
    time: 76 runs, 60 distinct)."""
    if (ptx, arch) not in _SPILLS:
        _SPILLS[ptx, arch] = _recorded_ptxas(ptx, arch)
    return dict(_SPILLS[ptx, arch])


def _recorded_ptxas(ptx: str, arch: int) -> dict:
    import hashlib

    from triton import knobs
    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(arch)
    stat = os.stat(tool.path)
    key = hashlib.sha256("\0".join((ptx, tool.path, str(tool.version), str(stat.st_size), str(stat.st_mtime_ns),
                                     str(arch))).encode()).hexdigest()
    record = os.path.join(knobs.cache.dir, "moelink-test-ptxas-spills", f"{key}.json")
    try:
        with open(record) as f:
            return json.load(f)
    except (OSError, ValueError):
        pass
    got = _run_ptxas(ptx, tool.path)
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(record), exist_ok=True)
        with open(f"{record}.{os.getpid()}", "w") as f:
            json.dump(got, f)
        os.replace(f"{record}.{os.getpid()}", record)  # whole or absent, for a run beside this one
    return got


def _run_ptxas(ptx: str, ptxas: str) -> dict:
    import re
    import tempfile

    target = re.search(r"\.target (\S+)", ptx)[1]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([ptxas, "-v", f"--gpu-name={target}", src, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True).stderr
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m is None:
        raise RuntimeError(f"ptxas -v gave no spill line for {target}: {log[-2000:]}")
    return dict(spill_stores=int(m[1]), spill_loads=int(m[2]))


def _compile_lora_moe() -> None:
    """The routed experts with per-expert LoRA (kernels/triton_lora_moe.py: the sorted shrink / expand and the
    gate-up GEMM's ROW_BIAS variant) at Qwen3-30B-A3B (128 experts, top-8, D 2048, I 768), 4 slots of rank 16, bf16,
    a prefill batch. Its decode batch takes the same constexpr branches at smaller tiles (~2 s an arch); the
    committed compile report holds both batches' spills."""
    from moelink.benchmarks.compile_cases_decode import launch_lora_moe

    launch_lora_moe((2048,))


def _compile_mamba() -> None:
    """The Mamba recurrences (kernels/triton_mamba1.py, triton_mamba2.py), not yet in the committed compile report:
    decode and prefill at Nemotron 3 Nano's Mamba2 shape (64 heads of 64, 8 groups of state 128) and Jamba's Mamba1
    shape (8,192 channels of state 16), bf16 activations, float32 state pools; replay takes the decode's tiles."""
    from moelink.kernels.triton_mamba1 import triton_mamba1_decode, triton_mamba1_scan
    from moelink.kernels.triton_mamba2 import triton_mamba2_decode, triton_mamba2_scan

    meta, bf16, i32 = dict(device="meta"), torch.bfloat16, torch.int32
    S, P = 64, 256
    qsl, slots = torch.empty(S + 1, dtype=i32, **meta), torch.empty(S, dtype=i32, **meta)
    N, H, G, K = 64, 64, 8, 128
    for T in (S, 4096):
        args2 = (torch.empty(T, N, H, dtype=bf16, **meta), torch.empty(T, N, dtype=bf16, **meta),
                 torch.empty(T, G, K, dtype=bf16, **meta), torch.empty(T, G, K, dtype=bf16, **meta),
                 torch.empty(N, **meta), torch.empty(N, **meta), torch.empty(N, **meta), torch.empty(P, N, H, K, **meta),
                 qsl, slots)
        (triton_mamba2_decode if T == S else triton_mamba2_scan)(*args2)
    I, K1 = 8192, 16
    for T in (S, 4096):
        args1 = (torch.empty(T, I, dtype=bf16, **meta), torch.empty(T, I, dtype=bf16, **meta),
                 torch.empty(T, K1, dtype=bf16, **meta), torch.empty(T, K1, dtype=bf16, **meta),
                 torch.empty(I, K1, **meta), torch.empty(I, **meta), torch.empty(I, **meta),
                 torch.empty(P, I, K1, **meta), qsl, slots)
        (triton_mamba1_decode if T == S else triton_mamba1_scan)(*args1)


def _compile_batch_invariant(arch: int) -> None:
    """Batch-invariant mode's kernels (benchmarks/compile_cases_batch_invariant.py): bf16 on both archs, fp32 (its
    smaller tiles) on sm_90."""
    from moelink.benchmarks.compile_cases_batch_invariant import launch_batch_invariant

    launch_batch_invariant((torch.bfloat16, torch.float32) if arch == 90 else (torch.bfloat16,))


if __name__ == "__main__":
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as e:
        print(f"no Triton NVIDIA backend to compile with: {e}")
        sys.exit(3)
    print(json.dumps(_compile_all()))
