"""Compile cases of QSA's attention kernel (benchmarks/compile_report.py's `qsa` family; kernels/triton_qsa.py) at
Qwen3.8-Flash-Next's published shapes as transformers' defaults give them (16 query heads over 2 kv heads of 256;
an indexer budget the config sets, here 2048 tokens in blocks of 64: 2111 position slots per token): a decode batch
of 64, and a mixed batch of 31 decodes and a 97-token chunk, bf16."""
from __future__ import annotations

import torch

from .compile_cases import Recorder

N, K, H, L = 16, 2, 256, 16
X = 2048 + 64 - 1


def compile_qsa(rec: Recorder, quick: bool) -> None:
    from moelink.kernels.attention import AttentionMetadata
    from moelink.kernels.triton_qsa import triton_sparse_gqa_attention

    meta = dict(device="meta")
    i32 = lambda *s: torch.empty(*s, dtype=torch.int32, **meta)  # noqa: E731
    dt = torch.bfloat16
    cache = torch.empty(1000, L, K, H, dtype=dt, **meta)
    batches = [("decode batch 64", [1] * 64), ("mixed batch (31 decodes + a 97-token chunk)", [1] * 31 + [97])]
    for label, q_lens in batches if not quick else batches[:1]:
        S, T = len(q_lens), sum(q_lens)
        m = AttentionMetadata(i32(S + 1), i32(S), i32(S, 2048), torch.empty(T, dtype=torch.long, **meta), q_lens,
                              [4096] * S, max(q_lens), 4096, 999)
        with rec.labelled(f"qwen3.8-flash-next QSA attention ({N} heads over {K}, {X} slots), {label}"):
            triton_sparse_gqa_attention(torch.empty(T, N, H, dtype=dt, **meta), cache, cache, m,
                                        torch.empty(T, X, dtype=torch.long, **meta), H**-0.5)


if __name__ == "__main__":  # registers / spills of each kernel, without the report
    import os

    os.environ.pop("TRITON_INTERPRET", None)
    r = Recorder()
    r.install(90)
    compile_qsa(r, quick=False)
    for x in r.records:
        k = x["kernel"]
        print(f"{x['case']}: {k.metadata.name} warps={k.metadata.num_warps} stages={k.metadata.num_stages} "
              f"shared={k.metadata.shared} regs={getattr(k, 'n_regs', '?')} spills={getattr(k, 'n_spills', '?')}")
