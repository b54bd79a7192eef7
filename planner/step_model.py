"""Step-time model of MoE serving under data-parallel attention + expert parallelism.

One rank of an EP group of `ep` GPUs. Every rank runs attention, dense layers
and shared experts on its own requests (DP); at each MoE layer its tokens are
dispatched once per destination (see `moelink.comm.link_model.Pattern`), the
routed experts run as a grouped GEMM on the rank that holds them, and the
results are combined back. Three forward kinds:

- `decode_step`: `batch_per_rank` sequences, one token each (1 + mtp_draft with
  multi-token prediction), attending to `context_len` cached tokens;
- `prefill_chunk`: `prefill_chunk` prompt tokens per rank (whole prompts of
  `prompt_len`, `cached_prefix` of them already cached);
- `mixed_iteration`: aggregated serving (no prefill/decode split) in steady
  state: decode batch plus the prompts of the requests that replace finished ones.

Per layer, component times come from the roofline (`kernels.py`) and the link
model; with `overlap="tbo"` the batch runs as two micro-batches whose
communication overlaps the other's compute:
    t_layer = max(C, M) + (1 - overlap) * min(C, M)
where C and M are the compute and communication of both halves, and overlap is
eff.overlap_rdma for low-latency RDMA all-to-all (Pattern.EXPERT), eff.overlap_sm otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from moelink.comm.link_model import Pattern, RoutingSpec, all_to_all_time

from .efficiency import DEFAULT_EFFICIENCY, Efficiency
from .hardware import DTYPES, HardwareProfile
from .imbalance import Balance, expert_load_imbalance
from .kernels import MeasuredMoE, find_measurement, gemm_time, grouped_expert_time, roofline
from .models import ModelShape
from .weight_bytes import weight_bytes

OVERLAPS = ("none", "tbo")
KV_BYTES = {"bf16": 2.0, "fp8": 1.0}
# Weight-only formats (their GEMMs run in bf16 on the tensor cores: planner/kernels.compute_dtype): INT4 (Kimi
# K2.5) and MXFP4 (gpt-oss, DeepSeek-V4's routed experts), both run W4A16 by moelink's kernels.
WEIGHT_ONLY = ("int4", "mxfp4")


@dataclass(frozen=True)
class Precision:
    """Datatypes: expert weights, dense weights (attention projections, dense FFN), attention math and
    KV cache, dispatch payload, combine payload, LM head."""

    experts: str = "fp8"
    dense: str = "fp8"
    attention: str = "bf16"
    dispatch: str = "fp8"
    combine: str = "bf16"
    lm_head: str = "bf16"
    shared: str = ""  # shared experts' weights; "" = as the routed experts (Kimi's INT4: bf16 shared experts)

    def __post_init__(self) -> None:
        if not self.shared:
            object.__setattr__(self, "shared", self.experts)
        for name in ("experts", "dense", "dispatch", "combine", "lm_head", "shared"):
            allowed = DTYPES + (WEIGHT_ONLY if name in ("experts", "shared") else ())
            if getattr(self, name) not in allowed:
                raise ValueError(f"precision {name}={getattr(self, name)!r} is not supported: "
                                 f"choose from {', '.join(allowed)}.")
        if self.attention not in KV_BYTES:
            raise ValueError(f"precision attention={self.attention!r} is not supported: choose bf16 or fp8.")


@dataclass(frozen=True)
class Setup:
    """What runs on one rank; see the module docstring for the three forward kinds."""

    ep: int
    batch_per_rank: int = 128
    context_len: int = 2048
    prefill_chunk: int = 16384
    prompt_len: int = 2048
    cached_prefix: int = 0
    precision: Precision = field(default_factory=Precision)
    overlap: str = "tbo"
    decode_pattern: str = "rank"
    prefill_pattern: str = "rank"
    balance: Balance = field(default_factory=Balance)
    redundant_experts: int = 0
    mtp_draft: int = 0
    mtp_accept: float = 0.0
    measured: tuple[MeasuredMoE, ...] = ()
    expert_eff: tuple[float, float] | None = None  # (matmul, memory) fractions of moelink's measured kernel
    attn_tp: int = 1

    def __post_init__(self) -> None:
        for name in ("ep", "batch_per_rank", "context_len", "prefill_chunk", "prompt_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
        if not 0 <= self.cached_prefix < self.prompt_len:
            raise ValueError(f"cached_prefix={self.cached_prefix} must be in [0, prompt_len={self.prompt_len}).")
        if self.overlap not in OVERLAPS:
            raise ValueError(f"overlap={self.overlap!r} is not supported: choose from {', '.join(OVERLAPS)}.")
        for name in ("decode_pattern", "prefill_pattern"):
            if getattr(self, name) not in [p.value for p in Pattern]:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported: choose from "
                                 f"{', '.join(p.value for p in Pattern)}.")
        if self.redundant_experts < 0:
            raise ValueError(f"redundant_experts={self.redundant_experts} must be >= 0.")
        if not 0 <= self.mtp_draft <= 4:
            raise ValueError(f"mtp_draft={self.mtp_draft} must be in [0, 4].")
        if not 0 <= self.mtp_accept <= 1:
            raise ValueError(f"mtp_accept={self.mtp_accept} must be in [0, 1].")
        if self.attn_tp < 1:
            raise ValueError(f"attn_tp={self.attn_tp} must be >= 1.")
        if self.expert_eff is not None and not all(0 < f <= 1 for f in self.expert_eff):
            raise ValueError(f"expert_eff={self.expert_eff} must be two fractions in (0, 1].")


@dataclass
class StepResult:
    """One forward on one rank: wall seconds, tokens it yields, seconds per component (sum ~ seconds)."""

    kind: str
    seconds: float
    tokens: float
    breakdown: dict
    imbalance: float
    tokens_per_seq: float = 1.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def itl_s(self) -> float:
        """Time between a sequence's tokens (decode): step time over tokens per sequence per step."""
        return self.seconds / self.tokens_per_seq


