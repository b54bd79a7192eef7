"""Start-up warm-up: every compiled kernel variant a request can hit is compiled and run once before the engine
serves, so the first request is as fast as the hundredth (on an H100 the first requests after start-up paid
Triton JIT compiles: TTFT p99 3.3 s at 16 concurrent streams).

Phases, on every rank, after the KV cache (and any decode CUDA graph) exists:
1. MoE: one direct expert call per fused-MoE variant a layer can hit (kernels/moe_variants.py: launch-config
   buckets, tiny path, alignment sizes, up to max_num_batched_tokens, or that times the ranks under expert
   parallelism, where a rank's experts receive every rank's tokens), per distinct kind of MoE layer. Local:
   no collective.
2. Forward steps (engine/rank/warmup_plan.py): prefill sweeps, chunked prefill over a long cached prefix, the decode
   sizes no graph covers, mixed steps; each samples greedily through the LM head. Under expert parallelism
   every rank runs the same steps in the same order (their all-to-alls pair up), each step with the dispatch
   mode the driver would give it (engine/contract/ep_step.py), through the rank's step plan (two-batch overlap too).
3. Sampler: greedy, logprobs, temperature with top-k / top-p / min-p, seeded and unseeded draws, penalties,
   min_tokens and a grammar mask.
The reference kernels compile nothing: there the forward phase is one small step (warmup_plan.minimal_plan)
and the sampler runs its greedy path only, so the test suite's many engines pay milliseconds.

What warm-up leaves as it found it: every token writes KV slot -1 (written nowhere; the reference kernels
write zeros into the null block, which holds zeros) and every block table holds the null block, so no real
block is read or written; the expert-load counters are reset after (as graph capture does); the request
states are not touched; the default random generators are restored (an unseeded request after warm-up draws
what it would have drawn without it).

Legend: T tokens, S sequences, D hidden, V vocab, R sampled rows, K top-k, E local experts, G the model's
experts (the router's width).
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from moelink.kernels.attention import AttentionMetadata
from moelink.scheduler.outputs import SchedulerOutput

from ..contract.ep_step import plan_ep_step
from ..contract.worker_api import WarmupConfig, WarmupReport
from ..models.layers import ForwardContext
from ..state.step import StateStep
from .sampling_metadata import SamplingMetadata
from ..contract.sampling_params import MAX_LOGPROBS, SamplingParams
from .warmup_plan import StepLimits, WarmupStep, minimal_plan, plan_steps

logger = logging.getLogger(__name__)

MOE, SAMPLER = "moe", "sampler"
_GREEDY = SamplingParams(temperature=0.0)


@torch.inference_mode()
def warm_up(runner, cfg: WarmupConfig, *, rank: int = 0, progress: bool = False) -> WarmupReport:
    """Warm one rank's model runner (module docstring) with the plan `cfg` names. Logs each phase on rank 0;
    `progress` shows a bar."""
    full = runner.kernels.name == "triton" if cfg.plan == "auto" else cfg.plan == "full"
    graphs = runner.graphs
    limits = StepLimits(cfg.max_num_batched_tokens, cfg.max_num_seqs, runner.cfg.max_model_len, runner.block_size,
                        graph_max=max(graphs.sizes) if graphs is not None and graphs.sizes else 0)
    steps = plan_steps(limits) if full else minimal_plan(limits)
    world = runner.ep.world_size if runner.ep is not None else 1
    moe_jobs = _moe_jobs(runner, cfg.max_num_batched_tokens * world) if full else []
    samplings = _sampler_cases(runner) if full else []
    num_moe = sum(len(counts) for _, counts in moe_jobs)
    report = WarmupReport(rank)
    bar = _bar(num_moe + len(steps) + len(samplings), progress)
    rng = _save_rng(runner.device)
    try:
        with _Phase(report, MOE, runner.device, bar) as phase:
            for layer, token_counts in moe_jobs:
                for n in token_counts:
                    if not _expert_call(runner, layer, n):
                        break  # larger calls would not fit either (a rank's own choice: no collective is skipped)
                    phase.done()
        h_SD = None
        for name in dict.fromkeys(step.phase for step in steps):
            with _Phase(report, name, runner.device, bar) as phase:
                for step in (s for s in steps if s.phase == name):
                    h_SD = _run_step(runner, step)
                    phase.done()
        if samplings and h_SD is not None:
            with _Phase(report, SAMPLER, runner.device, bar) as phase:
                logits_RV = runner.model.compute_logits(h_SD[torch.arange(4, device=h_SD.device) % h_SD.shape[0]])
                for meta in samplings:
                    runner.sampler(logits_RV, meta)
                    phase.done()
    finally:
        bar.close()
        runner.model.moe_stats.reset()  # warm-up is not traffic
        _restore_rng(runner.device, rng)
    if rank == 0:
        for name, n, secs in report.phases:
            logger.info("warm-up %s: %d variants in %.1f s", name, n, secs)
    return report


class _Phase:
    """Counts and times one phase into the report. The device is synchronised before the clock stops, so the
    seconds are the phase's compiles and runs, not its launches."""

    def __init__(self, report: WarmupReport, name: str, device: torch.device, bar):
        self.report, self.name, self.device, self.bar, self.count = report, name, device, bar, 0

    def done(self) -> None:
        self.count += 1
        self.bar.update()

    def __enter__(self) -> "_Phase":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:  # never swallows the exception
        if self.device.type == "cuda" and exc[0] is None:
            torch.cuda.synchronize(self.device)  # host sync: the phase's kernels finish inside its time
        if self.count:
            self.report.phases.append((self.name, self.count, time.perf_counter() - self.t0))


