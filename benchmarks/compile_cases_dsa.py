"""Compile cases of the DeepSeek Sparse Attention kernels (benchmarks/compile_report.py's `dsa` family): the lightning
indexer's scores and top-k (kernels/triton_dsa_topk.py) and sparse MLA (kernels/triton_mla_sparse.py) at DeepSeek-V3.2's
shapes (128 MLA heads, latent 512 + rope 64; 64 index heads of 128; top-2048; max_model_len 163840), GLM-5's (64
MLA heads, 32 index heads) and Hunyuan Hy4's (GLM-5's, with a sink logit per head: sparse and dense MLA with sinks): decode batches (scored max_model_len wide, as a decode graph captures them; sparse MLA
unsplit and split 4 ways; the top-k on its split path, P programs per row and the merge, P = 4 at batch 64 and 8 at
batch 4), a mixed batch of decodes and a 97-token chunk over a 4096-token context (the one-program top-k), bf16 and
fp8 caches (fp8 index keys: uint8 rows of e4m3 keys and float32 scales, and their write); and GLM-5.3-Flash's pooled
selection (kernels/triton_dsa_pool_topk.py: 32 index heads of 128, pools of 16, top-2048) on the same batches."""
from __future__ import annotations

import torch

from .compile_cases import Recorder

C, P, L, K = 512, 64, 16, 2048
MAX_LEN = 163840


def compile_dsa(rec: Recorder, quick: bool) -> None:
    from moelink.kernels.attention import AttentionMetadata
    from moelink.kernels.dsa import fp8_key_row_bytes
    from moelink.kernels.triton_dsa_keys import triton_write_fp8_index_keys
    from moelink.kernels.triton_dsa_pool_topk import triton_dsa_pool_topk
    from moelink.kernels.triton_dsa_topk import triton_dsa_topk
    from moelink.kernels.triton_mla import triton_mla_attention
    from moelink.kernels.triton_mla_sparse import triton_sparse_mla_attention

    meta = dict(device="meta")
    i32 = lambda *s: torch.empty(*s, dtype=torch.int32, **meta)  # noqa: E731
    dt = torch.bfloat16
    models = [("deepseek-v3.2", 128, 64, 128)] + ([] if quick else [("glm-5", 64, 32, 128), ("hy4-preview", 64, 32, 128)])
    batches = [("decode batch 64", [1] * 64, 1), ("decode batch 4, split 4", [1] * 4, 4),
               ("mixed batch (31 decodes + a 97-token chunk)", [1] * 31 + [97], None)]
    for name, N, H, D in models:
        for cache_dt in (dt,) if quick else (dt, torch.float8_e4m3fn):
            cache = torch.empty(1000, L, C + P, dtype=cache_dt, **meta)
            # fp8 keys as the engine keeps them beside an fp8 latent: uint8 rows of e4m3 key + float32 scales.
            index_cache = (torch.empty(1000, L, fp8_key_row_bytes(D), dtype=torch.uint8, **meta)
                           if cache_dt == torch.float8_e4m3fn else torch.empty(1000, L, D, dtype=cache_dt, **meta))
            for label, q_lens, splits in batches if not quick else batches[:1]:
                S, T = len(q_lens), sum(q_lens)
                m = AttentionMetadata(i32(S + 1), i32(S), i32(S, 10300), torch.empty(T, dtype=torch.long, **meta), q_lens,
                                      [4096] * S, max(q_lens), 4096, 999)
                if cache_dt == torch.float8_e4m3fn:
                    with rec.labelled(f"{name} fp8 index key write (per-128 scales), {label}"):
                        triton_write_fp8_index_keys(torch.empty(T, D, dtype=dt, **meta), index_cache,
                                                    torch.empty(T, dtype=torch.long, **meta))
                with rec.labelled(f"{name} indexer scores + top-{K}, {label}, {str(cache_dt)[6:]} keys"):
                    triton_dsa_topk(torch.empty(T, H, D, dtype=dt, **meta), torch.empty(T, H, **meta), index_cache, m, K,
                                    D**-0.5, MAX_LEN)
                with rec.labelled(f"{name} sparse MLA ({N} heads, top-{K}), {label}, {str(cache_dt)[6:]} cache"):
                    triton_sparse_mla_attention(torch.empty(T, N, C, dtype=dt, **meta), torch.empty(T, N, P, dtype=dt, **meta),
                                                cache, m, i32(T, K), 0.1, num_splits=splits)
                if name == "glm-5" and cache_dt == dt:  # GLM-5.3-Flash: [key | gate] rows, pools of 16
                    with rec.labelled(f"glm-5.3-flash pooled indexer scores + top-{K} (pools of 16), {label}"):
                        triton_dsa_pool_topk(torch.empty(T, H, D, dtype=dt, **meta), torch.empty(T, H, **meta),
                                             torch.empty(1000, L, 2 * D, dtype=dt, **meta),
                                             torch.empty(16, D, dtype=dt, **meta), m, K, D**-0.5, MAX_LEN)
                if name == "hy4-preview":  # its sink logits (MLAConfig.sinks), dense MLA's too
                    sinks = torch.empty(N, **meta)
                    with rec.labelled(f"{name} sparse MLA with sinks ({N} heads, top-{K}), {label}, "
                                      f"{str(cache_dt)[6:]} cache"):
                        triton_sparse_mla_attention(torch.empty(T, N, C, dtype=dt, **meta),
                                                    torch.empty(T, N, P, dtype=dt, **meta), cache, m, i32(T, K), 0.1,
                                                    sinks_N=sinks, num_splits=splits)
                    with rec.labelled(f"{name} MLA with sinks ({N} heads), {label}, {str(cache_dt)[6:]} cache"):
                        triton_mla_attention(torch.empty(T, N, C, dtype=dt, **meta),
                                             torch.empty(T, N, P, dtype=dt, **meta), cache, m, 0.1,
                                             *((0.5,) if cache_dt == torch.float8_e4m3fn else ()), sinks_N=sinks,
                                             num_splits=8 if splits == 4 else splits)


if __name__ == "__main__":  # registers / spills of each kernel, without the report
    import os

    os.environ.pop("TRITON_INTERPRET", None)
    r = Recorder()
    r.install(90)
    compile_dsa(r, quick=False)
    for x in r.records:
        k = x["kernel"]
        print(f"{x['case']}: {k.metadata.name} warps={k.metadata.num_warps} stages={k.metadata.num_stages} "
              f"shared={k.metadata.shared} regs={getattr(k, 'n_regs', '?')} spills={getattr(k, 'n_spills', '?')}")
