"""DeepSeek-V4's decode attention (issue 45): one layer of each compressed kind at V4-Flash's shapes (64 heads, one
shared 512-wide head that is key and value, a window of 128; CSA: an entry per 4 tokens, an indexer of 64 heads of
128 choosing the top-512; HCA: an entry per 128 tokens read densely), bytes read and time per decode step at 32k /
128k context, beside the same attention over every raw token (what the compression saves) and DeepSeek-V3's MLA
bytes (576 values per token).

    python -m moelink.benchmarks.compressed_attention_decode --cpu-proxy [--contexts 32768,131072] [--batch 1] [--json PATH]
    python -m moelink.benchmarks.compressed_attention_decode --cpu-smoke        # tiny shapes: the script itself

Per (context, batch), over the same random query:
- full: the sink attention over all `ctx` raw keys (a V4 layer without its compressor);
- csa: the indexer's scores over the ctx / 4 index keys and its top-512, then the sink attention over the window and
  the selected entries;
- hca: the sink attention over the window and all ctx / 128 entries.
The ops are the kernel strategy's `compressed_indexer_topk` / `sink_attention` (the CPU proxy: the float32
references of kernels/compressed_attention.py, wall clock).

    python -m moelink.benchmarks.compressed_attention_decode --gpu [--contexts 32768,131072] [--batches 1,32] [--json PATH]

On a GPU (`--gpu`): the Triton kernels in bf16, each layer kind's decode step as the engine's batched decode path runs
it (engine/models/deepseek_v4/decode.py: the paged ops, `paged_compressed_indexer_topk` / `paged_sink_attention`,
reading index keys and entries through the block tables and the window from the state slots), and beside it the path it
replaced (`*_gather`: entries and index keys gathered per row into [T, E, X] tensors, then the per-query-key ops), eager
and as CUDA-graph replays, beside DeepSeek-V3's MLA decode (`mla_attention`, 128 heads, latent 512 + rope 64) over the
same context: time per step (CUDA events, L2 flushed), the paged / gather ratios, and bytes. The projections (q, the
index queries, the output) are the layer's GEMMs, not attention, and are left out. Bytes are counted, not measured: what
each path must read per step (keys of 512 values, index keys of 128, in bf16; `csa`, `hca`: what the paged kernels read,
the CSA scores' float32 workspace aside, 8 bytes an entry written and read), and what the gather path moved
(`gathered_*`: module `gathered_bytes`).
Results: JSON with the run's device, date and commit (bench_timing.run_meta); a table on stdout.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .bench_timing import Timer, run_meta

SHAPES = dict(N=64, H=512, W=128, n_I=64, I=128, K=512, csa=4, hca=128)
SMOKE = dict(N=4, H=32, W=8, n_I=4, I=16, K=8, csa=4, hca=16)
MLA_VALUES = 576  # DeepSeek-V3: latent 512 + rope 64 per token


def bytes_read(ctx: int, batch: int, s: dict, elem: int = 2) -> dict:
    """Bytes one decode step of one layer reads, per path (module docstring)."""
    csa_e, hca_e = ctx // s["csa"], ctx // s["hca"]
    win = min(ctx, s["W"])
    return dict(full=batch * ctx * s["H"] * elem,
                csa=batch * ((win + min(csa_e, s["K"])) * s["H"] + csa_e * s["I"]) * elem,
                hca=batch * (win + hca_e) * s["H"] * elem,
                mla=batch * ctx * MLA_VALUES * elem)


def gathered_bytes(ctx: int, batch: int, s: dict, elem: int = 2) -> dict:
    """Bytes the replaced gather path moved per step (read + written), at max_model_len = ctx. CSA: the index keys
    gathered (read, write), masked by torch.where (read, write), read by the indexer: 5 E I; the window rows and the
    picked entries gathered (read, write), concatenated (read, write), masked (read, write), read by the attention:
    7 (W + K) H. HCA: 7 (W + E) H."""
    csa_e, hca_e = ctx // s["csa"], ctx // s["hca"]
    win = min(ctx, s["W"])
    return dict(csa=batch * (5 * csa_e * s["I"] + 7 * (win + min(csa_e, s["K"])) * s["H"]) * elem,
                hca=batch * 7 * (win + hca_e) * s["H"] * elem)


def one_point(kernels, device, ctx: int, batch: int, s: dict, timer: Timer, iters: int) -> dict:
    from moelink.kernels.compressed_attention import reference_indexer_topk, reference_sink_attention

    attend = getattr(kernels, "sink_attention", reference_sink_attention)
    select = getattr(kernels, "compressed_indexer_topk", reference_indexer_topk)
    g = torch.Generator(device="cpu").manual_seed(ctx)
    f32 = dict(dtype=torch.float32)

    def rand(*shape):
        return torch.randn(*shape, generator=g, **f32).to(device)

    N, H, W = s["N"], s["H"], s["W"]
    csa_e, hca_e, win = ctx // s["csa"], ctx // s["hca"], min(ctx, s["W"])
    q_NH, sinks_N, scale = rand(1, N, H), rand(N), H**-0.5
    raw_SH, csa_EH, hca_EH = rand(ctx, H), rand(csa_e, H), rand(hca_e, H)
    iq_nI, iw_n, ikeys_EI = rand(1, s["n_I"], s["I"]), rand(1, s["n_I"]), rand(csa_e, s["I"])
    visible = torch.tensor([csa_e], device=device)

    def full():
        for _ in range(batch):
            attend(q_NH, raw_SH, torch.ones(1, ctx, dtype=torch.bool, device=device), sinks_N, scale)

    def csa():
        for _ in range(batch):
            picks = select(iq_nI, iw_n, ikeys_EI, visible, s["K"]).long()[0]
            keys = torch.cat([raw_SH[ctx - win:], csa_EH[picks[picks >= 0]]])
            attend(q_NH, keys, torch.ones(1, keys.shape[0], dtype=torch.bool, device=device), sinks_N, scale)

    def hca():
        for _ in range(batch):
            keys = torch.cat([raw_SH[ctx - win:], hca_EH])
            attend(q_NH, keys, torch.ones(1, keys.shape[0], dtype=torch.bool, device=device), sinks_N, scale)

    t = {name: timer(fn, [()], iters=iters, warmup=1) for name, fn in (("full", full), ("csa", csa), ("hca", hca))}
    b = bytes_read(ctx, batch, s)
    return dict(ctx=ctx, batch=batch, full_s=t["full"], csa_s=t["csa"], hca_s=t["hca"], bytes=b,
                csa_time_ratio=t["csa"] / t["full"], hca_time_ratio=t["hca"] / t["full"],
                csa_bytes_vs_mla=b["csa"] / b["mla"], hca_bytes_vs_mla=b["hca"] / b["mla"])


def gpu_point(kernels, device, ctx: int, batch: int, s: dict, timer: Timer, iters: int) -> dict:
    """One (context, batch) on the GPU: V4's CSA and HCA decode attention (the paged ops
    engine/models/deepseek_v4/decode.py runs, and the gather path they replaced) and V3's MLA decode, eager and replayed
    (module docstring)."""
    from .dsa_decode import _meta

    bf = dict(dtype=torch.bfloat16, device=device)
    g = torch.Generator(device=device).manual_seed(ctx + batch)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(torch.bfloat16)

    N, H, W, K, nI, I = s["N"], s["H"], s["W"], s["K"], s["n_I"], s["I"]
    q_TNH, sinks_N, scale = rand(batch, N, H), torch.randn(N, device=device), H**-0.5
    window_PWH = rand(batch + 1, W, H)  # a ring per sequence and the null slot
    slot_T = torch.arange(batch, device=device)
    pos_T = torch.full((batch,), ctx - 1, device=device)
    window_TWH = window_PWH[:batch]
    seen_W = torch.ones(batch, W, dtype=torch.bool, device=device)
    csa_e, hca_e = ctx // s["csa"], ctx // s["hca"]
    # Paged entries, one block table row per sequence (block 256 tokens: 64 CSA entries, 2 HCA entries a block).
    L = 256
    blocks = batch * -(-ctx // L)
    table_TM = torch.arange(blocks, device=device).view(batch, -1)
    csa_BLcH, idx_BLcI, hca_BLcH = rand(blocks, L // s["csa"], H), rand(blocks, L // s["csa"], I), rand(
        blocks, L // s["hca"], H)
    iq_TnI, iw_Tn = rand(batch, nI, I), rand(batch, nI)
    vis_csa, vis_hca = torch.full((batch,), csa_e, device=device), torch.full((batch,), hca_e, device=device)

    def gather(entries_BLcX, e_TE):
        Lc = entries_BLcX.shape[1]
        return entries_BLcX[table_TM.gather(1, e_TE // Lc), e_TE % Lc]

    e_csa = torch.arange(csa_e, device=device)[None, :].expand(batch, -1)
    e_hca = torch.arange(hca_e, device=device)[None, :].expand(batch, -1)

    def csa():
        picks = kernels.paged_compressed_indexer_topk(iq_TnI, iw_Tn, idx_BLcI, table_TM, vis_csa, K)
        return kernels.paged_sink_attention(q_TNH, window_PWH, slot_T, pos_T, csa_BLcH, table_TM, picks, vis_csa,
                                            sinks_N, scale)

    def hca():
        return kernels.paged_sink_attention(q_TNH, window_PWH, slot_T, pos_T, hca_BLcH, table_TM, None, vis_hca,
                                            sinks_N, scale)

    def csa_gather():
        picks = kernels.compressed_indexer_topk(iq_TnI, iw_Tn, gather(idx_BLcI, e_csa), vis_csa, K).long()
        keys = torch.cat([window_TWH, gather(csa_BLcH, picks.clamp(min=0))], dim=1)
        return kernels.sink_attention(q_TNH, keys, torch.cat([seen_W, picks >= 0], dim=1), sinks_N, scale)

    def hca_gather():
        keys = torch.cat([window_TWH, gather(hca_BLcH, e_hca)], dim=1)
        seen = torch.ones(batch, keys.shape[1], dtype=torch.bool, device=device)
        return kernels.sink_attention(q_TNH, keys, seen, sinks_N, scale)

    meta, mla_blocks = _meta(batch, ctx, device)
    latent = rand(mla_blocks, 16, 576)
    q_lat, q_pe = rand(batch, 128, 512), rand(batch, 128, 64)

    def mla():
        return kernels.mla_attention(q_lat, q_pe, latent, meta, 0.1)

    out = dict(ctx=ctx, batch=batch, bytes=dict(bytes_read(ctx, batch, s), **{
        f"gathered_{k}": v for k, v in gathered_bytes(ctx, batch, s).items()}))
    for name, fn in (("csa", csa), ("hca", hca), ("csa_gather", csa_gather), ("hca_gather", hca_gather),
                     ("mla", mla)):
        out[f"{name}_s"] = timer(fn, [()], iters=iters)
        out[f"{name}_graph_s"] = timer.graph(fn, [()], iters=iters)
    for kind in ("csa", "hca"):  # the paged path's time over the gather path's, measured side by side
        for g in ("", "_graph"):
            a, b = out[f"{kind}{g}_s"], out[f"{kind}_gather{g}_s"]
            out[f"{kind}{g}_paged_over_gather"] = a / b if a is not None and b else None
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--cpu-proxy", action="store_true", help="the float32 references on CPU, wall clock")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: checks the script")
    ap.add_argument("--gpu", action="store_true", help="the Triton kernels on CUDA, bf16, beside V3's MLA")
    ap.add_argument("--batches", default="1,32", help="with --gpu")
    ap.add_argument("--time-budget-s", type=float, default=None,
                    help="with --gpu: start no point once this many seconds have passed (the GPU session's budget)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if sum((args.cpu_proxy, args.cpu_smoke, args.gpu)) != 1:
        raise SystemExit("compressed_attention_decode: choose one of --cpu-proxy, --cpu-smoke, --gpu.")
    from moelink.kernels.ops import select_kernels

    if args.gpu:
        return _main_gpu(args)

    device = torch.device("cpu")
    s, contexts, iters = ((SMOKE, [64, 256], 1) if args.cpu_smoke
                          else (SHAPES, [int(x) for x in args.contexts.split(",")], args.iters))
    kernels = select_kernels(device)
    rep = dict(run_meta(device), kernels=kernels.name, shapes=s, proxy="cpu float32 references (wall clock)",
               points=[])
    print(f"{'ctx':>7} {'batch':>5} {'full ms':>9} {'csa ms':>9} {'hca ms':>9} {'csa/full':>8} {'hca/full':>8} "
          f"{'csa B/mla B':>11} {'hca B/mla B':>11}")
    for ctx in contexts:
        pt = one_point(kernels, device, ctx, args.batch, s, Timer(device), iters)
        rep["points"].append(pt)
        print(f"{ctx:>7} {args.batch:>5} {pt['full_s'] * 1e3:>9.2f} {pt['csa_s'] * 1e3:>9.2f} {pt['hca_s'] * 1e3:>9.2f} "
              f"{pt['csa_time_ratio']:>8.3f} {pt['hca_time_ratio']:>8.3f} {pt['csa_bytes_vs_mla']:>11.4f} "
              f"{pt['hca_bytes_vs_mla']:>11.4f}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rep, indent=1) + "\n")
    return rep


def _main_gpu(args) -> dict:
    from moelink.kernels.ops import select_kernels

    if not torch.cuda.is_available():
        raise SystemExit("compressed_attention_decode --gpu: no CUDA device (use --cpu-proxy).")
    device = torch.device("cuda", torch.cuda.current_device())
    kernels = select_kernels(device, "triton")
    rep = dict(run_meta(device), kernels=kernels.name, shapes=SHAPES, dtype="bfloat16", points=[])
    timer = Timer(device)
    t0 = time.perf_counter()
    print(f"{'ctx':>7} {'batch':>5} {'csa ms':>8} {'graph':>8} {'hca ms':>8} {'graph':>8} {'mla ms':>8} {'graph':>8} "
          f"{'csa/gath':>8} {'hca/gath':>8} (graph replays: paged over gather)")
    for ctx in [int(x) for x in args.contexts.split(",")]:
        for batch in [int(x) for x in args.batches.split(",")]:
            if args.time_budget_s is not None and time.perf_counter() - t0 > args.time_budget_s:
                print(f"  (time budget spent: ctx {ctx} batch {batch} not started)", flush=True)
                rep.setdefault("skipped", []).append(dict(ctx=ctx, batch=batch))
                continue
            pt = gpu_point(kernels, device, ctx, batch, SHAPES, timer, max(args.iters, 20))
            rep["points"].append(pt)
            print(f"{ctx:>7} {batch:>5} " + " ".join(_ms(pt[k]) for k in (
                "csa_s", "csa_graph_s", "hca_s", "hca_graph_s", "mla_s", "mla_graph_s")) + " " + " ".join(
                f"{pt[k]:>8.3f}" if pt[k] is not None else f"{'-':>8}"
                for k in ("csa_graph_paged_over_gather", "hca_graph_paged_over_gather")), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(rep, indent=1) + "\n")
    return rep


def _ms(seconds) -> str:
    return f"{seconds * 1e3:>8.3f}" if seconds is not None else f"{'-':>8}"


if __name__ == "__main__":
    main()
