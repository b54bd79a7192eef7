"""The worker's model runner: keeps per-request state, builds one flat batch per step, runs the model, samples.

Legend: T scheduled tokens in the flat batch, S sequences, M max blocks per
sequence, D hidden, V vocab, R rows that sample this step.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from moelink.kernels.attention import AttentionMetadata
from moelink.kernels.ops import select_kernels
from moelink.scheduler.outputs import ModelRunnerOutput, SchedulerOutput, StepStats
from moelink.scheduler.sliding_kv import NULL_BLOCK, first_live_sliding_block

from . import kv_sizing
from .config import ModelConfig
from .cuda_graph import CudaGraphCapture, DecodeGraphs
from .ep_step import LOW_LATENCY, EPStepPlan
from .loader import load_model
from .weight_memory import describe_memory, weight_bytes_by_format
from .models.layers import ForwardContext
from .sampler import Sampler, SamplingMetadata
from .sampling_params import SamplingParams
from .step_plan import SingleBatch, TwoBatchOverlap


@dataclass
class CachedRequestState:
    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    generator: torch.Generator | None
    all_token_ids: list[int] = field(init=False)
    # block_ids as an int32 array with spare capacity: each step copies it into the batch's table
    # with one slice assignment instead of converting a Python list.
    block_arr: np.ndarray = field(init=False)
    # The sliding-window group's table when it has its own (scheduler/sliding_kv.py), the runner's null block
    # where no query can see a block any more; None when one table serves every layer.
    sliding: "SlidingTable | None" = None

    def __post_init__(self) -> None:
        self.all_token_ids = self.prompt_token_ids + self.output_token_ids
        self.block_arr = np.empty(max(16, 2 * len(self.block_ids)), dtype=np.int32)
        self.block_arr[: len(self.block_ids)] = self.block_ids

    def add_blocks(self, new_block_ids: list[int]) -> None:
        n, k = len(self.block_ids), len(new_block_ids)
        if n + k > len(self.block_arr):
            grown = np.empty(2 * (n + k), dtype=np.int32)
            grown[:n] = self.block_arr[:n]
            self.block_arr = grown
        self.block_arr[n : n + k] = new_block_ids
        self.block_ids.extend(new_block_ids)


class SlidingTable:
    """One request's sliding-group block table. Not append-only: entries that leave the window turn into the
    null block, by the scheduler's rule (first_live_sliding_block), so a freed id (maybe another request's
    block by now) is never even addressed."""

    def __init__(self, block_ids: list[int], null_block: int) -> None:
        self.arr = np.empty(max(16, 2 * len(block_ids)), dtype=np.int32)
        self.n = len(block_ids)
        self.arr[: self.n] = [null_block if b == NULL_BLOCK else b for b in block_ids]
        self.num_nulled = 0

    def add(self, new_block_ids: list[int]) -> None:
        n, k = self.n, len(new_block_ids)
        if n + k > len(self.arr):
            grown = np.empty(2 * (n + k), dtype=np.int32)
            grown[:n] = self.arr[:n]
            self.arr = grown
        self.arr[n : n + k] = new_block_ids
        self.n = n + k

    def drop_before(self, first_live: int, null_block: int) -> None:
        stop = min(first_live, self.n)
        if stop > self.num_nulled:
            self.arr[self.num_nulled : stop] = null_block
            self.num_nulled = stop


logger = logging.getLogger(__name__)


class ModelRunner:
    """Owns the model, the KV cache tensors and the request states of one rank."""

    def __init__(self, model_cfg: ModelConfig, block_size: int, num_kv_blocks: int | None, device: torch.device,
                 kernels: str = "auto", ep=None, load_progress: bool = False, cuda_graph_sizes: tuple[int, ...] = (),
                 graph_backend=None, step_plan: SingleBatch | TwoBatchOverlap | None = None,
                 load_format: str = "auto"):
        """`num_kv_blocks` None: the cache is sized later, from the memory left once the
        weights are loaded (`available_kv_blocks`, then `allocate_kv_cache`).

        `cuda_graph_sizes`: decode batch sizes to capture once the KV cache exists (empty: all
        eager). `graph_backend` replaces torch.cuda.CUDAGraph (tests: cuda_graph.EagerReplay).
        `step_plan`: how eager steps run the model (engine/step_plan.py; default one batch).
        `load_format`: where the weights come from (engine/loader.open_checkpoint; "dummy": random)."""
        self.cfg = model_cfg
        self.device = device
        self.step_plan = step_plan if step_plan is not None else SingleBatch()
        self.block_size = block_size
        self.kernels = select_kernels(device, kernels)
        self.model = load_model(model_cfg, self.kernels, device, ep, progress=load_progress, load_format=load_format)
        self.kv_caches: list[tuple[torch.Tensor, ...]] = []
        # (full, sliding) layer pairs sharing cache tensors, with the sliding group's own block table; None: one
        # table and one tensor set per layer (layer_configs.GQAConfig.kv_layer_pairs).
        self.kv_pairs = model_cfg.attention.kv_layer_pairs(model_cfg.num_layers)
        self.sliding_window = model_cfg.attention.sliding_window if self.kv_pairs is not None else None
        self.null_block = -1
        self.ep = ep
        self.graph_sizes = self._graph_sizes(cuda_graph_sizes, ep, graph_backend)
        self.graph_backend = graph_backend
        self.graphs: DecodeGraphs | None = None
        if num_kv_blocks is not None:
            self.allocate_kv_cache(num_kv_blocks)
        self.sampler = Sampler()
        self.eos_token_ids = set(model_cfg.eos_token_ids)
        self.requests: dict[str, CachedRequestState] = {}
        # Preempted requests keep their generator so a seeded request draws the
        # same tokens whether or not it was preempted.
        self._parked_generators: dict[str, torch.Generator | None] = {}

    # -- KV cache -------------------------------------------------------------------
    def available_kv_blocks(self, memory_utilization: float) -> int:
        """KV blocks that fit in this rank's device now, weights loaded, keeping the device
        at most `memory_utilization` full (one block is kept back for the null block). Measured here,
        sized by `kv_sizing`."""
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = kv_sizing.gpu_kv_budget_bytes(total, free, memory_utilization)
        else:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            budget = kv_sizing.cpu_kv_budget_bytes(avail, memory_utilization)
        return kv_sizing.blocks_in_budget(budget, kv_sizing.kv_cache_bytes_per_block(self.cfg, self.block_size))

    def allocate_kv_cache(self, num_kv_blocks: int) -> None:
        if num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks={num_kv_blocks} is invalid: the KV cache needs at least one block.")
        # Graphs captured on an older cache would replay into it: drop them (and the old cache) first.
        self.graphs = None
        self.kv_caches = []
        # One extra, never-allocated block at the end: the attention null block.
        self.null_block = num_kv_blocks
        # Each layer's tensors as its attention kind lays them out: (k_cache, v_cache) for GQA, (latent_cache,)
        # for MLA (engine/layer_configs.py).
        shapes = self.cfg.attention.cache_shapes(num_kv_blocks, self.block_size)
        if self.kv_pairs is None:
            self.kv_caches = [
                tuple(torch.zeros(shape, dtype=self.cfg.cache_dtype, device=self.device) for shape in shapes)
                for _ in range(self.cfg.num_layers)
            ]
            kv_bytes = sum(t.numel() * t.element_size() for layer in self.kv_caches for t in layer)
        else:
            # A full layer and its sliding partner index one tensor set: a block id belongs to one group at a
            # time (the scheduler's two tables share one pool), so their KV never meets.
            caches: list = [None] * self.cfg.num_layers
            for full, sliding in self.kv_pairs:
                caches[full] = caches[sliding] = tuple(
                    torch.zeros(shape, dtype=self.cfg.cache_dtype, device=self.device) for shape in shapes)
            self.kv_caches = caches
            kv_bytes = sum(t.numel() * t.element_size() for full, _ in self.kv_pairs for t in caches[full])
        logger.info("rank memory: %s", describe_memory(weight_bytes_by_format(self.model), num_kv_blocks,
                                                       self.block_size, kv_bytes))
        if self.graph_sizes:
            self._capture_graphs()

    # -- CUDA graphs (engine/cuda_graph.py) ---------------------------------------
    def _graph_sizes(self, sizes: tuple[int, ...], ep, backend) -> tuple[int, ...]:
        if not sizes:
            return ()
        why_not = None
        if self.kernels.name != "triton":
            why_not = f"the {self.kernels.name} kernels read host-side lengths, which a graph would freeze"
        elif ep is not None and isinstance(self.step_plan, TwoBatchOverlap):
            why_not = ("two-batch overlap runs every step as two micro-batches (two dispatches per MoE layer) and a "
                       "decode graph captures one: all ranks must make the same collective calls")
        elif ep is not None and getattr(ep.all_to_all, "low_latency", None) is None:
            why_not = (f"the {ep.all_to_all.name} all-to-all sizes its buffers from counts on the host; decode graphs "
                       "under expert parallelism need a fixed-capacity backend's low-latency mode (nccl)")
        elif ep is not None and backend is None and ep.all_to_all.name != "nccl":
            # A capture that fails on one rank mid-collective would leave its peers waiting: only the transport
            # captured in tests (direct NCCL) is captured under EP (the CPU stand-in replays any).
            why_not = f"under expert parallelism only the nccl all-to-all is captured, not {ep.all_to_all.name}"
        elif backend is None and self.device.type != "cuda":
            why_not = f"device {self.device} is not a CUDA device"
        elif self.cfg.quantization is not None and not all(
                hasattr(self.kernels, op) for op in ("fp8_linear", "fused_moe_fp8")):
            # Until its Triton kernels exist, FP8 runs the references, whose MoE loops over experts on the host.
            why_not = f"the {self.kernels.name} kernels have no FP8 GEMMs yet (the references run, with host syncs)"
        if why_not:
            logger.info("CUDA graphs off: %s.", why_not)
            return ()
        if ep is not None:
            # A graph replays the low-latency dispatch, whose blocks hold at most the decode capacity.
            cap = ep.all_to_all.decode_capacity
            if any(s > cap for s in sizes):
                logger.info("decode graphs above the EP decode capacity %d dropped (those steps run eagerly).", cap)
            sizes = tuple(s for s in sizes if s <= cap)
        return tuple(sizes)

    def _capture_graphs(self) -> None:
        backend = self.graph_backend or CudaGraphCapture(self.device)
        if self.ep is not None:
            # Every rank captures the same sizes at the same time (allocate_kv_cache is a collective of the
            # executor), each forward in the low-latency mode, so their dispatches pair up.
            self.ep.all_to_all.begin_step(EPStepPlan(LOW_LATENCY, max(self.graph_sizes)))
        max_blocks = -(-self.cfg.max_model_len // self.block_size)
        graphs = DecodeGraphs(self.model, self.kv_caches, self.graph_sizes, max_blocks, self.null_block, self.device,
                              backend, sliding_table=self.kv_pairs is not None)
        t0 = time.perf_counter()
        graphs.capture_all()  # sizes that fail are dropped (and logged): serving goes on eagerly there
        if graphs.steps:
            self.graphs = graphs
            logger.info("decode graphs ready in %.1f s", time.perf_counter() - t0)

    # -- state updates --------------------------------------------------------
    def _update_states(self, so: SchedulerOutput) -> None:
        if so.resync is not None:
            self._resync(so.resync)
        for rid in so.finished_req_ids:
            self.requests.pop(rid, None)
            self._parked_generators.pop(rid, None)
        for rid in so.preempted_req_ids:
            st = self.requests.pop(rid, None)
            if st is not None:
                self._parked_generators[rid] = st.generator
        for new in so.scheduled_new_reqs:
            if new.req_id in self._parked_generators:
                gen = self._parked_generators.pop(new.req_id)
            else:
                gen = self._make_generator(new.sampling_params)
            self._add_request(new, gen)
        for cached in so.scheduled_cached_reqs:
            if cached.new_block_ids:
                self.requests[cached.req_id].add_blocks(cached.new_block_ids)
            if cached.new_sliding_block_ids:
                self.requests[cached.req_id].sliding.add(cached.new_sliding_block_ids)

    def _add_request(self, new, gen: torch.Generator | None) -> None:
        st = self.requests[new.req_id] = CachedRequestState(
            new.req_id, list(new.prompt_token_ids), list(new.output_token_ids), new.sampling_params,
            list(new.block_ids), new.num_computed_tokens, gen,
        )
        if self.kv_pairs is not None:
            st.sliding = SlidingTable(new.sliding_block_ids, self.null_block)

    def _resync(self, rs) -> None:
        """Elastic EP (scheduler.Scheduler.rewind): hold exactly the scheduler's requests, as it holds them. A
        request keeps its generator (a seeded one may have drawn once in the broken step)."""
        gens = {**self._parked_generators, **{rid: st.generator for rid, st in self.requests.items()}}
        self.requests = {}
        self._parked_generators = {rid: gens[rid] for rid in rs.waiting_ids if rid in gens}
        for new in rs.running:
            self._add_request(new, gens[new.req_id] if new.req_id in gens else
                              self._make_generator(new.sampling_params))

    def _make_generator(self, params: SamplingParams) -> torch.Generator | None:
        if params.seed is None:
            return None
        gen = torch.Generator(device=self.device)
        gen.manual_seed(params.seed)
        return gen

    # -- one step ---------------------------------------------------------------
    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput, run_forward: bool = True) -> ModelRunnerOutput:
        """Run one step. With no tokens of its own, a rank still runs the MoE layers'
        collectives when `run_forward` says a peer has tokens (expert parallelism)."""
        t0 = time.perf_counter()
        self._update_states(so)
        out = ModelRunnerOutput(step_id=so.step_id)
        if self.ep is not None:
            self.ep.all_to_all.begin_step(so.ep_step)  # the step's dispatch mode (engine/ep_step.py)
        if so.total_num_scheduled_tokens == 0:
            if run_forward:
                # Under graphs too: a low-latency dispatch moves R blocks of the decode capacity whatever T is,
                # so this eager pass makes the same collective calls as its peers' replays.
                self.step_plan.forward_moe_only(self.model)
                out.stats = StepStats(0, 0, time.perf_counter() - t0, self._moe_snapshot())
            return out
        bs = self.block_size
        req_ids = list(so.num_scheduled_tokens)
        states = [self.requests[r] for r in req_ids]
        query_lens = [so.num_scheduled_tokens[r] for r in req_ids]
        starts = [st.num_computed_tokens for st in states]
        seq_lens = [c + n for c, n in zip(starts, query_lens)]
        num_seqs = len(states)
        # Vectorised over the batch: only the token gather and the block-table rows loop per sequence.
        if max(query_lens) == 1:  # pure decode: one token per sequence
            tokens = [st.all_token_ids[c] for st, c in zip(states, starts)]
            positions = np.asarray(starts, dtype=np.int64)
            seq_of_token = np.arange(num_seqs)
        else:
            tokens = []
            for st, c, n in zip(states, starts, query_lens):
                tokens.extend(st.all_token_ids[c : c + n])
            q = np.asarray(query_lens)
            seq_of_token = np.repeat(np.arange(num_seqs), q)
            first_T = np.repeat(np.cumsum(q) - q, q)  # index of each token's sequence's first token
            positions = np.arange(len(tokens), dtype=np.int64) - first_T + np.repeat(np.asarray(starts, np.int64), q)
        max_blocks = max(len(st.block_ids) for st in states)
        tables_SM = np.zeros((num_seqs, max_blocks), dtype=np.int32)
        for s, st in enumerate(states):
            n_blk = len(st.block_ids)
            tables_SM[s, :n_blk] = st.block_arr[:n_blk]
        slots = tables_SM[seq_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        sliding = None if self.kv_pairs is None else self._sliding_tables(states, starts, seq_of_token, positions)
        qsl = np.zeros(num_seqs + 1, dtype=np.int32)
        np.cumsum(query_lens, out=qsl[1:])
        graph_batch = self._graph_batch(so, query_lens, num_seqs)
        if graph_batch is not None:
            h_TD = self.graphs.run(tokens, positions, slots, seq_lens, tables_SM, sliding, batch=graph_batch)
        else:
            dev = self.device
            attn = AttentionMetadata(
                query_start_loc_S1=torch.from_numpy(qsl).to(dev),
                seq_lens_S=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
                block_tables_SM=torch.from_numpy(tables_SM).to(dev),
                slot_mapping_T=torch.from_numpy(slots).to(dev),
                query_lens=query_lens, seq_lens=seq_lens,
                max_query_len=max(query_lens), max_seq_len=max(seq_lens), null_block=self.null_block,
            )
            input_ids_T = torch.tensor(tokens, dtype=torch.long, device=dev)
            positions_T = torch.from_numpy(positions).to(dev)
            attn_sliding = None
            if sliding is not None:
                attn_sliding = dataclasses.replace(attn, block_tables_SM=torch.from_numpy(sliding[0]).to(dev),
                                                   slot_mapping_T=torch.from_numpy(sliding[1]).to(dev))
            h_TD = self.step_plan.forward(self.model, input_ids_T, positions_T,
                                          ForwardContext(attn, self.kv_caches, attn_sliding))
        for st, n in zip(states, query_lens):
            st.num_computed_tokens += n
        # A chunk samples only when it reaches the request's last known token.
        rows = [s for s, (st, L) in enumerate(zip(states, seq_lens)) if L == len(st.all_token_ids)]
        if rows:
            self._sample(rows, states, qsl, h_TD, out, so.grammar_bitmask)
        out.stats = StepStats(len(tokens), len(states), time.perf_counter() - t0, self._moe_snapshot())
        return out

    def _graph_batch(self, so: SchedulerOutput, query_lens: list[int], num_seqs: int) -> int | None:
        """The captured size this step replays, or None (eager). Under EP the driver chose it for every rank
        (the largest decode batch over ranks, `EPStepPlan.graph_batch`), so all ranks replay one size."""
        if self.graphs is None or max(query_lens) != 1:
            return None
        if self.ep is None:
            return self.graphs.size_for(num_seqs)
        b = getattr(so.ep_step, "graph_batch", None)
        return b if b in self.graphs.steps and b >= num_seqs else None

    def _moe_snapshot(self):
        snap = self.model.moe_stats.snapshot()
        if self.ep is not None:
            mode = getattr(self.ep.all_to_all, "mode", None)  # a TwoModeAllToAll's current mode object
            snap.ep_mode = mode.name if mode is not None else "exact"
        return snap

    def _sliding_tables(self, states, starts, seq_of_token, positions) -> tuple[np.ndarray, np.ndarray]:
        """The sliding group's block tables [S, M] and KV slots [T]: entries no query of this step (or a later
        one) can see are the null block first, as the scheduler freed them before this step."""
        bs, w = self.block_size, self.sliding_window
        for st, c in zip(states, starts):
            st.sliding.drop_before(first_live_sliding_block(c, w, bs), self.null_block)
        tables_SM = np.zeros((len(states), max(st.sliding.n for st in states)), dtype=np.int32)
        for s, st in enumerate(states):
            tables_SM[s, : st.sliding.n] = st.sliding.arr[: st.sliding.n]
        slots = tables_SM[seq_of_token, positions // bs].astype(np.int64) * bs + positions % bs
        return tables_SM, slots

    def _sample(self, rows, states, qsl, h_TD, out: ModelRunnerOutput, bitmasks: dict[str, bytes]) -> None:
        last_R = torch.tensor([int(qsl[s + 1]) - 1 for s in rows], dtype=torch.long, device=self.device)
        logits_RV = self.model.compute_logits(h_TD.index_select(0, last_R))
        picked = [states[s] for s in rows]
        meta = SamplingMetadata.build(
            [st.params for st in picked], [st.prompt_token_ids for st in picked],
            [st.output_token_ids for st in picked], [st.generator for st in picked],
            self.eos_token_ids, self.cfg.vocab_size, self.device,
            [bitmasks.get(st.req_id) for st in picked] if bitmasks else None,
        )
        result = self.sampler(logits_RV, meta)
        token_ids = result.token_ids_B.tolist()  # host sync: sampled ids go back to the scheduler
        for st, tok, lp in zip(picked, token_ids, result.logprobs):
            st.output_token_ids.append(tok)
            st.all_token_ids.append(tok)
            out.sampled_token_ids[st.req_id] = tok
            if lp is not None:
                out.logprobs[st.req_id] = lp
