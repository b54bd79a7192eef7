"""Host time per engine step with the model's forward stubbed out: what the GPU would wait on.

    python -m moelink.benchmarks.host_overhead [--seqs 256] [--tokens 64] [--repeats 3]

On a GPU, a decode step of a small-active-parameter MoE (Qwen3-30B-A3B at batch
256: ~10 ms with CUDA graphs) can be as short as the engine's own Python work
per step (scheduling, building the batch's metadata, sampling, detokenizing,
outputs). This measures that host work alone: the tiny model's forward is
replaced by a function returning zeros of the right shape, so everything
else (scheduler, model runner input prep, LM head on the sampled rows,
sampler, output processor) runs as in serving. CPU only; one thread.

Compared side by side in one run: requests that want text (detokenize=True,
the native API and LLM.generate) and token ids only (detokenize=False, what
the VllmEngine protocol / smg gateway path sets when there are no stop strings).
Reported: median over repeats of ms per step in the decode phase, and the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from moelink.engine.provenance import git_commit, write_result

RESULTS = Path(__file__).parent / "results"


def build_llm(seqs: int, tokens: int, model_dir: str):
    from moelink.engine import LLM
    from moelink.engine.tiny_model import make_tiny_model

    path = make_tiny_model(model_dir, arch="qwen3_moe", num_layers=2, hidden_size=64, num_experts=8, top_k=2,
                           max_position_embeddings=4096)
    llm = LLM(str(path), dtype="float32", device="cpu", max_num_seqs=seqs, max_num_batched_tokens=max(8192, seqs),
              num_kv_blocks=seqs * (-(-(64 + tokens) // 16) + 1), block_size=16)
    model = llm.engine.executor.worker.runner.model
    hidden = model.cfg.hidden_size

    def no_forward(input_ids_T, positions_T, ctx):  # the GPU's part, not measured here
        return torch.zeros(input_ids_T.shape[0], hidden)

    model.forward = no_forward
    return llm


def decode_ms_per_step(llm, seqs: int, tokens: int, detokenize: bool) -> float:
    """Median host ms of the steps where every sequence decodes (prefill steps excluded)."""
    from moelink.engine import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, detokenize=detokenize)
    for i in range(seqs):
        llm.engine.add_request(f"h{detokenize}-{i}-{time.monotonic_ns()}", [5 + i % 50] * 64, params)
    times = []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t0
        if engine.stats().num_running == seqs:  # a full decode batch, not the prefill or the tail
            times.append(dt)
    return statistics.median(times) * 1e3


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=256, help="concurrent sequences (the decode batch)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per sequence")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs per setting (median of medians)")
    ap.add_argument("--out", default=str(RESULTS / "host_overhead_cpu.json"))
    args = ap.parse_args(argv)
    for name in ("seqs", "tokens", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be a positive integer")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # host work is single-threaded Python; keep torch's small ops from fanning out
    try:
        # The tiny checkpoint lives only for this run (the folder used to be left in /tmp by every run).
        with tempfile.TemporaryDirectory(prefix="moelink-host-") as model_dir, \
                build_llm(args.seqs, args.tokens, model_dir) as llm:
            runs = {True: [], False: []}
            for _ in range(args.repeats):
                for detok in (True, False):  # alternate, so drift on a shared machine hits both
                    runs[detok].append(decode_ms_per_step(llm, args.seqs, args.tokens, detok))
    finally:
        torch.set_num_threads(threads)
    text_ms, ids_ms = statistics.median(runs[True]), statistics.median(runs[False])
    result = dict(benchmark="host_overhead", device="cpu", date=time.strftime("%Y-%m-%d"), commit=git_commit(),
                  seqs=args.seqs, tokens=args.tokens, repeats=args.repeats,
                  ms_per_decode_step=dict(detokenize=text_ms, token_ids_only=ids_ms),
                  runs=dict(detokenize=runs[True], token_ids_only=runs[False]), ratio=text_ms / ids_ms)
    print(f"{args.seqs} sequences decoding, host ms per step (forward stubbed): "
          f"with text {text_ms:.2f} ms, token ids only {ids_ms:.2f} ms ({text_ms / ids_ms:.2f}x)")
    print(f"wrote {write_result(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
