"""`engine_e2e`'s in-process parts: one `LLM` per (model, dtype, loop), its CUDA-graph decode step timed alone
on its own model and KV cache, and `LLM.generate` end to end with every engine step timed.

Graph-only: the engine's decode graph for the batch, replayed with the step's inputs copied in, then the LM head
and argmax (`engine_decode.time_engine_graph`, CUDA events, L2 flushed), on the LLM's own model runner, so
both numbers come from the same weights, dtype and cache. Without CUDA (the CPU smoke) the same step runs
eagerly: it checks the plumbing and measures nothing.

End to end: `LLM.generate` on token-id prompts, greedy, EOS ignored, detokenize=False, after a warm-up call of
the same shape (a few tokens each) so that no Triton compile lands inside the timed call. `engine.step` is
wrapped for the call: each step's wall time and how many requests got a token, and a deadline (past it the
next step raises `PointTimeout`; LLM.generate then aborts its requests, freeing their blocks).
"""
from __future__ import annotations

import random
import statistics
import time

import torch

from .bench_timing import Timer
from .e2e_setup import DTYPES


class PointTimeout(RuntimeError):
    """A point ran past its deadline (raised between two engine steps)."""


def build_llm(model_dir: str, dtype: str, async_scheduling: bool | None, *, max_num_seqs: int, max_model_len: int,
              device: str, dummy: bool):
    """The LLM under test. dummy: `load_format="dummy"` (random weights from config.json alone)."""
    from moelink.engine import LLM

    torch_dtype, quantization = DTYPES[dtype]
    kw = dict(dtype=torch_dtype, quantization=quantization, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
              device=device)
    if dummy:
        kw["load_format"] = "dummy"
    if async_scheduling is not None:
        kw["async_scheduling"] = async_scheduling
    return LLM(model_dir, **kw)


def model_runner(llm):
    """The in-process worker's model runner (one device, no Ray): its model and KV cache."""
    try:
        return llm.engine.executor.worker.runner
    except AttributeError as exc:
        raise RuntimeError(f"cannot reach the model runner at llm.engine.executor.worker.runner ({exc}): "
                           "graph-only timing needs the in-process executor's runner") from exc


