"""Compile cases of the compressed-KV attention kernels, DeepSeek-V4's (benchmarks/compile_report.py's `compressed`
family): the compressor's pooling, the lightning indexer's scores over compressed entries + its top-k (DSA's
selection kernels), the sink attention over the window and the entries, and the grouped output projection
(kernels/triton_compressed_attention.py, triton_compressed_topk.py, triton_compressed_attention_paged.py), at
V4-Flash's shapes (64 heads of 512, one shared KV head, window 128;
CSA rate 4 with 64 index heads of 128 and top-512, HCA rate 128; 8 output groups to 1024) and V4-Pro's (128 heads,
16 groups, top-1024), bf16: decode batches as engine/models/deepseek_v4/decode.py runs them, reading the cache in place
(CSA at 128k context: 32768 index keys per row through a block table of 256-token blocks, the top-k on its split
path at batch 4; the sink attention over the 128 ring rows and the top-k picks (CSA) or all 1024 entries (HCA),
split-K at batch 4), a 97-token prefill chunk (shared keys: the indexer and the sink attention), and the compressor
at both rates; the hyper-connection residual (4 streams)."""
from __future__ import annotations

import torch

from .compile_cases import Recorder

CTX = 131072
# (name, heads, o_groups, index top-k, hidden)
MODELS = [("deepseek-v4-flash", 64, 8, 512, 4096), ("deepseek-v4-pro", 128, 16, 1024, 7168)]
HC = 4  # hc_mult
H, W, NI, I, O, CSA, HCA = 512, 128, 64, 128, 1024, 4, 128


def compile_compressed_attention(rec: Recorder, quick: bool) -> None:
    from moelink.kernels.triton_compressed_attention import (triton_compress_kv, triton_grouped_linear,
                                                             triton_sink_attention)
    from moelink.kernels.triton_hyper_connection import triton_hc_expand
    from moelink.kernels.triton_compressed_topk import triton_compressed_indexer_topk
    from moelink.kernels import triton_compressed_attention_paged as paged
    from moelink.kernels.triton_compressed_attention_paged import (triton_paged_compressed_indexer_topk,
                                                                   triton_paged_sink_attention)

    meta = dict(device="meta")
    bf = dict(dtype=torch.bfloat16, **meta)
    f32 = dict(dtype=torch.float32, **meta)
    i32 = dict(dtype=torch.int32, **meta)
    L = 256  # tokens a block: 64 CSA entries, 2 HCA entries
    paged.num_sms = lambda d: 132  # the H100's SMs: the splits (and the merge's launch) as there
    for name, N, G, K, D in MODELS[:1] if quick else MODELS:
        for label, T in (("decode batch 64", 64), ("decode batch 4", 4)) if not quick else (("decode batch 64", 64),):
            E, M = CTX // CSA, CTX // L
            with rec.labelled(f"{name} paged indexer scores + top-{K} over {E} entries, {label}"):
                triton_paged_compressed_indexer_topk(torch.empty(T, NI, I, **bf), torch.empty(T, NI, **bf),
                                                     torch.empty(T * M + 1, L // CSA, I, **bf),
                                                     torch.empty(T, M, **i32), torch.empty(T, dtype=torch.long, **meta),
                                                     K)
            for kind, m, picks in (("CSA", CSA, torch.empty(T, K, **i32)), ("HCA", HCA, None)):
                S = W + (K if picks is not None else CTX // HCA)
                with rec.labelled(f"{name} paged sink attention ({N} heads), {kind} ring + entries ({S} keys), "
                                  f"{label}"):
                    i = torch.empty(T, dtype=torch.long, **meta)
                    triton_paged_sink_attention(torch.empty(T, N, H, **bf), torch.empty(T + 1, W, H, **bf), i, i,
                                                torch.empty(T * M + 1, L // m, H, **bf),
                                                torch.empty(T, M, **i32), picks, i, torch.empty(N, **f32),
                                                H**-0.5)
            with rec.labelled(f"{name} grouped output projection ({G} groups to {O}), {label}"):
                triton_grouped_linear(torch.empty(T, G, N * H // G, **bf), torch.empty(G, O, N * H // G, **bf))
            with rec.labelled(f"{name} hyper-connection residual ({HC} streams of {D}), {label}"):
                triton_hc_expand(torch.empty(T, HC, D, **bf), torch.empty(T, D, **bf), torch.empty(T, HC, **f32),
                                 torch.empty(T, HC, HC, **f32))
        if quick:
            continue
        T = 97
        with rec.labelled(f"{name} indexer scores + top-{K}, a 97-token chunk over 4096 tokens (shared keys)"):
            triton_compressed_indexer_topk(torch.empty(T, NI, I, **bf), torch.empty(T, NI, **bf),
                                           torch.empty(4096 // CSA, I, **bf), torch.empty(T, dtype=torch.long, **meta),
                                           K)
        with rec.labelled(f"{name} sink attention, a 97-token chunk over 4096 tokens (shared keys)"):
            S = W + 97 + 4096 // CSA
            triton_sink_attention(torch.empty(T, N, H, **bf), torch.empty(S, H, **bf),
                                  torch.empty(T, S, dtype=torch.bool, **meta), torch.empty(N, **f32), H**-0.5)
        with rec.labelled(f"{name} grouped output projection, a 97-token chunk"):
            triton_grouped_linear(torch.empty(T, G, N * H // G, **bf), torch.empty(G, O, N * H // G, **bf))
    for kind, m, overlap in (("CSA", CSA, True), ("HCA", HCA, False)):
        for width, what in ((H, "entries"), (I, "index keys")) if overlap else ((H, "entries"),):
            C = 2 * width if overlap else width
            with rec.labelled(f"compressor ({kind}, rate {m}, {what}), 24 windows"):
                triton_compress_kv(torch.empty(24, m, C, **bf), torch.empty(24, m, C, **f32),
                                   torch.empty(24, m, width, **bf) if overlap else None,
                                   torch.empty(24, m, width, **f32) if overlap else None)


if __name__ == "__main__":  # registers / spills of each kernel, without the report
    import os

    os.environ.pop("TRITON_INTERPRET", None)
    r = Recorder()
    r.install(90)
    compile_compressed_attention(r, quick=False)
    for x in r.records:
        k = x["kernel"]
        print(f"{x['case']}: {k.metadata.name} warps={k.metadata.num_warps} stages={k.metadata.num_stages} "
              f"shared={k.metadata.shared} regs={getattr(k, 'n_regs', '?')} spills={getattr(k, 'n_spills', '?')}")
