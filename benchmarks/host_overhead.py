"""Host time per engine step with the model's forward stubbed out: what the GPU would wait on.

    python -m moelink.benchmarks.host_overhead [--seqs 256] [--tokens 64] [--repeats 3] [--device-time-ms T]
        [--cpu-smoke] [--out benchmarks/results/host_overhead_cpu.json]

On a GPU, a decode step of a small-active-parameter MoE (Qwen3-30B-A3B at batch
256: ~10 ms with CUDA graphs) can be as short as the engine's own Python work
per step (scheduling, building the batch's metadata, sampling, detokenizing,
outputs). This measures that host work alone: the tiny model's forward is
replaced by a function returning zeros of the right shape, so everything
else (scheduler, model runner input prep, LM head on the sampled rows,
sampler, output processor) runs as in serving. CPU only; torch on one thread.

Side by side in one run (median over repeats of the mean ms per full-batch decode step). Each step is timed
twice: wall clock, and the engine thread's own CPU time (`time.thread_time`). On a shared 2-core machine other
processes take the cores from the engine thread now and then, and the wall clock charges that to the step (the
same code measured 8 and 17 us per sequence an hour apart); the thread's CPU time is the host work itself, what a
host with a core of its own (a GPU server) pays. Both are saved; the CPU figure is the host cost.
1. requests that want text (detokenize=True, the native API and LLM.generate) and token ids only
   (detokenize=False, what the VllmEngine protocol / HTTP gateway path sets when there are no stop strings),
   on a 2-layer model with the engine's default loop;
2. the step loop, async scheduling on and off (`EngineArgs.async_scheduling`): host microseconds per sequence
   per decode step, 1-layer model, token ids (device work on the engine's `SimulatedStream` at 0 ms when it
   has one: launched from the host thread, as on CUDA);
3. with --device-time-ms T, each step's device work takes T ms on a stand-in for the GPU stream: the engine's
   `SimulatedStream` (engine/rank/device_stream.py: the work is launched from the host thread as on CUDA, then a
   simulated device is busy T ms per step) put on the model runner of both loops; on an engine without it, the
   stubbed forward sleeps T ms (releasing the GIL) wherever the engine runs device work (older engines ran it
   on a CPU device-stream thread under async scheduling). Reported per loop: the step time against max(T, host) (host work fully
   hidden) and T + host (nothing hidden), with host the same loop's step time at T = 0.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from moelink.engine.api.provenance import git_commit, write_result

RESULTS = Path(__file__).parent / "results"
# tokens: enough full decode steps that the overlapped loop's first one (whose device work began during the
# step before, so it returns early) weighs little in their mean: at 6 tokens 4 of ~5 steps slept T, mean 0.84 T.
SMOKE = dict(seqs=8, tokens=14, repeats=1, device_time_ms=2.0)


class StubForward:
    """The model's forward replaced: zeros of the right shape after `device_s` seconds (a sleep), and which
    thread ran it."""

    def __init__(self, hidden: int, device_s: float = 0.0):
        self.hidden, self.device_s = hidden, device_s
        self.threads: set[str] = set()
        # Seconds the engine's device work ran inline on the host thread (SimulatedStream at T = 0: on CUDA that
        # work is kernel launches; here it is also the LM head's and the sampler's CPU compute).
        self.device_work_s = 0.0

    def __call__(self, input_ids_T, positions_T, ctx):
        self.threads.add("host" if threading.current_thread() is threading.main_thread() else "another thread")
        if self.device_s:
            time.sleep(self.device_s)  # the device's share of a step: the host thread is free meanwhile
        return torch.zeros(input_ids_T.shape[0], self.hidden)


def simulated_stream():
    """The engine's GPU-stream test double (a class), or None on an engine without it."""
    try:
        from moelink.engine.rank.device_stream import SimulatedStream
    except ImportError:
        return None
    return SimulatedStream


