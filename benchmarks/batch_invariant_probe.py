"""Which ops give row 0 the same bits whatever the batch, on this device, off and in batch-invariant mode.

    python -m moelink.benchmarks.batch_invariant_probe [--device cuda] [--out PATH]

(`python -m moelink.benchmarks.batch_invariant` runs it first and saves it beside its arms.) For each op of a
model's step (a linear, the batched products of the attention walk and of the delta rule's recurrence, the
reductions, the transcendentals, the RMSNorm, the attention kernel over a paged cache, the experts), row (or
matrix, or sequence) 0 is computed alone and then among 2 .. 2,048 others drawn at random, each time with fresh
inputs for the others; an op is invariant when every batch gives row 0 the same bits as alone. Each op runs off the
mode (the library's own choice of kernel by shape: on a GPU these are what moves a request's logprobs with the
batch) and in it (kernels/batch_invariant.py: its tiles, and the backend's own kernels; on a GPU the Triton
backend's mode and kernels too, kernels/batch_invariant_triton.py, beside the normal Triton paths). The table says where the
mode's rules hold on this device, and where one does not, which op to look at: an engine that is not invariant on a
device shows here which of its ops is not.
"""
from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from moelink.engine.api.provenance import git_commit, write_result

RESULTS = Path(__file__).parent / "results"
BATCHES = (2, 5, 17, 64, 300, 2048)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a, b))


def _probe(run: Callable[[int, torch.Generator], torch.Tensor], batches=BATCHES) -> bool:
    """run(n, gen) -> row 0's result among n rows, whose other rows come from gen: row 0 alone and in each batch."""
    alone = run(1, torch.Generator().manual_seed(0))
    return all(_same(alone, run(n, torch.Generator().manual_seed(n))) for n in batches)


def _rows(n: int, gen: torch.Generator, row0: torch.Tensor) -> torch.Tensor:
    """[n, *row0.shape]: row0 first, random rows after it."""
    rest = torch.randn(n - 1, *row0.shape, generator=gen, dtype=torch.float32).to(row0.dtype)
    return torch.cat([row0[None].cpu(), rest]).to(row0.device)


