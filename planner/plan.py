"""Planning: predicted throughput per GPU for one layout, and the best EP size and batch under an ITL target.

Decode is planned per token-latency: a layout is admissible when its inter-token
latency (decode step time over tokens per sequence per step) is within the
target and its KV cache fits. Prefill has no latency target here; its best EP
size is the one with the highest input tokens/s per GPU at the given chunk.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .costs import cost_summary
from .efficiency import DEFAULT_EFFICIENCY, Efficiency
from .engines import EngineProfile, get_engine
from .hardware import HardwareProfile
from . import imbalance
from .imbalance import Balance
from .kernels import load_moe_measurements, measured_efficiency
from .models import ModelShape
from .kv_handoff import HOST_LINK_GBPS, handoff_cost
from .offload_tier import OffloadWorkload, chunks, tier_plan
from .step_model import (Precision, Setup, StepResult, decode_step, kv_budget_bytes, kv_bytes_per_sequence,
                         kv_bytes_per_token_layer, max_batch_per_rank, mixed_iteration, prefill_chunk,
                         weights_per_rank_bytes)

PRECISIONS = {
    "bf16": Precision(experts="bf16", dense="bf16", attention="bf16", dispatch="bf16"),
    "fp8": Precision(),
    # NVFP4 experts and dispatch, FP8 elsewhere (the Blackwell recipes of SGLang/TensorRT-LLM).
    "fp4": Precision(experts="nvfp4", dense="fp8", attention="fp8", dispatch="nvfp4"),
    # INT4 W4A16 routed experts (group-32 bf16 scales), everything else bf16: Kimi K2 Thinking / K2.5 as published
    # (shared experts, attention, dense layers bf16), bf16 dispatch (the activations are not quantized).
    "int4": Precision(experts="int4", dense="bf16", attention="bf16", dispatch="bf16", shared="bf16"),
    # MXFP4 W4A16 routed experts (an e8m0 scale per 32 values), FP8 block-scaled shared expert and attention
    # projections, bf16 dispatch: DeepSeek-V4-Flash / -Pro as published (engine/models/deepseek_v4/reader.py).
    "mxfp4": Precision(experts="mxfp4", dense="fp8", attention="bf16", dispatch="bf16", shared="fp8"),
}
BATCH_CANDIDATES = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


@dataclass(frozen=True)
class PlanInputs:
    """What the user asks about. overlap "auto" tries both and keeps the faster."""

    model: ModelShape
    hardware: HardwareProfile
    ep: int
    batch_per_rank: int = 128
    input_len: int = 2000
    output_len: int = 1000
    prefill_chunk: int = 16384
    itl_slo_ms: float = 50.0
    precision: str = "fp8"
    overlap: str = "auto"
    balance: "str | Balance" = "eplb"
    pattern: str = "rank"
    mtp_draft: int = 0
    mtp_accept: float = 0.0
    engine: str = "moelink"
    gpu_hour_usd: float | None = None  # None: the hardware profile's assumed price
    utilization: float = 1.0
    prefix_hit: float = 0.0
    redundant_experts: int | None = None  # None: the fewest that make EP divide the expert slots
    attn_tp: int = 1
    serving: str = "disaggregated"  # or "mixed": prefill and decode share every GPU (chunked prefill)
    max_num_tokens: int = 8192  # mixed serving: token budget per iteration per rank
    offload: OffloadWorkload = OffloadWorkload()  # the KV offload tiers and the prefix reuse they serve

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not supported: choose from {', '.join(PRECISIONS)}.")
        if self.overlap not in ("auto", "tbo", "none"):
            raise ValueError(f"overlap={self.overlap!r} is not supported: choose auto, tbo or none.")
        if self.itl_slo_ms <= 0:
            raise ValueError(f"itl_slo_ms={self.itl_slo_ms} must be > 0.")
        for name in ("ep", "batch_per_rank", "input_len", "output_len", "prefill_chunk", "attn_tp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
        if self.gpu_hour_usd is not None and self.gpu_hour_usd <= 0:
            raise ValueError(f"gpu_hour_usd={self.gpu_hour_usd} must be > 0.")
        if not 0 < self.utilization <= 1:
            raise ValueError(f"utilization={self.utilization} must be in (0, 1].")
        if not 0 <= self.prefix_hit < 1:
            raise ValueError(f"prefix_hit={self.prefix_hit} must be in [0, 1).")
        if self.serving not in ("disaggregated", "mixed"):
            raise ValueError(f"serving={self.serving!r} is not supported: choose disaggregated or mixed.")
        if self.serving == "mixed" and self.max_num_tokens <= self.batch_per_rank:
            raise ValueError(f"max_num_tokens={self.max_num_tokens} must exceed batch_per_rank={self.batch_per_rank} "
                             "for mixed serving.")
        if self.redundant_experts is not None and self.redundant_experts < 0:
            raise ValueError(f"redundant_experts={self.redundant_experts} must be >= 0.")
        self.engine_profile.check(precision=self.precision, pattern=self.pattern, mtp_draft=self.mtp_draft,
                                  attn_tp=self.attn_tp)

    @property
    def engine_profile(self) -> EngineProfile:
        return get_engine(self.engine, self.hardware.gpu.name)

    @property
    def cached_prefix(self) -> int:
        """Prompt tokens found in the prefix cache (prefill computes the rest)."""
        return min(int(round(self.input_len * self.prefix_hit)), self.input_len - 1)

    @property
    def context_len(self) -> int:
        """Mean KV length a decode step attends to over a request's life."""
        return self.input_len + self.output_len // 2


