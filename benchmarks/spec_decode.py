"""Speculative decoding's speed against its acceptance: tokens per step, step time and decode tokens/s vs p.

    python -m moelink.benchmarks.spec_decode [--model DIR [--load-format dummy] | --shape NAME] [--batch 1 4 16]
        [--p 0 0.5 0.8 1.0] [--k 2] [--tokens 64] [--repeats 3] [--mtp] [--eagle3 HEAD_DIR]
        [--dspark DRAFT_DIR|agree|bundled]
        [--out benchmarks/results/spec_decode_<device>.json]

A drafter of chosen acceptance (`OracleDrafter`: it proposes each request's known continuation, each draft right
with probability p and wrong otherwise) isolates the engine's verify path from any real drafter's quality: at
p the expected tokens per verify row are (1 - p^(k+1)) / (1 - p). Per batch size, side by side in one run:
1. plain decoding, the default loop (async scheduling) and the serial loop (what speculative steps run on);
   the greedy outputs of the first are the drafter's reference continuations;
2. per p: the same requests with k drafts per step (greedy; outputs checked token-identical to 1);
3. with --mtp (a checkpoint with MTP layers: DeepSeek-V3, GLM-4.5), the checkpoint's own drafter (method "mtp",
   engine/spec/proposer/mtp.py): its acceptance is the weights' (random under --load-format dummy: ~0, so the row
   then prices the drafter's cost); with --eagle3 HEAD_DIR, an EAGLE-3 head for the model (method "eagle3",
   engine/spec/proposer/eagle3.py; random under --load-format dummy, so the row prices the head's cost);
   with --dspark DRAFT_DIR, a DFlash-format DSpark draft for the model (method "dspark",
   engine/spec/proposer/dspark.py); --dspark agree constructs the case where DSpark's drafts are right: the model's
   layers zeroed (engine/tools/dspark_checkpoint.bigram_target: its next token is its bigram, so every row, plain
   ones included, runs that model) and a draft whose Markov head is that bigram (agreeing_draft), so the row prices
   DSpark's drafting at full acceptance against plain decoding of the same model; --dspark bundled runs the stages
   the served checkpoint bundles (DeepSeek-V4's dspark_* fields; random under --load-format dummy: the row then
   prices the drafter's cost).
Reported: decode tokens/s, engine steps, tokens per request-step, mean accepted length, acceptance rate, ms per
step, and the speed-up over both plain loops. Per batch, `floors`: what a decode step (b tokens) and a verify step
(b * (k + 1) tokens) must read at least, from the checkpoint's config.json (benchmarks/step_floor.py: the expected
distinct experts under uniform routing), and their ratio; on a GPU also each floor in ms at the copy bandwidth
measured before the engines start, and each row's step over its floor (the oracle rows: its drafter reads nothing
on the device). A verify step touches more experts than a decode step (Qwen3-30B-A3B, b 4, k 2: 69 against 29 of
128 a layer), so at the memory floor it costs ~2.2x a decode step, whatever the kernels: a verify step near its own
floor is the goal a kernel can meet; `step_over_plain` / `step_over_serial` (a verify step against a decode step)
say how far the decode step is from its floor as much as anything about verifying.
Without --model a tiny Qwen3-MoE checkpoint is made (CPU); on a GPU give a full-size model directory with
--load-format dummy (config.json alone), or `--shape qwen3-30b-a3b|deepseek-v2-lite`: their published config.json
numbers (benchmarks/e2e_setup.py), random weights, as many layers as fit beside the largest batch's KV cache
(engine_decode's rule), bf16.
"""
from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from moelink.engine.api.provenance import git_commit, write_result

RESULTS = Path(__file__).parent / "results"
PROMPT_LEN = 16  # the random prompts' length