def build_llm(seqs: int, tokens: int, model_dir: str, layers: int = 2, async_scheduling: bool | None = None,
              device_ms: float | None = None):
    """A tiny CPU LLM whose forward is a StubForward (returned with it). device_ms (0 included): each step's
    device work takes that long on a SimulatedStream, or, without one, in the stubbed forward; None: the
    engine's own stream for the device."""
    from moelink.engine import LLM
    from moelink.engine.tools.tiny_model import make_tiny_model

    path = make_tiny_model(model_dir, arch="qwen3_moe", num_layers=layers, hidden_size=64, num_experts=8, top_k=2,
                           max_position_embeddings=4096)
    kw = {} if async_scheduling is None else dict(async_scheduling=async_scheduling)
    llm = LLM(str(path), dtype="float32", device="cpu", max_num_seqs=seqs, max_num_batched_tokens=max(8192, seqs),
              num_kv_blocks=seqs * (-(-(64 + tokens) // 16) + 1), block_size=16, **kw)
    runner = llm.engine.executor.worker.runner
    sim = simulated_stream() if device_ms is not None else None
    if sim is not None:
        runner.stream = sim(device_ms * 1e-3)
    stub = StubForward(runner.model.cfg.hidden_size, device_ms * 1e-3 if device_ms and sim is None else 0.0)
    runner.model.forward = stub
    stream = getattr(runner, "stream", None)  # the runner's device-stream strategy (engine/rank/device_stream.py)
    if stream is not None:
        submit = stream.submit

        def timed_submit(fn):  # the step's device work, timed where the stream runs it
            def timed():
                t0 = time.perf_counter()
                try:
                    return fn()
                finally:
                    stub.device_work_s += time.perf_counter() - t0
            return submit(timed)
        stream.submit = timed_submit
    return llm, stub


def decode_ms_per_step(llm, seqs: int, tokens: int, detokenize: bool) -> float:
    """Mean host ms of the steps where every sequence decodes (prefill steps and the tail excluded). The mean,
    not the median: throughput pays for every step, the garbage collector's occasional long pause included
    (engine/contract/gc_policy.py; a median hid a 100 ms pause every few dozen steps)."""
    return decode_step_ms(llm, seqs, tokens, detokenize)[0]


def decode_step_ms(llm, seqs: int, tokens: int, detokenize: bool, stub: StubForward | None = None
                   ) -> tuple[float, float, float]:
    """(mean wall ms per full decode step, of which mean ms in the device work run inline (`stub.device_work_s`),
    mean CPU ms the stepping thread used per step)."""
    from moelink.engine import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, detokenize=detokenize)
    for i in range(seqs):
        llm.engine.add_request(f"h{detokenize}-{i}-{time.monotonic_ns()}", [5 + i % 50] * 64, params)
    times, device, cpu = [], [], []
    started: set[str] = set()  # requests whose first token the host has seen
    while engine.has_requests():
        decoding = len(started) == seqs  # every prompt done before this step: it decodes
        d0 = stub.device_work_s if stub is not None else 0.0
        c0, t0 = time.thread_time(), time.perf_counter()
        outs = engine.step()
        dt, dc = time.perf_counter() - t0, time.thread_time() - c0
        if decoding and engine.stats().num_running == seqs:  # a full decode batch, not the prefill or the tail
            times.append(dt)
            cpu.append(dc)
            device.append((stub.device_work_s if stub is not None else 0.0) - d0)
        elif not decoding:
            started.update(o.request_id for o in outs)
    return statistics.fmean(times) * 1e3, statistics.fmean(device) * 1e3, statistics.fmean(cpu) * 1e3


def _async_modes() -> list[bool | None]:
    import dataclasses

    from moelink.engine import EngineArgs

    return [True, False] if "async_scheduling" in {f.name for f in dataclasses.fields(EngineArgs)} else [None]


def _label(mode: bool | None) -> str:
    return {True: "async_on", False: "async_off", None: "engine_default"}[mode]


def main(argv=None) -> dict:
    args = _parse_args(argv)
    modes = _async_modes()
    T = args.device_time_ms
    runs, loop_runs, loop_device, loop_cpu, timed_runs, forward_threads = _measure(args, modes)
    text_ms, ids_ms = statistics.median(runs[True]), statistics.median(runs[False])
    loop_ms = {_label(m): statistics.median(v) for m, v in loop_runs.items()}
    device_ms = {_label(m): statistics.median(v) for m, v in loop_device.items()}
    cpu_ms = {_label(m): statistics.median(v) for m, v in loop_cpu.items()}
    result = dict(benchmark="host_overhead", device="cpu", date=time.strftime("%Y-%m-%d"), commit=git_commit(),
                  seqs=args.seqs, tokens=args.tokens, repeats=args.repeats,
                  ms_per_decode_step=dict(detokenize=text_ms, token_ids_only=ids_ms),
                  runs=dict(detokenize=runs[True], token_ids_only=runs[False]), ratio=text_ms / ids_ms,
                  step_loop=dict(layers=1, seqs=args.seqs, detokenize=False,
                                 stream="SimulatedStream(0): device work launched on the host thread, as on CUDA"
                                 if simulated_stream() is not None else "the engine's own CPU stream",
                                 has_async_scheduling=modes != [None],
                                 ms_per_decode_step=loop_ms,
                                 us_per_seq_per_step={k: v * 1e3 / args.seqs for k, v in loop_ms.items()},
                                 # Of that, the device work run inline (on CUDA: kernel launches; on this CPU also
                                 # the LM head's and the sampler's compute), and what is left: Python host work.
                                 device_work_us_per_seq={k: v * 1e3 / args.seqs for k, v in device_ms.items()},
                                 host_only_us_per_seq={k: (loop_ms[k] - v) * 1e3 / args.seqs
                                                       for k, v in device_ms.items()},
                                 # The stepping thread's CPU time (the device work run inline included): the host
                                 # cost without the time other processes took the core (module docstring).
                                 cpu_us_per_seq_per_step={k: v * 1e3 / args.seqs for k, v in cpu_ms.items()},
                                 cpu_host_only_us_per_seq={k: (v - device_ms[k]) * 1e3 / args.seqs
                                                           for k, v in cpu_ms.items()},
                                 runs={_label(m): v for m, v in loop_runs.items()},
                                 cpu_runs={_label(m): v for m, v in loop_cpu.items()}),
                  device_time=None)
    print(f"{args.seqs} sequences decoding, host ms per step (forward stubbed): "
          f"with text {text_ms:.2f} ms, token ids only {ids_ms:.2f} ms ({text_ms / ids_ms:.2f}x)")
    print("step loop, 1 layer, token ids: " + ", ".join(
        f"{k} {v:.2f} ms/step = {v * 1e3 / args.seqs:.1f} us per sequence" for k, v in loop_ms.items())
        + ("" if modes != [None] else " (this engine has no async_scheduling switch yet: its one loop)"))
    print("  engine thread CPU time: " + ", ".join(
        f"{k} {v:.2f} ms/step = {v * 1e3 / args.seqs:.1f} us per sequence" for k, v in cpu_ms.items()))
    if any(device_ms.values()):
        print("  of which device work run inline (LM head, sampling; on CUDA: launches): " + ", ".join(
            f"{k} {v * 1e3 / args.seqs:.1f} us, host alone {(loop_ms[k] - v) * 1e3 / args.seqs:.1f} us"
            for k, v in device_ms.items()))
    if T:
        result["device_time"] = _device_time(T, timed_runs, loop_ms, forward_threads)
    print(f"wrote {write_result(args.out, result)}")
    return result


def _parse_args(argv) -> argparse.Namespace:
    """The command line, checked (argparse's error and exit on a bad value); --cpu-smoke's sizes filled in."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=256, help="concurrent sequences (the decode batch)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per sequence")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs per setting (median of medians)")
    ap.add_argument("--device-time-ms", type=float, default=None,
                    help="also run with the stubbed forward taking this many ms (see 3. above)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help=f"a few sequences and tokens ({SMOKE}): checks the script, fast")
    ap.add_argument("--out", default=str(RESULTS / "host_overhead_cpu.json"))
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        for k, v in SMOKE.items():
            if k != "device_time_ms" or getattr(args, k) is None:
                setattr(args, k, v)
    for name in ("seqs", "tokens", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be a positive integer")
    if args.device_time_ms is not None and args.device_time_ms <= 0:
        ap.error("--device-time-ms must be > 0")
    return args


def _measure(args: argparse.Namespace, modes: list) -> tuple[dict, dict, dict, dict, dict, dict]:
    """The timed runs, settings alternated: (decode ms per step with and without text, the step loop's ms / device ms
    / CPU ms per step by loop mode, the runs with device time T by mode, the threads their forwards ran on)."""
    T = args.device_time_ms
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # host work is single-threaded Python; keep torch's small ops from fanning out
    try:
        # The tiny checkpoints live only for this run (the folder used to be left in /tmp by every run).
        with tempfile.TemporaryDirectory(prefix="moelink-host-") as tmp, ExitStack() as stack:
            def make(name, **kw):
                llm, stub = build_llm(args.seqs, args.tokens, f"{tmp}/{name}", **kw)
                stack.enter_context(llm)
                return llm, stub

            text_llm, _ = make("two-layer")
            # On the simulated stream at T = 0 when the engine has one: launched on the host as on CUDA, so the host
            # time is not blurred by a CPU stream thread's hand-over.
            loop_llms = {m: make(f"loop-{_label(m)}", layers=1, async_scheduling=m, device_ms=0.0) for m in modes}
            timed_llms = {m: make(f"timed-{_label(m)}", layers=1, async_scheduling=m, device_ms=T)
                          for m in modes} if T else {}
            runs = {True: [], False: []}
            loop_runs = {m: [] for m in modes}
            loop_device = {m: [] for m in modes}
            loop_cpu = {m: [] for m in modes}
            timed_runs = {m: [] for m in timed_llms}
            for _ in range(args.repeats):  # alternate, so drift on a shared machine hits every setting
                for detok in (True, False):
                    runs[detok].append(decode_ms_per_step(text_llm, args.seqs, args.tokens, detok))
                for m in modes:
                    step_ms, step_device_ms, step_cpu_ms = decode_step_ms(loop_llms[m][0], args.seqs, args.tokens,
                                                                          False, loop_llms[m][1])
                    loop_runs[m].append(step_ms)
                    loop_device[m].append(step_device_ms)
                    loop_cpu[m].append(step_cpu_ms)
                for m in timed_llms:
                    timed_runs[m].append(decode_ms_per_step(timed_llms[m][0], args.seqs, args.tokens, False))
            forward_threads = {m: sorted(stub.threads) for m, (_, stub) in timed_llms.items()}
    finally:
        torch.set_num_threads(threads)
    return runs, loop_runs, loop_device, loop_cpu, timed_runs, forward_threads


def _device_time(T: float, timed_runs: dict, loop_ms: dict, forward_threads: dict) -> dict:
    """The runs with a device stand-in busy T ms per step against max(T, host) and T + host (printed), and what the
    stand-in was."""
    rows = []
    for m, v in timed_runs.items():
        step, host = statistics.median(v), loop_ms[_label(m)]
        rows.append(dict(loop=_label(m), step_ms=step, host_ms=host, max_device_host_ms=max(T, host),
                         device_plus_host_ms=T + host, forward_thread=forward_threads[m], runs=v))
        print(f"device {T:g} ms, {_label(m)}: step {step:.2f} ms vs max(T, host) {max(T, host):.2f}, "
              f"T + host {T + host:.2f} (host {host:.2f}; forward on {', '.join(forward_threads[m])})")
    if simulated_stream() is not None:
        stand_in = "SimulatedStream: launched on the host thread, then a simulated device busy T ms per step"
    elif any("another thread" in r["forward_thread"] for r in rows):
        stand_in = "the stubbed forward sleeps T ms on the engine's device-stream thread"
    else:
        stand_in = None
    device_time = dict(ms=T, rows=rows, stand_in=stand_in, note=(
        f"device stand-in: {stand_in}" if stand_in else
        "missing: the engine has no SimulatedStream and ran every forward on the host thread, so the device "
        "time cannot overlap the host's work here"))
    print("note: " + device_time["note"])
    return device_time


if __name__ == "__main__":
    main()