def balance_label(balance: "str | Balance") -> str:
    if isinstance(balance, Balance):
        return f"measured counts ({len(balance.counts)} experts)" if balance.kind == "counts" else balance.kind
    return str(balance)


def redundant_for(model: ModelShape, ep: int, asked: int | None = None) -> int:
    """Extra expert slots (EPLB replicas): `asked`, else the fewest that make `ep` divide the slot count.
    An asked number that leaves ranks with unequal slot counts is refused (the engine's placement is even)."""
    if asked is None:
        return (-model.num_experts) % ep
    if (model.num_experts + asked) % ep:
        raise ValueError(f"redundant_experts={asked}: {model.num_experts} + {asked} expert slots do not divide "
                         f"evenly over ep={ep}; use a number r with ({model.num_experts} + r) % {ep} == 0.")
    return asked


def kernel_source(inp: PlanInputs) -> dict:
    """Where the routed-expert kernel time comes from for this engine, GPU, model and precision."""
    m, prec = inp.model, PRECISIONS[inp.precision]
    if not inp.engine_profile.measured_kernels:
        return {"kind": "assumed", "text": "published engines' kernel efficiencies (efficiency.Efficiency)"}
    shape = (m.num_experts, m.top_k, m.hidden, m.moe_intermediate)
    on_gpu = load_moe_measurements(inp.hardware.gpu.name.split("-")[0])
    exact = [x for x in on_gpu if (x.num_experts, x.top_k, x.hidden, x.inter, x.dtype) == shape + (prec.experts,)]
    if exact:
        return {"kind": "measured", "measured": tuple(exact),
                "text": f"moelink's measured MoE times on {exact[0].device} ({exact[0].source})"}
    eff = measured_efficiency(load_moe_measurements(""), prec.experts, shape)
    if eff:
        return {"kind": "efficiency", "expert_eff": (eff[0], eff[1]),
                "text": f"moelink's measured {prec.experts} kernel efficiency ({eff[0]:.2f} of the matmul ceiling, "
                        f"{eff[1]:.2f} of copy bandwidth; {eff[2]}) on {inp.hardware.gpu.name}"}
    return {"kind": "assumed", "text": f"no moelink {prec.experts} kernel measurement: published efficiencies"}