class OracleDrafter:
    """Proposes a request's known continuation (`reference[prompt]`: its greedy output without speculation), each
    draft right with probability `p`, otherwise a wrong token: a drafter of chosen acceptance (tests, this
    benchmark). Whether the draft for output position i of a request is right is drawn from (seed, prompt, i)
    alone, so it does not depend on the batch or the rank. Requests without a reference draft nothing.
    Module-level, so a functools.partial pickles to Ray ranks."""

    def __init__(self, reference: dict[tuple, list[int]], p: float, vocab: int, seed: int = 0):
        self.reference, self.p, self.vocab, self.seed = reference, p, vocab, seed

    def propose(self, states, k: int) -> list[list[int]]:
        out = []
        for st in states:
            ref = self.reference.get(tuple(st.prompt_token_ids))
            pos = len(st.output_token_ids)
            drafts = []
            if ref is not None:
                key = hash(tuple(st.prompt_token_ids))
                for i, t in enumerate(ref[pos: pos + k], start=pos):
                    right = random.Random(f"{self.seed}:{key}:{i}").random() < self.p
                    drafts.append(t if right else (t + 1) % self.vocab)
            out.append(drafts)
        return out


def _run(llm, prompts, params, repeats: int = 1) -> tuple[list[list[int]], float, int]:
    """Outputs, median seconds over `repeats` runs (a shared machine's noise), and the steps of one run."""
    eng = llm.engine
    times = []
    for _ in range(repeats):
        steps0 = eng.loop_stats.steps
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        times.append(time.perf_counter() - t0)
        steps = eng.loop_stats.steps - steps0
    return [o.outputs[0].token_ids for o in outs], statistics.median(times), steps


def measure(model: str, batch: int, ps: list[float], k: int, tokens: int, engine_kw: dict, repeats: int = 3,
            mtp: bool = False, eagle3: str | None = None, dspark: str | None = None) -> dict:
    from moelink.engine import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    rows: dict[str, dict[str, object]] = {}
    ref = None
    for name, async_sched in (("plain", True), ("plain_serial", False)):
        with LLM(model, async_scheduling=async_sched, **engine_kw) as llm:
            vocab = llm.engine.config.model.vocab_size
            rng = random.Random(batch)
            prompts = [[rng.randrange(3, vocab) for _ in range(PROMPT_LEN)] for _ in range(batch)]
            _run(llm, prompts, params)  # warm
            out, seconds, steps = _run(llm, prompts, params, repeats)
        if ref is None:
            ref = {tuple(p): o for p, o in zip(prompts, out)}
        rows[name] = dict(tokens_per_s=batch * tokens / seconds, steps=steps, ms_per_step=1e3 * seconds / steps)
    runs = [(f"p={p:g}", p, {"method": "ngram", "num_speculative_tokens": k,
                             "drafter_factory": functools.partial(OracleDrafter, ref, p, vocab, 0)}) for p in ps]
    if mtp:
        runs.append(("mtp", None, {"method": "mtp", "num_speculative_tokens": k}))
    if eagle3 is not None:
        runs.append(("eagle3", None, {"method": "eagle3", "model": eagle3, "num_speculative_tokens": k}))
    if dspark is not None:  # "bundled": the served checkpoint's own stages (DeepSeek-V4's dspark_* fields)
        runs.append(("dspark", None, {"method": "dspark", "num_speculative_tokens": k,
                                      **({} if dspark == "bundled" else {"model": dspark})}))
    for name, p, spec in runs:
        with LLM(model, speculative_config=spec, **engine_kw) as llm:
            _run(llm, prompts, params)
            before = llm.engine.stats().spec_decode
            out, seconds, steps = _run(llm, prompts, params, repeats)
            sd = llm.engine.stats().spec_decode
        same = out == [ref[tuple(q)] for q in prompts]
        # Where each request first left the plain run's tokens (None: never). Past it the oracle drafts the plain
        # run's continuation, which the target no longer follows, so acceptance and speed-up read low: bf16 with
        # random weights has near-tied logits, and a verify step's GEMM shapes round differently from a decode
        # step's (an H200, 2026-11-26: the same with eager steps; fp32 and a tiny bf16 model stay identical).
        diverged = [next((i for i, (a, b) in enumerate(zip(o, ref[tuple(q)])) if a != b), None)
                    for o, q in zip(out, prompts)]
        rows_v = sd.num_verify_rows - (before.num_verify_rows if before else 0)
        acc = sd.num_accepted_tokens - (before.num_accepted_tokens if before else 0)
        drafts = sd.num_draft_tokens - (before.num_draft_tokens if before else 0)
        tps = batch * tokens / seconds
        rows[name] = dict(
            tokens_per_s=tps, steps=steps, ms_per_step=1e3 * seconds / steps, identical_to_plain=same,
            first_divergence=diverged,
            tokens_per_request_step=batch * tokens / (steps * batch), mean_accepted_length=1 + acc / rows_v if rows_v else 1.0,
            acceptance_rate=acc / drafts if drafts else 0.0,
            expected_length=None if p is None else (1 - p ** (k + 1)) / (1 - p) if p < 1 else k + 1,
            speedup_vs_plain=tps / rows["plain"]["tokens_per_s"],
            speedup_vs_serial=tps / rows["plain_serial"]["tokens_per_s"],
            step_over_plain=1e3 * seconds / steps / rows["plain"]["ms_per_step"],
            step_over_serial=1e3 * seconds / steps / rows["plain_serial"]["ms_per_step"])
    return rows