@dataclass
class _Load:
    """Work of one layer on the busiest rank. rows: tokens through this rank's projections;
    pool: mean tokens per rank whose expert pairs are spread over EP; comm: tokens this rank sends;
    seqs: sequences per rank those pool tokens come from (expert imbalance: `imbalance.py`)."""

    rows: float
    attn_flops: float
    attn_bytes: float
    pool: float
    comm: float
    seqs: float

    def scaled(self, f: float) -> "_Load":
        return _Load(self.rows * f, self.attn_flops * f, self.attn_bytes * f, self.pool * f, self.comm * f,
                     self.seqs * f)


class _Layers:
    """Times the components of dense and MoE layers for a given `_Load`."""

    def __init__(self, model: ModelShape, hw: HardwareProfile, setup: Setup, eff: Efficiency, pattern: str):
        if model.num_experts + setup.redundant_experts < setup.ep:
            raise ValueError(f"ep={setup.ep} exceeds the {model.num_experts + setup.redundant_experts} "
                             f"expert slots of {model.name}: lower ep or add redundant_experts.")
        self.m, self.hw, self.s, self.eff, self.pattern = model, hw, setup, eff, Pattern(pattern)
        self.gpu = hw.gpu
        self.slots = model.num_experts + setup.redundant_experts
        self.local_experts = self.slots / setup.ep
        # Replicas placed by EPLB break the group <-> rank correspondence group-limited routing relies on.
        grouped = setup.redundant_experts == 0
        # Zero-computation experts' picks go nowhere: the all-to-all carries the expected real picks.
        self.routing = RoutingSpec(self.slots, max(1, round(model.routed_top_k)), model.n_group if grouped else 1,
                                   model.topk_group if grouped else 1)
        p = setup.precision
        self.measured = find_measurement(list(setup.measured), model.num_experts, model.top_k, model.hidden,
                                         model.moe_intermediate, p.experts)

    def imbalance(self, ld: "_Load") -> float:
        return expert_load_imbalance(self.s.balance, self.s.ep, self.local_experts, ld.pool * self.m.routed_top_k,
                                     seqs_per_rank=ld.seqs)

    def attention(self, ld: _Load) -> dict:
        """Attention of this rank's requests. With attn_tp = t > 1 the t GPUs of a TP group run the
        attention of all t ranks' requests together, each on 1/t of the heads: projection weights are read
        t times less per GPU for t times the rows (same FLOPs); MLA's latent cache is shared by all heads, so
        every GPU reads the latent of all t ranks' sequences (GQA shards its KV heads: no extra bytes); the
        head outputs are summed across the group (an all-reduce over NVLink, 2(t-1)/t of the rows' bytes)."""
        m, p, eff, t = self.m, self.s.precision, self.eff, self.s.attn_tp
        # The projections, with the layer's share of the hyper-connections' and n-gram layers' (model.extra_params).
        proj = gemm_time(ld.rows * t, (m.attn_proj_params() + m.extra_params() / m.num_layers) / t, 4 * m.hidden,
                         self.gpu, p.dense, eff)
        kv_bytes = ld.attn_bytes * (t if m.is_mla else 1)
        core = roofline(ld.attn_flops, kv_bytes, self.gpu, p.attention, eff, compute_eff=eff.attention)
        other = eff.layer_overhead_s + ld.rows * m.hidden * 2 * eff.activation_passes / (
            self.gpu.ceiling_hbm_bytes_per_s * eff.memory)
        out = {"attn_proj": proj, "attn_core": core, "other": other}
        if t > 1:
            out["attn_allreduce"] = self.hw.fabric.intra.transfer_time(2.0 * (t - 1) / t * ld.rows * t * m.hidden * 2)
        return out

    def dense(self, ld: _Load) -> dict:
        out = self.attention(ld)
        out["dense_ffn"] = gemm_time(ld.rows, self.m.dense_ffn_params(), 2 * self.m.hidden
                                     + 3 * self.m.dense_intermediate, self.gpu, self.s.precision.dense, self.eff)
        return out

    def moe_compute(self, ld: _Load, imb: float) -> dict:
        m, p, eff = self.m, self.s.precision, self.eff
        out = self.attention(ld)
        routes = m.num_experts + m.zero_experts
        out["router"] = gemm_time(ld.rows, m.hidden * routes, m.hidden + routes, self.gpu, "bf16", eff)
        if m.dense_beside_moe:  # LongCat-Flash: its sublayers' dense FFNs run beside the routed experts
            out["dense_ffn"] = m.dense_beside_moe * gemm_time(ld.rows, m.dense_ffn_params(), 2 * m.hidden
                                                              + 3 * m.dense_intermediate, self.gpu, p.dense, eff)
        out["shared_experts"] = gemm_time(ld.rows, m.num_shared * m.expert_params(),
                                          2 * m.hidden + 3 * m.moe_intermediate, self.gpu, p.shared, eff)
        pairs = ld.pool * m.routed_top_k * imb
        if self.measured is not None:
            out["routed_experts"] = self.measured.time(pairs, self.local_experts)
        elif self.s.expert_eff is not None:  # moelink's measured kernel efficiency on an unmeasured GPU
            kern = replace(eff, gemm=self.s.expert_eff[0], memory=self.s.expert_eff[1])
            out["routed_experts"] = grouped_expert_time(pairs, self.local_experts, m.hidden, m.moe_intermediate,
                                                        self.gpu, p.experts, kern)
        else:
            out["routed_experts"] = grouped_expert_time(pairs, self.local_experts, m.hidden, m.moe_intermediate,
                                                        self.gpu, p.experts, eff)
        t = self.s.attn_tp
        if t > 1:
            # Each GPU of a TP group runs the MoE block on its 1/t of the group's rows (no expert work done twice)
            # and the group all-gathers the outputs (moelink's engine/tp/experts.py): every GPU receives the
            # other t - 1 slices of [rows, D] in bf16 over the node's fabric.
            out["moe_tp_gather"] = self.hw.fabric.intra.transfer_time((t - 1) * ld.rows * m.hidden * 2)
        return out

    def comm(self, ld: _Load, imb: float) -> dict:
        """Dispatch and combine of one layer. Who is imbalanced decides which op stretches:
        dispatch is sent by the attention ranks, which hold equal token counts (DP attention), so every
        NIC/NVLink port sends the same bytes and the op is not stretched by expert imbalance; combine is
        sent by the expert ranks, and the busiest one sends `imb` times the mean. Evidence: LMSYS measured
        ~0.17 ms per decode dispatch per layer in both DeepSeek's and SGLang's real-traffic profiles (EP 72+,
        waiting for stragglers included), the time DeepEP's uniform-routing unit test takes and this model
        gives unstretched (0.18 ms); stretched by the EP-wide imbalance it gave 0.28 ms."""
        p = self.s.precision
        kw = dict(pattern=self.pattern, dispatch_dtype=p.dispatch, combine_dtype=p.combine)
        fab = self.hw.fabric
        dispatch = all_to_all_time(ld.comm, self.m.hidden, self.routing, self.s.ep, fab, recv_imbalance=1.0, **kw)
        combine = all_to_all_time(ld.comm, self.m.hidden, self.routing, self.s.ep, fab, recv_imbalance=imb, **kw)
        return {"dispatch": dispatch.dispatch_s, "combine": combine.combine_s}

    def forward(self, ld: _Load, lm_rows: float) -> tuple[float, dict, float]:
        """All layers plus LM head and per-step overhead: (seconds, breakdown, expert imbalance)."""
        m, eff = self.m, self.eff
        tbo = self.s.overlap == "tbo"
        parts = 2 if tbo else 1
        half = ld.scaled(1.0 / parts)
        imb = self.imbalance(half)  # each micro-batch waits for its own busiest rank
        bd: dict[str, float] = {}

        def add(d: dict, times: float) -> None:
            for k, v in d.items():
                bd[k] = bd.get(k, 0.0) + v * times

        dense = {k: v * parts for k, v in self.dense(half).items()}
        add(dense, m.first_dense)
        comp = {k: v * parts for k, v in self.moe_compute(half, imb).items()}
        comm = {k: v * parts for k, v in self.comm(half, imb).items()}
        add(comp, m.moe_layers)
        add(comm, m.moe_layers)
        c, x = sum(comp.values()), sum(comm.values())
        layer = c + x
        if tbo:
            ov = eff.overlap_rdma if self.pattern == Pattern.EXPERT else eff.overlap_sm
            layer = max(c, x) + (1.0 - ov) * min(c, x)
            bd["overlap_hidden"] = -(c + x - layer) * m.moe_layers
        bd["lm_head"] = gemm_time(lm_rows, m.vocab * m.hidden, m.hidden + m.vocab, self.gpu,
                                  self.s.precision.lm_head, eff)
        bd["step_overhead"] = eff.step_overhead_s
        total = sum(dense.values()) * m.first_dense + layer * m.moe_layers + bd["lm_head"] + eff.step_overhead_s
        return total, bd, imb