def make_setup(inp: PlanInputs, ep: int, batch: int, overlap: str) -> Setup:
    src = kernel_source(inp)
    return Setup(ep=ep, batch_per_rank=batch, context_len=inp.context_len, prefill_chunk=inp.prefill_chunk,
                 prompt_len=inp.input_len, cached_prefix=inp.cached_prefix, precision=PRECISIONS[inp.precision],
                 overlap=overlap, decode_pattern=inp.pattern, prefill_pattern=inp.pattern,
                 balance=Balance.parse(inp.balance),
                 redundant_experts=redundant_for(inp.model, ep, inp.redundant_experts), mtp_draft=inp.mtp_draft,
                 mtp_accept=inp.mtp_accept, measured=src.get("measured", ()), expert_eff=src.get("expert_eff"),
                 attn_tp=inp.attn_tp)


def _best_overlap(fn, inp: PlanInputs, ep: int, batch: int, eff: Efficiency) -> tuple[StepResult, str]:
    eff = eff or inp.engine_profile.efficiency
    options = ("tbo", "none") if inp.overlap == "auto" else (inp.overlap,)
    results = [(fn(inp.model, inp.hardware, make_setup(inp, ep, batch, o), eff), o) for o in options]
    return min(results, key=lambda r: r[0].seconds)


def decode_at(inp: PlanInputs, ep: int, batch: int, eff: Efficiency | None = None) -> tuple[StepResult, str]:
    """One decode step; with mixed serving, one steady-state iteration that also prefills the prompts of
    the requests replacing finished ones (`step_model.mixed_iteration`)."""
    if inp.serving == "mixed":
        if batch >= inp.max_num_tokens:
            raise ValueError(f"batch_per_rank={batch} must be below max_num_tokens={inp.max_num_tokens}.")

        def mixed(model, hw, setup, e):
            return mixed_iteration(model, hw, setup, inp.input_len, inp.output_len, inp.max_num_tokens, e)

        return _best_overlap(mixed, inp, ep, batch, eff)
    return _best_overlap(decode_step, inp, ep, batch, eff)


def prefill_at(inp: PlanInputs, ep: int, eff: Efficiency | None = None) -> tuple[StepResult, str]:
    return _best_overlap(prefill_chunk, inp, ep, 1, eff)


def ep_candidates(model: ModelShape, hw: HardwareProfile, redundant: int | None = None) -> list[int]:
    """EP sizes worth trying: powers of two, multiples of 8 inside a large NVLink domain and
    multiples of the domain, up to the expert count and the profile's max_ep; sizes needing more
    than 1/8 extra expert slots are skipped; with a chosen number of redundant experts, only the
    sizes that divide the slots evenly."""
    out = set()
    domain = hw.fabric.domain_size
    for ep in ([2 ** i for i in range(0, 9)] + list(range(8, domain + 1, 8)) + [domain * k for k in (1, 2, 4)]):
        if not 1 <= ep <= min(hw.max_ep, model.num_experts):
            continue
        if redundant is None and redundant_for(model, ep) <= model.num_experts // 8:
            out.add(ep)
        elif redundant is not None and (model.num_experts + redundant) % ep == 0:
            out.add(ep)
    return sorted(out)


def fits(inp: PlanInputs, ep: int, batch: int) -> bool:
    """Weights of this EP share plus the KV cache of `batch` sequences fit in HBM."""
    setup = make_setup(inp, ep, batch, "none")
    return batch <= max_batch_per_rank(inp.model, inp.hardware, setup, inp.input_len + inp.output_len)