def step_floors(hf: dict, batch: int, k: int, tokens: int, copy_GBps: float | None) -> dict:
    """The decode step's and the verify step's memory floors (module docstring), the cache read at the run's mean
    context; with `copy_GBps` (a GPU) in ms too."""
    from .step_floor import step_floor_bytes

    layers, context = hf["num_hidden_layers"], PROMPT_LEN + tokens // 2
    decode = step_floor_bytes(hf, layers, batch, batch * (context + 1))
    verify = step_floor_bytes(hf, layers, batch * (k + 1), batch * (context + k + 1))
    out = dict(decode=decode, verify=verify, ratio_verify_over_decode=verify["total"] / decode["total"])
    if copy_GBps:
        out.update(copy_GBps=copy_GBps, decode_ms=decode["total"] / copy_GBps / 1e6,
                   verify_ms=verify["total"] / copy_GBps / 1e6)
    return out


def add_floors(rows: dict, floors: dict) -> None:
    """Each timed row's step over its floor: plain rows over the decode step's, oracle rows over the verify step's
    (the drafters with device work of their own, MTP, EAGLE-3 and DSpark, are left without)."""
    if "decode_ms" not in floors:
        return
    for name, r in rows.items():
        if name.startswith("plain"):
            r["step_over_floor"] = r["ms_per_step"] / floors["decode_ms"]
        elif name.startswith("p="):
            r["step_over_floor"] = r["ms_per_step"] / floors["verify_ms"]


def _shape_dir(shape: str, tmp: Path, max_batch: int, max_len: int) -> str:
    """A config.json directory of `shape` (benchmarks/e2e_setup.MODELS) with the layers that fit (engine_decode)."""
    import torch

    from .e2e_setup import MODELS, write_model_dir
    from .engine_decode import pick_layers

    hf = MODELS[shape][0]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layers = pick_layers(hf, max_batch, max_len, device) if device.type == "cuda" else 2
    print(f"{shape}: {layers} of {hf['num_hidden_layers']} layers, random weights")
    return str(write_model_dir(tmp / shape, hf, layers, max_len))


