"""Compile cases of the gated DeltaNet kernels (benchmarks/compile_report.py's `gdn` family) at Qwen3-Next-80B-A3B's
linear-attention shapes: 16 q/k heads and 32 value heads of 128, conv kernel 4 over 2 * 16 * 128 + 32 * 128 = 8192
channels (one rank; a tensor-parallel shard divides the heads and channels, the same code): the recurrence for decode,
verify (intermediate states), prefill and the replay of accepted tokens, the commit of accepted states (recurrent and
conv pools), the gates, the causal conv's prefill (outputs and state write), its decode / verify update and its
replay. Bf16 activations, fp32 states. Kimi Delta Attention (Kimi Linear, Ling's hybrid: the same recurrence with a
decay per key channel, PER_CHANNEL) at Kimi-Linear-48B-A3B's shape: 32 heads of 128, its decode, verify and prefill.

Standalone, any target Triton supports (sm_100 with Triton >= 3.9), no GPU needed:
    python -m moelink.benchmarks.compile_cases_gdn [ARCH]        # prints registers / spills per kernel
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .compile_cases import Recorder

G, N, K, V, W = 16, 32, 128, 128, 4  # Qwen3-Next-80B-A3B: linear_num_key_heads, _value_heads, head dims, conv kernel
C = 2 * G * K + N * V


def compile_gdn(rec: Recorder, quick: bool) -> None:
    from moelink.kernels.triton_causal_conv1d import (triton_causal_conv1d, triton_causal_conv1d_update,
                                                      triton_replay_conv_state)
    from moelink.kernels.triton_gated_delta import (triton_commit_states, triton_gated_delta_rule,
                                                    triton_gated_delta_rule_decode, triton_gdn_gating,
                                                    triton_replay_gated_delta_state)

    meta = dict(device="meta")
    dt, i32 = torch.bfloat16, torch.int32
    S, Q, P = 64, 4, 256

    def qkv(T):  # q, k, v as the models split the conv output [T, C] (strided views)
        x = torch.empty(T, C, dtype=dt, **meta)
        return x, x[:, : G * K].view(T, G, K), x[:, G * K: 2 * G * K].view(T, G, K), x[:, 2 * G * K:].view(T, N, V)

    pool = torch.empty(P, N, K, V, **meta)
    conv_pool = torch.empty(P, W - 1, C, dtype=dt, **meta)
    slots = torch.empty(S, dtype=i32, **meta)
    gate = [torch.empty(S * Q, N, **meta), torch.empty(S * Q, N, dtype=dt, **meta)]
    for T, label, keep in [(S, "decode (1 token per sequence)", None), (S * Q, f"verify ({Q} tokens, intermediate states)",
                                                                       torch.empty(S, Q, N, K, V, **meta))]:
        _, q, k, v = qkv(T)
        with rec.labelled(f"qwen3-next-80b-a3b gated delta rule {label}"):
            triton_gated_delta_rule_decode(q, k, v, gate[0][:T], gate[1][:T], pool, torch.empty(S + 1, dtype=i32, **meta),
                                           slots, keep)
    if not quick:
        _, q, k, v = qkv(4096)
        with rec.labelled("qwen3-next-80b-a3b gated delta rule prefill (recurrence, 4096 tokens)"):
            triton_gated_delta_rule(q, k, v, torch.empty(4096, N, **meta), torch.empty(4096, N, dtype=dt, **meta), pool,
                                    torch.empty(4, dtype=i32, **meta), slots[:3], torch.empty(3, dtype=torch.bool, **meta))
    # Kimi Delta Attention: 32 heads of 128 (q/k heads = value heads), g [T, H, K] float32.
    H = 32
    kda_pool = torch.empty(P, H, K, K, **meta)
    for T, label, keep in [(S, "decode (1 token per sequence)", None),
                           (S * Q, f"verify ({Q} tokens, intermediate states)", torch.empty(S, Q, H, K, K, **meta))]:
        x = torch.empty(T, 3 * H * K, dtype=dt, **meta)
        q, k, v = (x[:, i * H * K:(i + 1) * H * K].view(T, H, K) for i in range(3))
        with rec.labelled(f"kimi-linear-48b-a3b kimi delta attention {label}"):
            triton_gated_delta_rule_decode(q, k, v, torch.empty(T, H, K, **meta), torch.empty(T, H, dtype=dt, **meta),
                                           kda_pool, torch.empty(S + 1, dtype=i32, **meta), slots, keep)
    if not quick:
        x = torch.empty(4096, 3 * H * K, dtype=dt, **meta)
        q, k, v = (x[:, i * H * K:(i + 1) * H * K].view(4096, H, K) for i in range(3))
        with rec.labelled("kimi-linear-48b-a3b kimi delta attention prefill (recurrence, 4096 tokens)"):
            triton_gated_delta_rule(q, k, v, torch.empty(4096, H, K, **meta), torch.empty(4096, H, dtype=dt, **meta),
                                    kda_pool, torch.empty(4, dtype=i32, **meta), slots[:3],
                                    torch.empty(3, dtype=torch.bool, **meta))
    acc = torch.empty(S, dtype=i32, **meta)
    _, q, k, v = qkv(S * Q)
    with rec.labelled(f"qwen3-next-80b-a3b gated delta rule replay of accepted tokens (of {Q})"):
        triton_replay_gated_delta_state(k, v, gate[0], gate[1], pool, torch.empty(S + 1, dtype=i32, **meta), slots, acc)
    with rec.labelled(f"qwen3-next-80b-a3b commit of accepted states (recurrent [{N}, {K}, {V}] fp32)"):
        triton_commit_states(pool, slots, torch.empty(S, Q, N, K, V, **meta), acc)
    with rec.labelled(f"qwen3-next-80b-a3b commit of accepted states (conv [{W - 1}, {C}] bf16)"):
        triton_commit_states(conv_pool, slots, torch.empty(S, Q, W - 1, C, dtype=dt, **meta), acc)
    ba = torch.empty(S, 2 * N, dtype=dt, **meta)
    with rec.labelled("qwen3-next-80b-a3b gates (g, beta)"):
        triton_gdn_gating(ba[:, :N], ba[:, N:], torch.empty(N, **meta), torch.empty(N, **meta))
    w = torch.empty(C, W, dtype=dt, **meta)
    T = 4096
    x = torch.empty(T, 2 * C, dtype=dt, **meta)[:, :C]  # the conv input: the q/k/v part of the projection
    with rec.labelled(f"qwen3-next-80b-a3b causal conv1d prefill ({T} tokens, states by slot)"):
        triton_causal_conv1d(x, w, None, conv_pool, torch.empty(4, dtype=i32, **meta), slots[:3],
                             torch.empty(3, dtype=torch.bool, **meta))
    for T, label, keep in [(S, "decode", None), (S * Q, f"verify ({Q} tokens, intermediate states)",
                                                 torch.empty(S, Q, W - 1, C, dtype=dt, **meta))]:
        with rec.labelled(f"qwen3-next-80b-a3b causal conv1d update, {label}"):
            triton_causal_conv1d_update(x[:T], w, None, conv_pool, torch.empty(S + 1, dtype=i32, **meta), slots,
                                        "silu", keep)
    with rec.labelled(f"qwen3-next-80b-a3b causal conv1d replay of accepted tokens (of {Q})"):
        triton_replay_conv_state(x[: S * Q], conv_pool, torch.empty(S + 1, dtype=i32, **meta), slots, acc)


def main(argv=None) -> int:
    """Compile the gdn cases for one target (default 90) and print registers, spills and shared memory per kernel."""
    argv = sys.argv[1:] if argv is None else argv
    arch = int(argv[0]) if argv else 90
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="gdn-compile-")
    import triton

    rec = Recorder()
    rec.install(arch)
    compile_gdn(rec, quick=False)
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path  # the ptxas Triton itself runs for this target
    tmp = Path(tempfile.mkdtemp())
    print(f"triton {triton.__version__}, sm_{arch}, {Path(ptxas).name}")
    for r in rec.records:
        k = r["kernel"]
        ptx = k.asm["ptx"]
        tgt = re.search(r"\.target (\S+)", ptx)[1]
        p = tmp / f"{k.hash}.ptx"
        p.write_text(ptx)
        log = subprocess.run([ptxas, "-v", f"--gpu-name={tgt}", str(p), "-o", str(tmp / "x.cubin")],
                             capture_output=True, text=True)
        log = log.stdout + log.stderr
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
        regs = re.search(r"Used (\d+) registers", log)
        print(f"{k.metadata.name:24s} {tgt:8s} warps {k.metadata.num_warps} regs {regs[1] if regs else '?':>3s} "
              f"stack {m[1] if m else '?'} spill st/ld {m[2] if m else '?'}/{m[3] if m else '?'} "
              f"smem {k.metadata.shared}  {r['constexprs']}  <- {r['case']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
