"""What batch-invariant mode costs (issue 58 item 4: the goal is <= 1.05x the normal engine's time on a GPU; docs/rl.md).

    python -m moelink.benchmarks.batch_invariant [--model PATH | --shape qwen3-30b-a3b [--layers N]] [--prompts 32]
        [--prompt-len 64] [--max-tokens 32] [--repeats 3] [--skip-probe] [--kernel-times] [--cpu-smoke]
        [--out benchmarks/results/batch_invariant_<device>.json]

Side by side in one run, on the same engine settings and prompts: the engine as it runs normally, and with
`batch_invariant=True` (kernels/batch_invariant.py: fixed matmul tiles, fixed reduction tiles, fixed element-wise
chunks, attention over fixed key blocks). Each arm generates the same batch `--repeats` times after a warm-up round;
the median wall time per round, output tokens per second, and the ratio invariant / normal. Also saved, as a check
that the mode does what it costs: whether one request's logprobs are bitwise the same alone and in the batch, per arm
(the normal engine's usually are not), and first, op by op, which of the step's ops keep a row's bits on this device
off and in the mode (benchmarks/batch_invariant_probe.py: where the engine is not invariant, the op that is not).
Without --model, a tiny Qwen3-MoE made on the fly (random weights,
transformers' own save_pretrained). On CPU both arms run the plain-torch kernels (the invariant arm's backend is
`batch_invariant`), so the ratio is the mode's own work; on a GPU the normal arm runs the Triton kernels with decode
graphs and the invariant arm `batch_invariant_triton` (kernels/batch_invariant_triton.py: Triton attention, fused
MoE, RMSNorm and linears on fixed launch configs, with decode graphs too: engine/rank/graph_policy.py), so the ratio
there says how far the GPU path is from the goal. Each arm reports the backend class it ran (`backend`,
kernels/ops.backend_class) and whether its decode steps replayed graphs (`decode_graphs`).
--shape qwen3-30b-a3b: both arms on that model's published shape (benchmarks/e2e_setup.py, as engine_e2e and
spec_decode build it) with random weights (`load_format="dummy"`, bfloat16), `--layers` of its decoder layers (default:
as many as fit beside the batch's KV cache, benchmarks/engine_decode.pick_layers): where a step's GPU work, not its
host launches, sets the time. With --cpu-smoke the shape is the toy one of engine_e2e's smoke (one layer).
--skip-probe: no op-by-op probe first (a run after the tiny one, which probed this device already).
--kernel-times: after the timed rounds, one profiled round per arm: device time by kernel family (moe, attention,
matmul, norm, other) and the top kernels by name, and `gap_family_us` (invariant - normal by family): which part of
the step the mode's extra time is in (issue 80's `round3 3` runs with it).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from moelink.engine.api.provenance import git_commit, write_result

from . import kernel_profile

RESULTS = Path(__file__).parent / "results"
SMOKE = dict(prompts=6, prompt_len=12, max_tokens=4, repeats=1)


def _tiny_model(out: str) -> str:
    from moelink.engine.tools.tiny_model import make_tiny_model

    make_tiny_model(out, arch="qwen3_moe")
    return out


def _shape_dir(shape: str, out: Path, layers: int | None, prompts: int, context: int, device: str,
               smoke: bool) -> tuple[str, int, int]:
    """(config.json directory, layers built, the shape's layers) of `shape` for random weights: as many layers as fit
    beside `prompts` sequences of `context` tokens (`layers` overrides), the toy smoke shape with `smoke`."""
    from .e2e_setup import MODELS, SMOKE_HF, write_model_dir
    from .engine_decode import pick_layers

    hf = SMOKE_HF if smoke else MODELS[shape][0]
    total = hf["num_hidden_layers"]
    n = layers or (pick_layers(hf, prompts, context, torch.device(device)) if device == "cuda" else total)
    if not 1 <= n <= total:
        raise SystemExit(f"--layers {n} is invalid for {shape}: must be 1 to {total}.")
    return str(write_model_dir(out, hf, n, context + 16)), n, total


def _arm(path: str, batch_invariant: bool, prompts: list[list[int]], max_tokens: int, repeats: int,
         device: str, dtype: str, load_format: str = "auto", kernel_times: bool = False) -> dict:
    from moelink.engine import LLM, SamplingParams

    # On CPU a pool that holds the batch (no device memory to size it from); on a GPU the engine sizes it.
    blocks = len(prompts) * -(-(len(prompts[0]) + max_tokens) // 16) + 16 if device == "cpu" else None
    llm = LLM(path, dtype=dtype, device=device, max_num_seqs=len(prompts), num_kv_blocks=blocks, block_size=16,
              batch_invariant=batch_invariant, load_format=load_format)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
    try:
        llm.generate(prompts, params, use_tqdm=False)  # warm-up: kernels compiled, caches filled
        times = []
        for _ in range(repeats):
            llm.flush_cache()  # every round computes its prompts
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            times.append(time.perf_counter() - t0)
        llm.flush_cache()
        alone = llm.generate([prompts[0]], params, use_tqdm=False)[0].outputs[0]
        first = outs[0].outputs[0]
        same = [lp[t].logprob for t, lp in zip(alone.token_ids, alone.logprobs)] == \
            [lp[t].logprob for t, lp in zip(first.token_ids, first.logprobs)]
        seconds = statistics.median(times)
        extra = kernel_profile.kernel_times(
            lambda: (llm.flush_cache(), llm.generate(prompts, params, use_tqdm=False)), device) if kernel_times else {}
        return dict(batch_invariant=batch_invariant, seconds=seconds,
                    output_tokens_per_s=len(prompts) * max_tokens / seconds, rounds=times,
                    kernels=llm.engine.config.kernels, backend=_backend(llm.engine.config.kernels, device),
                    decode_graphs=_graph_sizes(llm), alone_equals_batched_bitwise=same, **extra)
    finally:
        llm.shutdown()


def _graph_sizes(llm) -> list[int]:
    """The decode batch sizes the engine's rank captured as graphs ([]: every step eager)."""
    graphs = getattr(getattr(llm.engine.executor, "runner", None), "graphs", None)
    return list(graphs.sizes) if graphs is not None else []


def _backend(kernels: str, device: str) -> str:
    """The kernel backend class the ranks built for `kernels` on `device` (its `name`): which invariant path ran."""
    from moelink.kernels.ops import backend_class

    return backend_class(torch.device(device), kernels).name


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: a tiny Qwen3-MoE made here)")
    ap.add_argument("--shape", default=None, choices=["qwen3-30b-a3b"],
                    help="a published model shape with random weights (load_format dummy) instead of --model")
    ap.add_argument("--layers", type=int, default=None, help="--shape's decoder layers (default: as many as fit)")
    ap.add_argument("--skip-probe", action="store_true", help="no op-by-op probe before the arms")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--cpu-smoke", action="store_true", help="a few short prompts on CPU: checks the script only")
    ap.add_argument("--kernel-times", action="store_true", help="one more profiled round per arm: device time by "
                    "kernel family and name (kernel_family_us, kernel_us; gap_family_us: invariant - normal)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/batch_invariant_<device>.json)")
    args = ap.parse_args(argv)
    if args.shape and args.model:
        ap.error("--shape and --model are exclusive: give one.")
    if args.layers is not None and not args.shape:
        ap.error("--layers needs --shape.")
    if args.cpu_smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    device = "cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)
    from .batch_invariant_probe import print_table, probe

    ops = None
    if not args.skip_probe:
        ops = probe(torch.device(device))  # which ops hold row 0's bits on this device, off and in the mode
        print_table(ops)
    model, load_format, dtype = args.model or "tiny qwen3_moe (random)", "auto", args.dtype
    with tempfile.TemporaryDirectory() as tmp:
        if args.shape:
            path, layers, total = _shape_dir(args.shape, Path(tmp) / args.shape, args.layers, args.prompts,
                                             args.prompt_len + args.max_tokens, device, args.cpu_smoke)
            model = f"{args.shape} shape{' (toy smoke)' if args.cpu_smoke else ''}, {layers} of {total} layers, random"
            load_format, dtype = "dummy", "bfloat16" if dtype == "auto" else dtype
            print(f"{model} weights, {dtype}", flush=True)
        else:
            path = args.model or _tiny_model(str(Path(tmp) / "tiny"))
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(path).get_text_config().vocab_size
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, vocab, (args.prompts, args.prompt_len), generator=gen).tolist()
        arms = [_arm(path, bi, prompts, args.max_tokens, args.repeats, device, dtype, load_format, args.kernel_times)
                for bi in (False, True)]
    label = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    result = dict(benchmark="batch_invariant", device=label, commit=git_commit(), date=time.strftime("%Y-%m-%d"),
                  model=model, prompts=args.prompts, prompt_len=args.prompt_len,
                  max_tokens=args.max_tokens, repeats=args.repeats, ops=ops, arms=arms,
                  ratio_invariant_over_normal=arms[1]["seconds"] / arms[0]["seconds"])
    if args.kernel_times:  # where the invariant arm's extra time is, by kernel family (microseconds a round)
        fams = set(arms[0]["kernel_family_us"]) | set(arms[1]["kernel_family_us"])
        result["gap_family_us"] = {f: round(arms[1]["kernel_family_us"].get(f, 0.0)
                                            - arms[0]["kernel_family_us"].get(f, 0.0), 1) for f in sorted(fams)}
        print("invariant - normal, us a round by kernel family:", result["gap_family_us"])
    print(f"{'arm':<16} {'backend':<24} {'graphs':>7} {'s / round':>10} {'out tok/s':>10} {'alone == batched':>17}")
    for a in arms:
        print(f"{'invariant' if a['batch_invariant'] else 'normal':<16} {a['backend']:<24} "
              f"{str(bool(a['decode_graphs'])):>7} {a['seconds']:>10.3f} {a['output_tokens_per_s']:>10.1f} "
              f"{str(a['alone_equals_batched_bitwise']):>17}")
    print(f"ratio invariant / normal: {result['ratio_invariant_over_normal']:.2f}x (goal on a GPU: <= 1.05x)")
    suffix = ("smoke" if args.cpu_smoke else label.replace(" ", "_")) + (f"_{args.shape}" if args.shape else "")
    out = write_result(args.out or RESULTS / f"batch_invariant_{suffix}.json", result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