# -- MoE: direct expert calls --------------------------------------------------------------------------------
def _moe_jobs(runner, max_tokens: int) -> list[tuple[object, list[int]]]:
    """(layer, token counts), one count per planned fused-MoE variant in increasing order, for one layer of
    each distinct kind (format, shapes, dtypes, activation)."""
    from moelink.kernels.moe_config import device_name
    from moelink.kernels.moe_variants import MoEShape, plan_moe_variants
    from moelink.kernels.triton_moe_tiny import num_sms
    from moelink.moe.layer import MoELayer

    kinds: dict[tuple, MoELayer] = {}
    for layer in runner.model.modules():
        if isinstance(layer, MoELayer):
            key = (layer.expert_format.name, getattr(layer.expert_format, "block", None), repr(layer.activation),
                   tuple((n, tuple(p.shape), p.dtype) for n, p in layer.named_parameters()))
            kinds.setdefault(key, layer)
    jobs = []
    dev, cfg = runner.device, runner.cfg
    for layer in kinds.values():
        fmt = layer.expert_format
        # FP8: the weight block's (Bn, Bk), so warm-up plans the tiny GEMVs' row narrowing as the launch does.
        block_k = {"fp8_block_k": fmt.block[1], "fp8_block_n": fmt.block[0]} if fmt.name == "fp8" else {}
        shape = MoEShape(fmt.name, layer.num_local_slots, cfg.moe_intermediate_size, cfg.hidden_size, cfg.top_k,
                         device_name(dev), num_sms(dev), **block_k)
        jobs.append((layer, [t for t, _ in plan_moe_variants(shape, max_tokens)]))
    return jobs


def _expert_call(runner, layer, num_tokens: int) -> bool:
    """One expert call of `num_tokens` rows, routed evenly over the local experts, with the argument dtypes a
    real call passes (the router's weights; int64 ids from the router, int32 from an all-to-all). False when
    the device has no memory for it."""
    dev, K, E = runner.device, runner.cfg.top_k, layer.num_local_slots
    probe_1G = torch.zeros(1, layer.num_experts, dtype=layer.gate_GD.dtype, device=dev)
    if getattr(layer.router, "needs_table", False):  # hash-routed (DeepSeek-V4): experts by token id, from its table
        weights_1K, _ = layer.router(probe_1G, layer.tid2eid_VK, torch.zeros(1, dtype=torch.long, device=dev))
    else:
        weights_1K, _ = layer.router(probe_1G, layer.e_score_correction_bias_G)
    ids_dtype = torch.int64 if layer.ep is None else torch.int32
    try:
        x_TD = torch.zeros(num_tokens, runner.cfg.hidden_size, dtype=runner.cfg.dtype, device=dev)
        ids_TK = (torch.arange(num_tokens * K, device=dev) % E).to(ids_dtype).view(num_tokens, K)
        weights_TK = torch.full((num_tokens, K), 1.0 / K, dtype=weights_1K.dtype, device=dev)
        layer.expert_format.run(layer.kernels, layer, x_TD, weights_TK, ids_TK)
    except torch.cuda.OutOfMemoryError:
        logger.warning("warm-up: an expert call of %d rows does not fit in device memory: larger fused-MoE "
                       "variants compile at their first step", num_tokens)
        torch.cuda.empty_cache()
        return False
    return True