def _kv_bytes_per_token_layer(model: ModelShape, precision: Precision) -> float:
    return model.kv_elems_per_token() * KV_BYTES[precision.attention]


kv_bytes_per_token_layer = _kv_bytes_per_token_layer  # public: the KV handoff (planner/kv_handoff.py) sizes with it


def decode_step(model: ModelShape, hw: HardwareProfile, setup: Setup,
                eff: Efficiency = DEFAULT_EFFICIENCY) -> StepResult:
    """One decode step on one rank: batch_per_rank sequences, (1 + mtp_draft) query tokens each."""
    layers = _Layers(model, hw, setup, eff, setup.decode_pattern)
    b, q, ctx = setup.batch_per_rank, 1 + setup.mtp_draft, setup.context_len
    t = b * q
    kv = KV_BYTES[setup.precision.attention]
    # Queries of one sequence share its KV read; FLOPs scale with every query. DSA: top-k latents and every index key.
    flops, elems = model.attention_work(ctx, decode=True)
    state = model.state_traffic_bytes()  # linear-attention layers' recurrent state, per sequence
    ld = _Load(rows=t, attn_flops=t * flops, attn_bytes=b * (elems * kv + state), pool=t, comm=t, seqs=b)
    total, bd, imb = layers.forward(ld, lm_rows=t)
    if setup.mtp_draft:
        # Each draft token: one more decoder layer (MoE) and the LM head over the batch, no overlap.
        draft = _Load(rows=b, attn_flops=b * flops, attn_bytes=b * (elems * kv + state), pool=b, comm=b, seqs=b)
        one = layers.moe_compute(draft, layers.imbalance(draft))
        one.update(layers.comm(draft, layers.imbalance(draft)))
        mtp = (sum(one.values()) + gemm_time(b, model.vocab * model.hidden, model.hidden + model.vocab, hw.gpu,
                                             setup.precision.lm_head, eff)) * setup.mtp_draft
        bd["mtp_draft"] = mtp
        total += mtp
        if eff.spec is not None:  # how the engine runs them: eager drafts, the serial loop's host work
            extra = eff.spec.extra(setup.mtp_draft, b)
            bd.update(extra)
            total += sum(extra.values())
    per_seq = sum(setup.mtp_accept ** i for i in range(setup.mtp_draft + 1))
    return StepResult("decode", total, b * per_seq, bd, imb, tokens_per_seq=per_seq)


