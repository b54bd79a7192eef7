"""DeepSeek Sparse Attention beside dense MLA: one layer's decode attention at DeepSeek-V3.2's shapes (128 heads, latent
512 + rope 64; indexer 64 heads of 128, top-2048), bytes read and time per decode step at 8k / 32k / 128k context.

    python -m moelink.benchmarks.dsa_decode [--contexts 8192,32768,131072] [--batches 1,32] [--cache bf16,fp8]
        [--json PATH] [--time-budget-s S]                      # GPU: the Triton kernels, CUDA events (+ graphs)
    python -m moelink.benchmarks.dsa_decode --cpu-proxy ...    # CPU: the reference kernels, wall clock
    python -m moelink.benchmarks.dsa_decode --cpu-smoke        # tiny shapes: the script itself

Per (context, batch, cache dtype), both paths over the same caches:
- dense: `mla_attention` over every cached latent (what DeepSeek-V3 runs);
- DSA: `dsa_topk` (the indexer's scores over every cached key, then the top-2048 per query) and
  `sparse_mla_attention` over the selected latents; the index queries and weights come in (their projections are
  the layer's GEMMs, not attention).
The selection's top-k two ways, side by side: one program per row (`num_splits=1`) and the split path that
`triton_dsa_select.split_programs` picks (P programs per row over spans, then a merge; P printed, 1 where the
split does not pay); the DSA time uses the picked path. The CPU proxy has one path (the reference's sort).
Bytes are counted, not measured: what each path must read from HBM per step (the latent rows: (512 + 64) values per
token; the indexer keys: 128 bf16 values per token, or under `--cache fp8` 132 bytes (the e4m3 key and its float32
scale, DeepSeek-V3.2's layout); the selection's score row, float32, written once and read back by the top-k's 4
passes, from L2 for a row of up to a few MB, listed apart). Dense reads ctx rows; DSA min(ctx, 2048) rows plus ctx
keys, so the latent read follows top-k / context and the indexer's adds 256 / 1152 (bf16) or 132 / 576 (fp8) of the
dense read.
The decode step is scored as a decode graph scores it: `max_len` = 163840 (DeepSeek-V3.2's max_position_embeddings)
wide, the programs past a query's context returning at once.
Results: JSON with the run's device, date and commit (bench_timing.run_meta); a table on stdout.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .bench_timing import Timer, run_meta

N, C, P, H, D, K = 128, 512, 64, 64, 128, 2048
MAX_LEN = 163840
BLOCK = 16


def _meta(batch: int, ctx: int, device):
    from moelink.kernels.attention import AttentionMetadata

    per_seq = -(-ctx // BLOCK)
    i32 = dict(dtype=torch.int32, device=device)
    tables = torch.arange(batch * per_seq, **i32).view(batch, per_seq)
    slots = (tables[:, (ctx - 1) // BLOCK].long() * BLOCK + (ctx - 1) % BLOCK)
    return AttentionMetadata(torch.arange(batch + 1, **i32), torch.full((batch,), ctx, **i32), tables, slots,
                             [1] * batch, [ctx] * batch, 1, ctx, batch * per_seq), batch * per_seq + 1


def bytes_read(ctx: int, batch: int, elem: int, shapes=(N, C, P, H, D, K), key_bytes: int | None = None) -> dict:
    """HBM bytes one decode step of one layer must read, per path (module docstring). `key_bytes`: one indexer key
    row's bytes (default d values of `elem` bytes)."""
    n, c, p, h, d, k = shapes
    key_bytes = d * elem if key_bytes is None else key_bytes
    sel = min(ctx, k)
    return dict(dense=batch * ctx * (c + p) * elem,
                dsa_latents=batch * sel * (c + p) * elem, dsa_index_keys=batch * ctx * key_bytes,
                dsa=batch * (sel * (c + p) * elem + ctx * key_bytes), dsa_scores_l2=batch * ctx * 4 * (1 + 4))