def best_decode_for_ep(inp: PlanInputs, ep: int, eff: Efficiency | None = None) -> dict | None:
    """Largest-throughput batch at this EP size meeting the ITL target and fitting in memory."""
    best = None
    for batch in BATCH_CANDIDATES:
        if not fits(inp, ep, batch) or (inp.serving == "mixed" and batch >= inp.max_num_tokens):
            break
        res, ov = decode_at(inp, ep, batch, eff)
        if res.itl_s * 1e3 > inp.itl_slo_ms:
            continue
        if best is None or res.tokens_per_s > best["tokens_per_s_per_gpu"]:
            best = {"ep": ep, "batch_per_rank": batch, "overlap": ov, "tokens_per_s_per_gpu": res.tokens_per_s,
                    "itl_ms": res.itl_s * 1e3, "tokens_per_s_per_user": 1.0 / res.itl_s}
    return best


def sweep(inp: PlanInputs, eff: Efficiency | None = None) -> list[dict]:
    """Per candidate EP size: best decode under the ITL target, and prefill tokens/s per GPU."""
    rows = []
    for ep in ep_candidates(inp.model, inp.hardware, inp.redundant_experts):
        dec = best_decode_for_ep(inp, ep, eff)
        weights_fit = fits(inp, ep, 1)
        pre = prefill_at(inp, ep, eff)[0].tokens_per_s if weights_fit else None
        rows.append({"ep": ep, "decode": dec, "prefill_tokens_per_s_per_gpu": pre})
    return rows


def _breakdown_ms(res: StepResult) -> dict:
    return {k: round(v * 1e3, 3) for k, v in res.breakdown.items()}


def plan(inp: PlanInputs, eff: Efficiency | None = None) -> dict:
    """Everything `moelink plan` prints, as a JSON-ready dict."""
    hw, model = inp.hardware, inp.model
    eff = eff or inp.engine_profile.efficiency
    dec, dec_ov = decode_at(inp, inp.ep, inp.batch_per_rank, eff)
    pre, pre_ov = prefill_at(inp, inp.ep, eff)
    setup = make_setup(inp, inp.ep, inp.batch_per_rank, dec_ov)
    rows = sweep(inp, eff)
    feasible = [r for r in rows if r["decode"]]
    best_dec = max(feasible, key=lambda r: r["decode"]["tokens_per_s_per_gpu"])["decode"] if feasible else None
    pre_rows = [r for r in rows if r["prefill_tokens_per_s_per_gpu"]]
    best_pre = max(pre_rows, key=lambda r: r["prefill_tokens_per_s_per_gpu"]) if pre_rows else None
    handoff = None
    if inp.serving == "disaggregated":
        handoff = handoff_cost(model.num_layers * kv_bytes_per_token_layer(model, setup.precision), inp.input_len, hw,
                               num_layers=model.num_layers)
    return {
        "model": model.name, "hardware": hw.name, "hardware_description": hw.description,
        "inputs": {"ep": inp.ep, "batch_per_rank": inp.batch_per_rank, "input_len": inp.input_len,
                   "output_len": inp.output_len, "prefill_chunk": inp.prefill_chunk, "itl_slo_ms": inp.itl_slo_ms,
                   "precision": inp.precision, "overlap": inp.overlap, "balance": balance_label(inp.balance),
                   "pattern": inp.pattern, "mtp_draft": inp.mtp_draft, "mtp_accept": inp.mtp_accept,
                   "engine": inp.engine, "prefix_hit": inp.prefix_hit, "attn_tp": inp.attn_tp,
                   "redundant_experts": setup.redundant_experts, "serving": inp.serving,
                   "max_num_tokens": inp.max_num_tokens, "kv_offload_host_bytes": inp.offload.host_bytes,
                   "kv_offload_disk_bytes": inp.offload.disk_bytes, "prefix_reuse": inp.offload.prefix_reuse,
                   "distinct_prefixes": inp.offload.distinct_prefixes},
        "engine": engine_summary(inp, setup, (dec_ov, pre_ov)),
        "assumptions": assumptions(inp, setup),
        "memory": {"weights_per_rank_gb": round(weights_per_rank_bytes(model, setup) / 1e9, 2),
                   "max_batch_per_rank": max_batch_per_rank(model, hw, setup, inp.input_len + inp.output_len)},
        "decode": {"overlap": dec_ov, "step_ms": dec.seconds * 1e3, "itl_ms": dec.itl_s * 1e3,
                   "tokens_per_s_per_gpu": dec.tokens_per_s, "tokens_per_s_per_user": 1.0 / dec.itl_s,
                   "expert_imbalance": dec.imbalance, "breakdown_ms": _breakdown_ms(dec)},
        "prefill": {"overlap": pre_ov, "chunk_ms": pre.seconds * 1e3, "tokens_per_s_per_gpu": pre.tokens_per_s,
                    "expert_imbalance": pre.imbalance, "breakdown_ms": _breakdown_ms(pre)},
        "best_decode_under_slo": best_dec,
        "best_prefill": {"ep": best_pre["ep"], "tokens_per_s_per_gpu": best_pre["prefill_tokens_per_s_per_gpu"]}
        if best_pre else None,
        "kv_handoff": handoff_summary(inp, setup, pre, dec, handoff),
        "kv_offload": offload_summary(inp, setup, eff),
        "cost": cost_summary(inp, best_dec, best_pre["prefill_tokens_per_s_per_gpu"] if best_pre else None, handoff),
        "sweep": rows,
    }