def prefill_chunk(model: ModelShape, hw: HardwareProfile, setup: Setup,
                  eff: Efficiency = DEFAULT_EFFICIENCY) -> StepResult:
    """One prefill forward of prefill_chunk tokens per rank (prompt tokens computed, cached prefix excluded).

    A prompt longer than the chunk runs as n = ceil(new / chunk) chunks; chunk j attends to the cached
    prefix and to the j chunks before it, which by then sit in the KV cache like a cached prefix. Attention
    FLOPs are the same as one causal pass; what chunking adds is re-reading that prefix, once per chunk,
    and for MLA its up-projection (below)."""
    layers = _Layers(model, hw, setup, eff, setup.prefill_pattern)
    t = setup.prefill_chunk
    new = setup.prompt_len - setup.cached_prefix
    seqs = t / new  # prompts per step (< 1: a chunk of one prompt)
    n = max(1, math.ceil(new / t))
    # Cached tokens each prompt's chunks read back, summed over its chunks: the cached prefix n times, and
    # chunk j's j earlier chunks (of new/n tokens each).
    reread = n * setup.cached_prefix + (new / n) * n * (n - 1) / 2.0
    keys = setup.cached_prefix + (new + 1) / 2.0  # causal: a token sees the prefix and half its prompt
    kv = _kv_bytes_per_token_layer(model, setup.precision)
    ld = _Load(rows=t, attn_flops=t * model.attention_work(keys, decode=False)[0],
               attn_bytes=(seqs * reread + t) * kv + seqs * model.state_traffic_bytes(), pool=t, comm=t, seqs=seqs)
    total, bd, imb = layers.forward(ld, lm_rows=seqs)
    if model.is_mla and reread:
        # MLA prefill attends in the uncompressed (MHA) form, so every cached token a chunk attends to
        # (cached prefix, earlier chunks of a long prompt) has its latent KV up-projected through kv_b
        # again for that chunk: a GEMM of `reread` rows per prompt, every layer.
        a = model.attention
        kv_b = a.kv_lora_rank * a.num_heads * (a.qk_nope_dim + a.v_dim)
        up = gemm_time(seqs * reread, kv_b, a.kv_lora_rank + a.num_heads * (a.qk_nope_dim + a.v_dim),
                       hw.gpu, "bf16", eff) * model.kv_attention_layers
        bd["prefix_kv_up"] = up
        total += up
    return StepResult("prefill", total, t, bd, imb)