def cases(device: torch.device) -> dict[str, Callable[[int, torch.Generator], torch.Tensor]]:
    """name -> run(n, gen): row 0's output among n rows (row 0's own inputs fixed by seed 1)."""
    from moelink.kernels.attention import AttentionMetadata
    from moelink.kernels.batch_invariant_kernels import invariant_fused_moe, invariant_paged_attention
    from moelink.kernels.moe import reference_fused_moe
    from moelink.kernels.norm import reference_rms_norm

    g = torch.Generator().manual_seed(1)

    def fixed(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    w_bf16, w_f32 = fixed(512, 256, dtype=torch.bfloat16), fixed(512, 256)
    x_bf16, x_f32 = fixed(256, dtype=torch.bfloat16), fixed(256)
    q_RH, k_HB = fixed(2, 64), fixed(64, 16)
    h_NKV, k_N1K = fixed(4, 32, 32), fixed(4, 1, 32)
    logits = fixed(4096)
    router = fixed(64)
    norm_w = fixed(256, dtype=torch.bfloat16)
    E, D, I, top_k = 8, 64, 32, 2
    w13, w2 = fixed(E, 2 * I, D) * 0.1, fixed(E, D, I) * 0.1
    x_moe = fixed(D)
    moe_ids0 = torch.tensor([1, 5], device=device)

    def moe(fn):
        def run(n, gen):
            x = _rows(n, gen, x_moe)
            ids = torch.stack([torch.randperm(E, generator=gen)[:top_k] for _ in range(n)]).to(device)
            ids[0] = moe_ids0
            w = torch.full((n, top_k), 0.5, device=device)
            return fn(x, w13, w2, w, ids)[0]
        return run

    # Attention: sequence 0 (a 40-token context, one decode row) alone and beside n - 1 others of random lengths.
    H, K, N, bs = 64, 2, 4, 16
    ctx0 = 40
    k0, v0, q0 = fixed(ctx0, K, H, dtype=torch.bfloat16), fixed(ctx0, K, H, dtype=torch.bfloat16), \
        fixed(N, H, dtype=torch.bfloat16)

    def attention(n, gen, fn=invariant_paged_attention):
        lens = [ctx0] + torch.randint(1, 200, (n - 1,), generator=gen).tolist()
        nblocks = [-(-c // bs) for c in lens]
        total = sum(nblocks)
        k_cache = torch.zeros(total + 1, bs, K, H, dtype=torch.bfloat16, device=device)
        v_cache = torch.zeros_like(k_cache)
        tables, start = [], 0
        for s, (c, nb) in enumerate(zip(lens, nblocks)):
            blocks = list(range(start, start + nb))
            start += nb
            tables.append(blocks)
            k = k0 if s == 0 else torch.randn(c, K, H, generator=gen).to(torch.bfloat16).to(device)
            v = v0 if s == 0 else torch.randn(c, K, H, generator=gen).to(torch.bfloat16).to(device)
            slots = torch.tensor([blocks[p // bs] * bs + p % bs for p in range(c)], device=device)
            k_cache.view(-1, K, H)[slots] = k
            v_cache.view(-1, K, H)[slots] = v
        width = max(len(t) for t in tables)
        tables_SM = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)
        meta = AttentionMetadata(torch.arange(n + 1, dtype=torch.int32, device=device),
                                 torch.tensor(lens, dtype=torch.int32, device=device), tables_SM,
                                 torch.zeros(n, dtype=torch.long, device=device), [1] * n, lens, 1, max(lens),
                                 null_block=total)
        q = _rows(n, gen, q0)
        return fn(q, k_cache, v_cache, meta, H ** -0.5)[0]

    return {
        "linear bf16": lambda n, gen: F.linear(_rows(n, gen, x_bf16), w_bf16)[0],
        "linear fp32": lambda n, gen: F.linear(_rows(n, gen, x_f32), w_f32)[0],
        "bmm fp32 [n*2, 2, 64] @ [n*2, 64, 16]": lambda n, gen: torch.bmm(
            _rows(2 * n, gen, q_RH), _rows(2 * n, gen, k_HB))[0],
        "matmul fp32 [n, 4, 1, 32] @ [n, 4, 32, 32]": lambda n, gen: torch.matmul(
            _rows(n, gen, k_N1K), _rows(n, gen, h_NKV))[0],
        "log_softmax fp32 [n, 4096]": lambda n, gen: torch.log_softmax(_rows(n, gen, logits), -1)[0],
        "sum fp32 [n, 4096]": lambda n, gen: _rows(n, gen, logits).sum(-1)[0],
        "amax fp32 [n, 4096]": lambda n, gen: _rows(n, gen, logits).amax(-1)[0],
        "topk [n, 64] k 8": lambda n, gen: torch.topk(_rows(n, gen, router), 8, sorted=False).values[0],
        "sigmoid fp32 [n, 64]": lambda n, gen: torch.sigmoid(_rows(n, gen, router))[0],
        "rms_norm bf16 [n, 256]": lambda n, gen: reference_rms_norm(_rows(n, gen, x_bf16), norm_w, 1e-6)[0],
        "paged attention bf16 (one decode row per sequence)": attention,
        "experts fp32 (reference off, per-expert in the mode)": moe(reference_fused_moe),
        "experts fp32 per-expert path": moe(invariant_fused_moe),
        **(_triton_cases(device, attention, moe, _rows, x_bf16, w_bf16, x_f32, w_f32, norm_w)
           if device.type == "cuda" else {}),
    }


def _triton_cases(device, attention, moe, rows, x_bf16, w_bf16, x_f32, w_f32, norm_w):
    """The GPU's batch-invariant Triton kernels (kernels/batch_invariant_triton.py), beside the normal Triton paths
    they replace (the tuned MoE configs keyed by the token count, the planned attention splits)."""
    from moelink.kernels.batch_invariant_triton import invariant_triton_fused_moe
    from moelink.kernels.triton_attention import triton_paged_attention
    from moelink.kernels.triton_invariant_attention import triton_invariant_paged_attention
    from moelink.kernels.triton_invariant_matmul import triton_invariant_linear
    from moelink.kernels.triton_moe import triton_fused_moe
    from moelink.kernels.triton_norm import triton_rms_norm

    return {
        "triton invariant linear bf16": lambda n, gen: triton_invariant_linear(rows(n, gen, x_bf16), w_bf16)[0],
        "triton invariant linear fp32": lambda n, gen: triton_invariant_linear(rows(n, gen, x_f32), w_f32)[0],
        "triton rms_norm bf16 [n, 256]": lambda n, gen: triton_rms_norm(rows(n, gen, x_bf16), norm_w, 1e-6)[0],
        "triton paged attention bf16 (normal: planned splits)": lambda n, gen: attention(n, gen, triton_paged_attention),
        "triton invariant paged attention bf16": lambda n, gen: attention(n, gen, triton_invariant_paged_attention),
        "triton experts fp32 (normal: tuned config by tokens)": moe(triton_fused_moe),
        "triton invariant experts fp32 (one config)": moe(invariant_triton_fused_moe),
    }


def probe(device: torch.device) -> list[dict]:
    from moelink.kernels.ops import backend_class

    # The mode as the engine enters it on this device: on a GPU the Triton backend's (linears on its matmul).
    mode = getattr(backend_class(device, "batch_invariant"), "step_context")
    rows = []
    for name, run in cases(device).items():
        row = dict(op=name)
        for arm, ctx in (("off", contextlib.nullcontext), ("mode", mode)):
            try:
                with ctx():
                    row[arm] = _probe(run)
            except Exception as e:  # an op the mode refuses, or a device error: say which
                row[arm] = f"error: {type(e).__name__}: {e}"[:200]
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'op (row 0 alone == among 2..2048 rows, bitwise)':<56} {'off':>6} {'mode':>6}")
    for r in rows:
        print(f"{r['op']:<56} {str(r['off']):>6.6} {str(r['mode']):>6.6}")
    bad = [r["op"] for r in rows if r["mode"] is not True]
    print("batch-invariant mode holds for every op here" if not bad else f"NOT invariant in the mode: {bad}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/batch_invariant_probe_<device>.json)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rows = probe(device)
    print_table(rows)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = dict(benchmark="batch_invariant_probe", device=label, commit=git_commit(),
                  date=time.strftime("%Y-%m-%d"), batches=list(BATCHES), ops=rows)
    out = write_result(args.out or RESULTS / f"batch_invariant_probe_{label.replace(' ', '_')}.json", result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