# -- forward steps ---------------------------------------------------------------------------------------------
def _run_step(runner, step: WarmupStep) -> torch.Tensor:
    """One synthetic step through the runner's model and step plan: slots -1 and null-block tables, so no KV
    is read or written; the last row of each sequence goes through the LM head and the greedy sampler.
    Returns those rows' hidden states [S, D]."""
    dev, bs = runner.device, runner.block_size
    query_lens = [s.new for s in step.seqs]
    seq_lens = [s.cached + s.new for s in step.seqs]
    qsl = np.zeros(step.num_seqs + 1, dtype=np.int32)
    np.cumsum(query_lens, out=qsl[1:])
    max_blocks = max(-(-n // bs) for n in seq_lens)
    attn = AttentionMetadata(
        query_start_loc_S1=torch.from_numpy(qsl).to(dev),
        seq_lens_S=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
        block_tables_SM=torch.full((step.num_seqs, max_blocks), runner.null_block, dtype=torch.int32, device=dev),
        slot_mapping_T=torch.full((step.num_tokens,), -1, dtype=torch.long, device=dev),
        query_lens=query_lens, seq_lens=seq_lens, max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        null_block=runner.null_block,
    )
    positions_T = torch.from_numpy(np.concatenate([np.arange(s.cached, s.cached + s.new) for s in step.seqs])).to(dev)
    input_ids_T = torch.arange(step.num_tokens, device=dev) % runner.cfg.vocab_size
    # The sliding group's table (when it has its own) holds the null block as well.
    # Linear-attention layers: every row a padding row of their state pools (slot -1: zeros read, nothing written).
    state = None
    if runner.state_caches is not None:
        state = StateStep(torch.full((step.num_seqs,), -1, dtype=torch.int32, device=dev),
                          torch.zeros(step.num_seqs, dtype=torch.bool, device=dev), attn.query_start_loc_S1,
                          max(query_lens) == 1)
    ctx = ForwardContext(attn, runner.kv_caches, attn if runner.kv_pairs is not None else None, state=state)
    _begin_ep_step(runner, step)
    h_TD = runner.step_plan.forward(runner.model, input_ids_T, positions_T, ctx)
    h_SD = h_TD.index_select(0, torch.from_numpy(qsl[1:] - 1).long().to(dev))
    S = step.num_seqs
    runner.sampler(runner.model.compute_logits(h_SD), SamplingMetadata.build(
        [_GREEDY] * S, [[0]] * S, [[] for _ in range(S)], [None] * S, runner.eos_token_ids, runner.cfg.vocab_size, dev))
    return h_SD


def _begin_ep_step(runner, step: WarmupStep) -> None:
    """The dispatch mode the driver would plan for this step on every rank (all ranks run the same shapes)."""
    ep = runner.ep
    if ep is None:
        return
    plan = None
    if ep.all_to_all.low_latency is not None:  # a two-mode backend (comm/ep_modes.py)
        so = SchedulerOutput(step_id=-1, num_scheduled_tokens={str(i): s.new for i, s in enumerate(step.seqs)},
                             total_num_scheduled_tokens=step.num_tokens)
        plan = plan_ep_step([so] * ep.world_size, ep.all_to_all.decode_capacity)
    ep.all_to_all.begin_step(plan)


# -- sampler ---------------------------------------------------------------------------------------------------
def _sampler_cases(runner) -> list[SamplingMetadata]:
    """Batches of 4 rows that take every path of the sampler once (engine/rank/sampler.py's order of a step)."""
    dev, V, eos = runner.device, runner.cfg.vocab_size, runner.eos_token_ids
    allowed = b"\xff" * (4 * -(-V // 32))  # a grammar mask that allows every token

    def seeded() -> torch.Generator:
        return torch.Generator(device=dev).manual_seed(0)  # its own generator: no request's is touched

    mixed = [SamplingParams(temperature=0.0, logprobs=MAX_LOGPROBS), SamplingParams(temperature=0.7, top_k=5, seed=0),
             SamplingParams(temperature=0.7, min_p=0.1), SamplingParams(temperature=1.3, logprobs=0)]
    processed = [SamplingParams(temperature=0.8, top_k=8, top_p=0.9, repetition_penalty=1.1, frequency_penalty=0.1,
                                presence_penalty=0.1, min_tokens=4, max_tokens=8)] * 4  # one output token: eos held
    cases = []
    for params, masks in ((mixed, None), (processed, [allowed] * 4)):
        gens = [seeded() if p.seed is not None else None for p in params]
        cases.append(SamplingMetadata.build(params, [[1, 2, 3]] * 4, [[4] for _ in params], gens, eos, V, dev, masks))
    return cases


# -- helpers ---------------------------------------------------------------------------------------------------
def _save_rng(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _restore_rng(device: torch.device, saved) -> None:
    cpu, cuda = saved
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, enabled: bool):
    if not enabled or total == 0:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="Warming up", unit="variant", disable=None)  # None: off when not a tty


__all__ = ["PLANS", "WarmupConfig", "WarmupReport", "warm_up", "warm_up_engine"]
