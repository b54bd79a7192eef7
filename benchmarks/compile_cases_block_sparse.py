"""Compile cases of block-sparse attention's kernels (benchmarks/compile_report.py's `block_sparse` family): the block
indexer's scores (kernels/triton_block_sparse.py's _block_scores_kernel) and the attention over the kept blocks
(_block_sparse_kernel) at MiniMax-M3's shapes (64 query heads of 128 over 4 kv heads, 4 index heads of 128, blocks
of 128 positions, 16 kept; max_model_len 524288): decode batches (scored max_model_len wide, as a decode graph
captures them) and a mixed batch of decodes and a 97-token chunk over a 4096-token context, bf16 and fp8 caches (the
index keys stay bf16 under an fp8 KV cache)."""
from __future__ import annotations

import torch

from .compile_cases import Recorder

N, K, H, HI, I, BS, S, L = 64, 4, 128, 4, 128, 128, 16, 16
MAX_LEN = 524288


def compile_block_sparse(rec: Recorder, quick: bool) -> None:
    from moelink.kernels.attention import AttentionMetadata
    from moelink.kernels.triton_block_sparse import triton_block_sparse_attention, triton_block_sparse_select

    meta = dict(device="meta")
    i32 = lambda *s: torch.empty(*s, dtype=torch.int32, **meta)  # noqa: E731
    dt = torch.bfloat16
    batches = [("decode batch 64", [1] * 64), ("mixed batch (31 decodes + a 97-token chunk)", [1] * 31 + [97])]
    index_cache = torch.empty(1000, L, I, dtype=dt, **meta)
    for cache_dt in (dt,) if quick else (dt, torch.float8_e4m3fn):
        k_cache = torch.empty(1000, L, K, H, dtype=cache_dt, **meta)
        v_cache = torch.empty(1000, L, K, H, dtype=cache_dt, **meta)
        for label, q_lens in batches if not quick else batches[:1]:
            S_, T = len(q_lens), sum(q_lens)
            m = AttentionMetadata(i32(S_ + 1), i32(S_), i32(S_, MAX_LEN // L), torch.empty(T, dtype=torch.long, **meta),
                                  q_lens, [4096] * S_, max(q_lens), 4096, 999)
            if cache_dt == dt:
                with rec.labelled(f"minimax-m3 block indexer scores ({HI} heads of {I}, blocks of {BS}), {label}"):
                    triton_block_sparse_select(torch.empty(T, HI, I, dtype=dt, **meta), index_cache, m, BS, S, 1,
                                               MAX_LEN)
            with rec.labelled(f"minimax-m3 block-sparse attention ({N} heads in runs of {N // HI}, {S} blocks of {BS}), {label}, "
                              f"{str(cache_dt)[6:]} cache"):
                triton_block_sparse_attention(torch.empty(T, N, H, dtype=dt, **meta), k_cache, v_cache, m,
                                              i32(T, N, S), BS, 0.1, group=N // HI)  # 16 heads per program


if __name__ == "__main__":  # registers / spills of each kernel, without the report
    import os

    os.environ.pop("TRITON_INTERPRET", None)
    r = Recorder()
    r.install(90)
    compile_block_sparse(r, quick=False)
    for x in r.records:
        k = x["kernel"]
        print(f"{x['case']}: {k.metadata.name} warps={k.metadata.num_warps} stages={k.metadata.num_stages} "
              f"shared={k.metadata.shared} regs={getattr(k, 'n_regs', '?')} spills={getattr(k, 'n_spills', '?')}")