def handoff_summary(inp: PlanInputs, setup: Setup, pre, dec, handoff) -> dict | None:
    """Disaggregated serving: the KV handoff (planner/kv_handoff.py) and time-to-first-token split into the
    prompt's prefill on one rank, the handoff, and the first decode step."""
    if handoff is None:
        return None
    computed = inp.input_len - inp.cached_prefix
    prefill_s = -(-computed // inp.prefill_chunk) * pre.seconds
    return {**handoff.to_dict(), "ttft_prefill_ms": prefill_s * 1e3, "ttft_first_decode_ms": dec.itl_s * 1e3,
            "ttft_ms": (prefill_s + handoff.ttft_s + dec.itl_s) * 1e3,
            "handoff_share_of_ttft": handoff.ttft_s / (prefill_s + handoff.ttft_s + dec.itl_s)}


def offload_summary(inp: PlanInputs, setup: Setup, eff: Efficiency) -> dict | None:
    """The KV offload tiers (planner/offload_tier.py) for this plan's rank: the device's room for cached prefixes
    beside the running batch, and recomputing the reused prefix priced as its own prefill on one rank."""
    w, model, hw = inp.offload, inp.model, inp.hardware
    if not w.on:
        return None
    prefix = w.prefix_tokens(inp.input_len)
    per_token = kv_bytes_per_sequence(model, setup, 1) - kv_bytes_per_sequence(model, setup, 0)  # state excluded
    device = (kv_budget_bytes(model, hw, setup)
              - inp.batch_per_rank * kv_bytes_per_sequence(model, setup, inp.input_len + inp.output_len))
    recompute = 0.0
    if prefix:
        chunk = min(inp.prefill_chunk, prefix)
        alone = replace(inp, input_len=prefix, prefix_hit=0.0, prefill_chunk=chunk, offload=OffloadWorkload())
        recompute = chunks(prefix, chunk) * prefill_at(alone, inp.ep, eff)[0].seconds
    out = tier_plan(w, prefix, per_token, device, HOST_LINK_GBPS[hw.gpu.name], recompute)
    # Prompt tokens not computed, all tiers together: what --prefix-hit prices in prefill GPU-seconds and dollars.
    out["prompt_tokens_cached_share"] = prefix / inp.input_len * (1.0 - out["recomputed_share"])
    return out


def features_used(inp: PlanInputs, setup: Setup, overlaps: tuple[str, ...]) -> dict[str, bool]:
    """Which tagged engine features this plan's prediction leans on (untagged ones: always)."""
    return {"rank": inp.pattern == "rank" and inp.ep > 1, "ep": inp.ep > 1, "tbo": "tbo" in overlaps,
            "node": inp.pattern == "node", "fp8_kv": setup.precision.attention == "fp8",
            "redundant": setup.redundant_experts > 0, "fp4": setup.precision.experts == "nvfp4",
            "int4": setup.precision.experts == "int4", "mxfp4": setup.precision.experts == "mxfp4", "mtp": inp.mtp_draft > 0, "attn_tp": inp.attn_tp > 1}


def engine_summary(inp: PlanInputs, setup: Setup | None = None, overlaps: tuple[str, ...] = ()) -> dict:
    e = inp.engine_profile
    used = features_used(inp, setup or make_setup(inp, inp.ep, inp.batch_per_rank, "none"), overlaps)
    return {"name": e.name, "description": e.description, "kernels": kernel_source(inp)["text"],
            "features": [{"feature": f.name, "status": f.status, "evidence": f.evidence,
                          "used": used.get(f.tag, True) if f.tag else True} for f in e.features]}


def assumptions(inp: PlanInputs, setup: Setup) -> list[str]:
    """Every assumption a prediction rests on, in words (printed with it)."""
    e, hw = inp.engine_profile, inp.hardware
    eff = e.efficiency
    out = [f"engine {e.name}: {e.description}",
           f"routed experts: {kernel_source(inp)['text']}",
           f"other GEMMs at {eff.gemm:.2f} of the measured matmul ceiling, attention at {eff.attention:.2f}, "
           f"HBM streams at {eff.memory:.2f} of copy bandwidth ({hw.gpu.name}: {hw.gpu.matmul_fraction:.2f} of "
           f"datasheet matmul, {hw.gpu.copy_fraction:.2f} of datasheet HBM)",
           f"two-batch overlap hides {eff.overlap_sm:.2f} of the shorter of compute/communication "
           f"({eff.overlap_rdma:.2f} with RDMA-only all-to-all)",
           f"fixed costs: {eff.layer_overhead_s * 1e6:.0f} us per layer; per step {e.step_cost_note}",
           f"expert load: {balance_label(inp.balance)}; {setup.redundant_experts} redundant expert slots"
           + (f"; real traffic: per-sequence expert-share cv {imbalance.SEQUENCE_CV:g} (fitted on SGLang's EPLB "
              f"ablation), per-expert long-run cv {setup.balance.systematic_cv():g} left "
              + ("after EPLB (assumed)" if setup.balance.kind == "eplb" else "without rebalancing (assumed)")
              if setup.balance.real_traffic() else ""),
           f"links: {hw.fabric.intra.name} {hw.fabric.intra.bw_gbps:g} GB/s/dir inside {hw.fabric.domain_size} GPUs, "
           f"{hw.fabric.inter.name} {hw.fabric.inter.bw_gbps:g} GB/s/dir between, at {hw.fabric.intra.efficiency:.2f}",
           f"prefix-cache hit rate {inp.prefix_hit:.0%} ({inp.cached_prefix} of {inp.input_len} prompt tokens cached)",
           f"attention: {'tensor-parallel over ' + str(inp.attn_tp) + ' GPUs' if inp.attn_tp > 1 else 'data-parallel'}"]
    if inp.offload.on:
        out.append(f"KV offload: each prompt's first {inp.offload.prefix_reuse:.0%} is one of "
                   f"{inp.offload.distinct_prefixes} shared prefixes drawn uniformly, LRU tiers found with probability "
                   f"min(1, held / working set); disk read at {inp.offload.disk_gbps:g} GB/s per GPU (assumed); a "
                   f"router sends a prefix to the rank holding it")
    if inp.mtp_draft:
        out.append(f"MTP: {inp.mtp_draft} draft tokens, each accepted with probability {inp.mtp_accept:g}")
    return out


def with_hardware(inp: PlanInputs, hw: HardwareProfile) -> PlanInputs:
    """The same question on other hardware (EP clipped to what it can hold)."""
    return replace(inp, hardware=hw, ep=min(inp.ep, hw.max_ep))