def graph_step_s(llm, batch: int, context: int, steps: int) -> tuple[float, str]:
    """Seconds of one decode step of `batch` sequences with `context` cached tokens each, device only: the
    captured graph replayed on CUDA, the eager step on CPU. (seconds, kind)."""
    from .engine_decode import decode_inputs, time_engine_graph

    runner = model_runner(llm)
    model, caches, cfg = runner.model, runner.kv_caches, runner.cfg
    device = next(model.parameters()).device
    block = runner.block_size
    need = batch * -(-(context + 1) // block)
    have = caches[0][0].shape[0] - 1  # the last block is the null block
    if need > have:
        raise ValueError(f"graph-only batch {batch} at {context} cached tokens needs {need} KV blocks; the engine "
                         f"allocated {have}")
    timer = Timer(device)
    with torch.inference_mode():
        args_ = decode_inputs(cfg, batch, context, device, caches)
        if device.type == "cuda":
            t = time_engine_graph(model, caches, args_, batch, device, timer, steps)
            if t is None:
                raise RuntimeError(f"no CUDA graph for batch {batch} (needs the Triton kernels)")
            return t, "cuda_graph"
        step = lambda ids, pos, ctx: model.compute_logits(model(ids, pos, ctx)).argmax(-1)  # noqa: E731
        return timer(step, [args_], iters=steps, warmup=1), "eager (CPU: no graphs, smoke only)"


class StepClock:
    """Wraps `engine.step` for one LLM.generate call: per step, wall seconds and the number of outputs (requests
    that got a token); raises PointTimeout between steps once `deadline` (time.monotonic) has passed."""

    def __init__(self, engine, deadline: float):
        self.engine, self.deadline = engine, deadline
        self.seconds: list[float] = []
        self.outputs: list[int] = []

    def __enter__(self) -> "StepClock":
        inner = self.engine.step

        def step():
            if time.monotonic() > self.deadline:
                raise PointTimeout(f"past its deadline after {len(self.seconds)} engine steps")
            t0 = time.perf_counter()
            outs = inner()
            self.seconds.append(time.perf_counter() - t0)
            self.outputs.append(len(outs))
            return outs

        self.engine.step = step  # an instance attribute: LLM.generate's self.engine.step() finds it first
        return self

    def __exit__(self, *exc) -> None:
        self.engine.__dict__.pop("step", None)


def loop_stats(engine) -> dict | None:
    """The engine's own loop counters (`LLMEngine.loop_stats`: steps and seconds spent launching, collecting
    and waiting for the device) when it keeps them; None otherwise."""
    ls = getattr(engine, "loop_stats", None)
    if ls is None:
        return None
    items = vars(ls).items() if hasattr(ls, "__dict__") else ()
    return {k: float(v) for k, v in items if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _per_step_ms(before: dict | None, after: dict | None, steps: int) -> dict | None:
    """The engine's counters over one call, seconds turned into ms per engine.step() call (the clock's count:
    the engine may count only the steps that launched device work)."""
    if before is None or after is None or steps <= 0:
        return None
    out = {}
    for k, v in after.items():
        d = v - before.get(k, 0.0)
        out[f"{k[:-2]}_ms" if k.endswith("_s") else k] = d * 1e3 / steps if k.endswith("_s") else d
    return out


def prompts_for(n: int, input_len: int, vocab: int, seed: int) -> list[list[int]]:
    """Random token ids, away from the low ids where tokenizers keep their specials."""
    rng = random.Random(seed)
    lo = min(1000, vocab // 4)
    return [[rng.randrange(lo, vocab) for _ in range(input_len)] for _ in range(n)]


def run_generate(llm, requests: int, input_len: int, output_len: int, deadline: float, seed: int = 0) -> dict:
    """One timed LLM.generate call (after its warm-up call). Step times: `step_ms` is the median over the steps
    in which every request got a token (the full decode batch), `step_ms_mean` the mean over all steps."""
    from moelink.engine import SamplingParams

    vocab = llm.engine.config.model.vocab_size
    prompts = prompts_for(requests, input_len, vocab, seed)
    warm = SamplingParams(temperature=0.0, max_tokens=min(output_len, 3), ignore_eos=True, detokenize=False)
    t0 = time.perf_counter()
    with StepClock(llm.engine, deadline):
        llm.generate(prompts_for(requests, input_len, vocab, seed + 1), warm, use_tqdm=False)
    warmup_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, detokenize=False)
    before = loop_stats(llm.engine)
    with StepClock(llm.engine, deadline) as clock:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    if produced != requests * output_len:
        raise RuntimeError(f"generated {produced} tokens, expected {requests} x {output_len}")
    full = [s for s, n in zip(clock.seconds, clock.outputs) if n == requests]
    steps = len(clock.seconds)
    return dict(wall_s=wall, warmup_s=warmup_s, steps=steps, output_tokens=produced,
                input_tokens=requests * input_len, e2e_tok_s=produced / wall,
                total_tok_s=(produced + requests * input_len) / wall,
                step_ms=statistics.median(full or clock.seconds) * 1e3,
                step_ms_mean=sum(clock.seconds) / steps * 1e3, full_batch_steps=len(full),
                loop_stats_per_step=_per_step_ms(before, loop_stats(llm.engine), steps))


def profile_generate(llm, requests: int, input_len: int, output_len: int, device: str) -> dict:
    """One more generate of the point's shape under torch.profiler (prompts of their own, so the prefix cache does
    not skip the prefill): device time by kernel family (benchmarks/kernel_profile.py)."""
    from moelink.engine import SamplingParams

    from .kernel_profile import kernel_times

    prompts = prompts_for(requests, input_len, llm.engine.config.model.vocab_size, seed=7)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, detokenize=False)
    return kernel_times(lambda: llm.generate(prompts, params, use_tqdm=False), device)