def mixed_iteration(model: ModelShape, hw: HardwareProfile, setup: Setup, input_len: int, output_len: int,
                    max_num_tokens: int, eff: Efficiency = DEFAULT_EFFICIENCY) -> StepResult:
    """Aggregated serving in steady state (continuous batching, chunked prefill, attention DP).

    Each iteration a rank decodes batch_per_rank tokens; B/output_len requests
    finish and are replaced, adding B*input_len/output_len prompt tokens per rank
    on average. Prompts arrive whole, up to max_num_tokens - B per iteration, so
    the busiest rank usually carries a full chunk while the mean is far lower;
    attention is per rank, so every rank waits for it at the next MoE layer.
    Expected busiest-rank prefill: min(chunk, input_len) * (1 - exp(-lambda*ep)),
    lambda = B/output_len arrivals per rank per iteration. TensorRT-LLM measured
    this imbalance (tech blog 10, "ADP Balance Strategy": 54% mean balance
    ratio, 35% throughput lost without a balancing scheduler).
    """
    if input_len < 1 or output_len < 1:
        raise ValueError(f"input_len={input_len} and output_len={output_len} must be >= 1.")
    b = setup.batch_per_rank
    if max_num_tokens <= b:
        raise ValueError(f"max_num_tokens={max_num_tokens} must exceed batch_per_rank={b}.")
    layers = _Layers(model, hw, setup, eff, setup.decode_pattern)
    lam = b / output_len
    p_mean = lam * input_len
    p_max = max(p_mean, min(max_num_tokens - b, input_len) * (1.0 - math.exp(-lam * setup.ep)))
    ctx = input_len + output_len / 2.0
    kv = _kv_bytes_per_token_layer(model, setup.precision)
    ld = _Load(rows=b + p_max,
               attn_flops=b * model.attention_work(ctx, True)[0]
               + p_max * model.attention_work((input_len + 1) / 2.0, False)[0],
               attn_bytes=b * model.attention_work(ctx, True)[1] * KV_BYTES[setup.precision.attention] + p_max * kv
               + (b + lam) * model.state_traffic_bytes(),
               pool=b + p_mean, comm=b + p_max, seqs=b + lam)
    total, bd, imb = layers.forward(ld, lm_rows=b)
    return StepResult("mixed", total, b, bd, imb)