def _agreeing_dspark(model: str, tmp: Path, k: int) -> tuple[str, str]:
    """(the model's bigram copy, a DSpark draft of that bigram): the --dspark agree case (module docstring)."""
    from moelink.engine.tools.dspark_checkpoint import agreeing_draft, bigram_target

    target = bigram_target(model, tmp / "bigram_target")
    L = json.loads((target / "config.json").read_text())["num_hidden_layers"]
    draft = agreeing_draft(target, tmp / "dspark_draft", block_size=k, target_layer_ids=sorted({max(L // 2 - 1, 0),
                                                                                                L - 1}))
    return str(target), str(draft)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m moelink.benchmarks.spec_decode", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: a tiny Qwen3-MoE made here)")
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    ap.add_argument("--shape", default=None, choices=["qwen3-30b-a3b", "deepseek-v2-lite"],
                    help="a full-size model shape with random weights (instead of --model)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--p", type=float, nargs="+", default=[0.0, 0.5, 0.8, 1.0])
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per row (median)")
    ap.add_argument("--mtp", action="store_true", help="also the checkpoint's MTP drafter (method mtp)")
    ap.add_argument("--eagle3", default=None, metavar="HEAD_DIR",
                    help="also an EAGLE-3 head for --model (method eagle3): its checkpoint directory")
    ap.add_argument("--dspark", default=None, metavar="DRAFT_DIR|agree|bundled",
                    help="also a DSpark draft for --model (method dspark): its checkpoint directory, 'agree': the "
                         "constructed case of full acceptance, or 'bundled': the model's own stages (module docstring)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if any(not 0.0 <= p <= 1.0 for p in args.p):
        ap.error(f"--p {args.p} is invalid: each must be in [0, 1].")
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if args.shape is not None:
            if args.model is not None:
                ap.error("--shape and --model are exclusive: give one.")
            model = _shape_dir(args.shape, Path(tmp), max(args.batch), 16 + args.tokens + 8)
            args.load_format, args.dtype = "dummy", "bfloat16" if args.dtype == "float32" else args.dtype
        elif model is None:
            from moelink.engine.tools.tiny_model import make_tiny_model
            model = str(make_tiny_model(Path(tmp) / "tiny", arch="qwen3_moe"))
        if args.dspark == "agree":
            model, args.dspark = _agreeing_dspark(model, Path(tmp), args.k)
        kw = dict(dtype=args.dtype, max_model_len=16 + args.tokens + 8, load_format=args.load_format,
                  max_num_seqs=max(args.batch))
        result = dict(commit=git_commit(), device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                      model=args.model or (f"{args.shape} shape, random weights" if args.shape else "tiny qwen3_moe"),
                      k=args.k, tokens=args.tokens, mtp=args.mtp, eagle3=args.eagle3, dspark=args.dspark, batches={})
        tag = "cpu" if result["device"] == "cpu" else result["device"].replace(" ", "_").lower()
        hf = json.loads((Path(model) / "config.json").read_text())
        copy_GBps = None
        if torch.cuda.is_available():  # before any engine holds the memory: two 1 GiB buffers, then freed
            from .bench_timing import Timer, measure_ceilings

            dev = torch.device("cuda")
            copy_GBps = measure_ceilings(dev, Timer(dev))["copy_GBps"]
            torch.cuda.empty_cache()
        out = args.out or RESULTS / f"spec_decode_{tag}.json"
        for b in args.batch:
            rows = measure(model, b, args.p, args.k, args.tokens, kw, args.repeats, args.mtp, args.eagle3, args.dspark)
            try:
                floors = step_floors(hf, b, args.k, args.tokens, copy_GBps)
            except KeyError as e:  # a config the floor's count does not read (no routed experts, say)
                floors = dict(error=f"config.json has no {e}")
            add_floors(rows, floors)
            result["batches"][str(b)] = dict(rows, floors=floors)
            write_result(out, result)  # after every batch: a run stopped at its time limit keeps what it measured
            print(f"batch {b}: plain {rows['plain']['tokens_per_s']:.0f} tok/s ({rows['plain']['ms_per_step']:.2f} "
                  f"ms/step), serial {rows['plain_serial']['tokens_per_s']:.0f} tok/s")
            if "ratio_verify_over_decode" in floors:
                ms = (f", {floors['decode_ms']:.2f} / {floors['verify_ms']:.2f} ms at {floors['copy_GBps']:.0f} GB/s"
                      if "decode_ms" in floors else "")
                print(f"  floors: decode {floors['decode']['total'] / 1e9:.2f} GB "
                      f"({floors['decode']['experts_touched_per_layer']:.1f} experts a layer), verify "
                      f"{floors['verify']['total'] / 1e9:.2f} GB ({floors['verify']['experts_touched_per_layer']:.1f}): "
                      f"verify / decode {floors['ratio_verify_over_decode']:.2f}x at the floor{ms}")
            for name, r in rows.items():
                if name.startswith("p=") or name in ("mtp", "eagle3", "dspark"):
                    expected = f"{r['expected_length']:.2f}" if r["expected_length"] is not None else "-"
                    print(f"  {name}: {r['tokens_per_s']:.0f} tok/s, {r['mean_accepted_length']:.2f} tokens/row "
                          f"(expected {expected}), {r['ms_per_step']:.2f} ms/step, x{r['speedup_vs_plain']:.2f} "
                          f"vs plain, x{r['speedup_vs_serial']:.2f} vs serial, identical={r['identical_to_plain']}"
                          + ("" if r["identical_to_plain"] else
                             f" (first divergence per request: {r['first_divergence']}; past it the oracle's "
                             f"drafts miss, so acceptance and speed-up read low)"))
    print(f"wrote {write_result(out, result)}")


if __name__ == "__main__":
    main()