def topk_reads(ctx: int, k: int, programs: int) -> dict:
    """Score reads of the top-k per row, counted (kernels/triton_dsa_select.py): one program makes 4 passes over the
    row; split over P, each partial 4 over its span (1 copy pass when the row has n <= P * K) and the merge 4 over
    its candidates (n packed, or P * K). `critical`: the longest chain of reads one row waits on."""
    if ctx <= k:
        return dict(total=0, critical=0)
    if programs == 1:
        return dict(total=4 * ctx, critical=4 * ctx)
    span = -(-ctx // programs)
    packed = ctx <= programs * k
    part = span if packed else 4 * span
    merge = 4 * (ctx if packed else programs * k)
    return dict(total=(ctx if packed else 4 * ctx) + merge, critical=part + merge)


def _index_cache(blocks: int, d: int, cache_dtype, g: torch.Generator, device) -> torch.Tensor:
    """The indexer key cache as the engine lays it out: bf16 keys [blocks, BLOCK, d], or for an fp8 cache uint8 rows
    of e4m3 keys and their float32 scale per 128 values (kernels/dsa.py)."""
    from moelink.kernels.dsa import fp8_key_groups, fp8_key_row_bytes

    if cache_dtype != torch.float8_e4m3fn:
        return torch.randn(blocks, BLOCK, d, generator=g, device=device, dtype=torch.float32).to(cache_dtype)
    rows = blocks * BLOCK
    out = torch.empty(rows, fp8_key_row_bytes(d), dtype=torch.uint8, device=device)
    out[:, :d] = (torch.randn(rows, d, generator=g, device=device, dtype=torch.float32) * 100).to(cache_dtype).view(
        torch.uint8)
    off = out.shape[1] - 4 * fp8_key_groups(d)
    scales = torch.rand(rows, fp8_key_groups(d), generator=g, device=device, dtype=torch.float32) * 0.02 + 0.001
    out[:, off:] = scales.view(torch.uint8)
    if off > d:
        out[:, d:off] = 0
    return out.view(blocks, BLOCK, -1)


def one_point(kernels, device, dtype, cache_dtype, ctx: int, batch: int, timer: Timer, iters: int,
              shapes=(N, C, P, H, D, K), graphs: bool = True) -> dict:
    n, c, p, h, d, k = shapes
    meta, blocks = _meta(batch, ctx, device)
    g = torch.Generator(device=device).manual_seed(ctx + batch)
    latent = (torch.randn(blocks, BLOCK, c + p, generator=g, device=device, dtype=torch.float32) * 0.5).to(cache_dtype)
    index = _index_cache(blocks, d, cache_dtype, g, device)
    q_lat = torch.randn(batch, n, c, generator=g, device=device, dtype=torch.float32).to(dtype)
    q_pe = torch.randn(batch, n, p, generator=g, device=device, dtype=torch.float32).to(dtype)
    iq = torch.randn(batch, h, d, generator=g, device=device, dtype=torch.float32).to(dtype)
    w = torch.randn(batch, h, generator=g, device=device, dtype=torch.float32) * h**-0.5
    scale = (c // 4 + p) ** -0.5

    def dense():
        return kernels.mla_attention(q_lat, q_pe, latent, meta, scale)

    width = MAX_LEN if device.type == "cuda" else ctx
    # The split path exists in the Triton kernel only (the reference sorts each row).
    split_kw = (lambda splits: dict(num_splits=splits)) if device.type == "cuda" else None

    def select():
        return kernels.dsa_topk(iq, w, index, meta, k, d**-0.5, width)

    def select_one_program():
        return kernels.dsa_topk(iq, w, index, meta, k, d**-0.5, width, **split_kw(1))  # type: ignore[misc]  # CUDA only

    topk = select()
    if split_kw is not None:  # both top-k paths select the same positions
        one = select_one_program()
        assert torch.equal(topk.sort(dim=1).values, one.sort(dim=1).values), "split and one-program top-k differ"

    def sparse():
        return kernels.sparse_mla_attention(q_lat, q_pe, latent, meta, topk, scale)

    def dsa():
        return kernels.sparse_mla_attention(q_lat, q_pe, latent, meta, select(), scale)

    key_bytes = index.shape[2] * index.element_size()
    out = dict(context=ctx, batch=batch, cache=str(cache_dtype).removeprefix("torch."),
               bytes=bytes_read(ctx, batch, latent.element_size(), shapes, key_bytes), index_key_bytes=key_bytes,
               topk_programs_per_row=_programs(device, width, k, batch))
    out["topk_score_reads"] = dict(one_program=topk_reads(ctx, k, 1),
                                   split=topk_reads(ctx, k, out["topk_programs_per_row"]))
    paths = [("dense", dense), ("dsa", dsa), ("dsa_select", select), ("dsa_sparse_mla", sparse)]
    if split_kw is not None:
        paths.append(("dsa_select_one_program", select_one_program))
    for name, fn in paths:
        out[f"{name}_s"] = timer(fn, [()], iters=iters, warmup=1)
        if graphs and device.type == "cuda" and name in ("dense", "dsa"):
            out[f"{name}_graph_s"] = timer.graph(fn, [()], iters=iters)
    out.setdefault("dsa_select_one_program_s", None)
    out["time_ratio"] = out["dsa_s"] / out["dense_s"]
    out["bytes_ratio"] = out["bytes"]["dsa"] / out["bytes"]["dense"]
    out["latent_bytes_ratio"] = out["bytes"]["dsa_latents"] / out["bytes"]["dense"]
    return out


def _programs(device, width: int, k: int, batch: int) -> int:
    """The top-k's programs per row the Triton wrapper picks (1 on CPU: the reference)."""
    if device.type != "cuda":
        return 1
    from moelink.kernels.triton_dsa_select import split_programs

    return split_programs(width, k, batch, torch.cuda.get_device_properties(device).multi_processor_count)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="8192,32768,131072")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--cache", default="bf16,fp8", help="latent / key cache dtypes")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--cpu-proxy", action="store_true", help="the reference kernels on CPU (batch 1 by default)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: checks the script")
    ap.add_argument("--json", default=None)
    ap.add_argument("--time-budget-s", type=float, default=None, help="start no point after this many seconds")
    args = ap.parse_args(argv)
    from moelink.kernels.ops import select_kernels

    t_start = time.monotonic()
    shapes = (N, C, P, H, D, K)
    if args.cpu_smoke:
        device, contexts, batches, iters, shapes = torch.device("cpu"), [64, 200], [1, 2], 2, (4, 32, 16, 4, 16, 16)
    elif args.cpu_proxy:
        device, contexts, iters = torch.device("cpu"), [int(x) for x in args.contexts.split(",")], min(args.iters, 3)
        batches = [1] if args.batches == "1,32" else [int(x) for x in args.batches.split(",")]
    else:
        from .bench_timing import require_cuda

        device, contexts, batches, iters = (require_cuda("dsa_decode"), [int(x) for x in args.contexts.split(",")],
                                            [int(x) for x in args.batches.split(",")], args.iters)
    kernels = select_kernels(device)
    dtypes = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
    caches = [dtypes[x] for x in args.cache.split(",")]
    timer = Timer(device)
    rep = dict(run_meta(device), kernels=kernels.name, shapes=dict(zip("NCPHDK", shapes)), max_len=MAX_LEN,
               proxy="cpu reference kernels (wall clock)" if device.type == "cpu" else None, points=[])
    print(f"{'ctx':>7} {'batch':>5} {'cache':>13} {'dense ms':>9} {'dsa ms':>9} {'time':>6} {'bytes':>6} {'latent':>7} "
          f"{'top-k 1 prog ms':>15} {'top-k P progs ms':>16} {'P':>3}")
    for cache in caches:
        for batch in batches:
            for ctx in contexts:
                if args.time_budget_s and time.monotonic() - t_start > args.time_budget_s:
                    rep["stopped"] = "time budget"
                    break
                pt = one_point(kernels, device, torch.bfloat16, cache, ctx, batch, timer, iters, shapes)
                rep["points"].append(pt)
                print(f"{ctx:>7} {batch:>5} {pt['cache']:>13} {pt['dense_s'] * 1e3:>9.3f} {pt['dsa_s'] * 1e3:>9.3f} "
                      f"{pt['time_ratio']:>6.3f} {pt['bytes_ratio']:>6.3f} {pt['latent_bytes_ratio']:>7.4f} "
                      f"{_ms(pt['dsa_select_one_program_s']):>15} {_ms(pt['dsa_select_s']):>16} "
                      f"{pt['topk_programs_per_row']:>3}", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(rep, indent=1) + "\n")
    return rep



def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


if __name__ == "__main__":
    main()