def weights_per_rank_bytes(model: ModelShape, setup: Setup) -> float:
    """Weights one rank holds: everything DP-replicated plus its share of routed-expert slots, matrix by
    matrix with weight_bytes (block scales and ragged edges included), as the engine counts its own.

    Formats: routed experts in precision.experts, shared experts in precision.shared, attention projections and
    dense FFNs in
    precision.dense; MLA's kv_b_proj (absorbed into other matmuls), embeddings and LM head in bf16; router
    gates in bf16, float32 for the DeepSeek family (MLA), which routes in float32. Norm vectors are left out."""
    p = setup.precision
    fmt = {"attn": p.dense, "dense": p.dense, "kv_b": "bf16", "shared": p.shared, "expert": p.experts,
           "router": "fp32" if model.is_mla else "bf16", "embed": "bf16", "hc": "fp32", "ngram": "bf16"}
    slots_per_expert = (model.num_experts + setup.redundant_experts) / setup.ep / model.num_experts
    total = 0.0
    for kind, rows, cols, count in model.weight_matrices():
        share = slots_per_expert if kind == "expert" else 1.0 / setup.attn_tp if kind in ("attn", "kv_b") else 1.0
        total += count * share * weight_bytes(fmt[kind], rows, cols)
    return total


def kv_budget_bytes(model: ModelShape, hw: HardwareProfile, setup: Setup, usable_fraction: float = 0.9,
                    reserve_gb: float = 8.0) -> float:
    """HBM one rank has for its KV cache beside the weights (may be negative: the weights do not fit).

    reserve_gb: activations, all-to-all buffers and CUDA graphs (DeepEP-style buffers are a few GB).
    """
    return hw.gpu.hbm_gb * 1e9 * usable_fraction - reserve_gb * 1e9 - weights_per_rank_bytes(model, setup)


def kv_bytes_per_sequence(model: ModelShape, setup: Setup, context_len: int) -> float:
    """One sequence's KV of `context_len` tokens on one GPU (its per-sequence state too)."""
    per_seq = (context_len * model.num_layers * _kv_bytes_per_token_layer(model, setup.precision)
               + model.state_bytes_per_sequence(KV_BYTES[setup.precision.attention]))  # V4's window and rows
    if model.is_mla:  # TP attention keeps the whole latent of the group's sequences on every GPU
        per_seq *= setup.attn_tp
    return per_seq


def max_batch_per_rank(model: ModelShape, hw: HardwareProfile, setup: Setup, context_len: int,
                       usable_fraction: float = 0.9, reserve_gb: float = 8.0) -> int:
    """Largest decode batch whose KV cache (context_len tokens per sequence) fits beside the weights
    (`kv_budget_bytes`)."""
    free = kv_budget_bytes(model, hw, setup, usable_fraction, reserve_gb)
    return max(0, int(free // kv_bytes_per_sequence(model, setup, context_len)))
