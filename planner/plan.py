"""Planning: predicted throughput per GPU for one layout, and the best EP size and batch under an ITL target.

Decode is planned per token-latency: a layout is admissible when its inter-token
latency (decode step time over tokens per sequence per step) is within the
target and its KV cache fits. Prefill has no latency target here; its best EP
size is the one with the highest input tokens/s per GPU at the given chunk.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .efficiency import DEFAULT_EFFICIENCY, Efficiency
from .hardware import HardwareProfile
from .imbalance import Balance
from .kernels import load_moe_measurements
from .models import ModelShape
from .step_model import (Precision, Setup, StepResult, decode_step, max_batch_per_rank, prefill_chunk,
                         weights_per_rank_bytes)

PRECISIONS = {
    "bf16": Precision(experts="bf16", dense="bf16", attention="bf16", dispatch="bf16"),
    "fp8": Precision(),
    # NVFP4 experts and dispatch, FP8 elsewhere (the Blackwell recipes of SGLang/TensorRT-LLM).
    "fp4": Precision(experts="nvfp4", dense="fp8", attention="fp8", dispatch="nvfp4"),
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

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not supported: choose from {', '.join(PRECISIONS)}.")
        if self.overlap not in ("auto", "tbo", "none"):
            raise ValueError(f"overlap={self.overlap!r} is not supported: choose auto, tbo or none.")
        if self.itl_slo_ms <= 0:
            raise ValueError(f"itl_slo_ms={self.itl_slo_ms} must be > 0.")
        for name in ("ep", "batch_per_rank", "input_len", "output_len", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")

    @property
    def context_len(self) -> int:
        """Mean KV length a decode step attends to over a request's life."""
        return self.input_len + self.output_len // 2


def balance_label(balance: "str | Balance") -> str:
    if isinstance(balance, Balance):
        return f"measured counts ({len(balance.counts)} experts)" if balance.kind == "counts" else balance.kind
    return str(balance)


def redundant_for(model: ModelShape, ep: int) -> int:
    """Fewest extra expert slots (EPLB replicas) that make `ep` divide the slot count."""
    return (-model.num_experts) % ep


def make_setup(inp: PlanInputs, ep: int, batch: int, overlap: str) -> Setup:
    measured = tuple(load_moe_measurements(inp.hardware.gpu.name.split("-")[0]))
    return Setup(ep=ep, batch_per_rank=batch, context_len=inp.context_len, prefill_chunk=inp.prefill_chunk,
                 prompt_len=inp.input_len, precision=PRECISIONS[inp.precision], overlap=overlap,
                 decode_pattern=inp.pattern, prefill_pattern=inp.pattern, balance=Balance.parse(inp.balance),
                 redundant_experts=redundant_for(inp.model, ep), mtp_draft=inp.mtp_draft,
                 mtp_accept=inp.mtp_accept, measured=measured)


def _best_overlap(fn, inp: PlanInputs, ep: int, batch: int, eff: Efficiency) -> tuple[StepResult, str]:
    options = ("tbo", "none") if inp.overlap == "auto" else (inp.overlap,)
    results = [(fn(inp.model, inp.hardware, make_setup(inp, ep, batch, o), eff), o) for o in options]
    return min(results, key=lambda r: r[0].seconds)


def decode_at(inp: PlanInputs, ep: int, batch: int, eff: Efficiency = DEFAULT_EFFICIENCY) -> tuple[StepResult, str]:
    return _best_overlap(decode_step, inp, ep, batch, eff)


def prefill_at(inp: PlanInputs, ep: int, eff: Efficiency = DEFAULT_EFFICIENCY) -> tuple[StepResult, str]:
    return _best_overlap(prefill_chunk, inp, ep, 1, eff)


def ep_candidates(model: ModelShape, hw: HardwareProfile) -> list[int]:
    """EP sizes worth trying: powers of two, multiples of 8 inside a large NVLink domain and
    multiples of the domain, up to the expert count and the profile's max_ep; sizes needing more
    than 1/8 extra expert slots are skipped."""
    out = set()
    domain = hw.fabric.domain_size
    for ep in ([2 ** i for i in range(0, 9)] + list(range(8, domain + 1, 8)) + [domain * k for k in (1, 2, 4)]):
        if 1 <= ep <= min(hw.max_ep, model.num_experts) and redundant_for(model, ep) <= model.num_experts // 8:
            out.add(ep)
    return sorted(out)


def fits(inp: PlanInputs, ep: int, batch: int) -> bool:
    """Weights of this EP share plus the KV cache of `batch` sequences fit in HBM."""
    setup = make_setup(inp, ep, batch, "none")
    return batch <= max_batch_per_rank(inp.model, inp.hardware, setup, inp.input_len + inp.output_len)


def best_decode_for_ep(inp: PlanInputs, ep: int, eff: Efficiency = DEFAULT_EFFICIENCY) -> dict | None:
    """Largest-throughput batch at this EP size meeting the ITL target and fitting in memory."""
    best = None
    for batch in BATCH_CANDIDATES:
        if not fits(inp, ep, batch):
            break
        res, ov = decode_at(inp, ep, batch, eff)
        if res.itl_s * 1e3 > inp.itl_slo_ms:
            continue
        if best is None or res.tokens_per_s > best["tokens_per_s_per_gpu"]:
            best = {"ep": ep, "batch_per_rank": batch, "overlap": ov, "tokens_per_s_per_gpu": res.tokens_per_s,
                    "itl_ms": res.itl_s * 1e3, "tokens_per_s_per_user": 1.0 / res.itl_s}
    return best


def sweep(inp: PlanInputs, eff: Efficiency = DEFAULT_EFFICIENCY) -> list[dict]:
    """Per candidate EP size: best decode under the ITL target, and prefill tokens/s per GPU."""
    rows = []
    for ep in ep_candidates(inp.model, inp.hardware):
        dec = best_decode_for_ep(inp, ep, eff)
        weights_fit = fits(inp, ep, 1)
        pre = prefill_at(inp, ep, eff)[0].tokens_per_s if weights_fit else None
        rows.append({"ep": ep, "decode": dec, "prefill_tokens_per_s_per_gpu": pre})
    return rows


def _breakdown_ms(res: StepResult) -> dict:
    return {k: round(v * 1e3, 3) for k, v in res.breakdown.items()}


def plan(inp: PlanInputs, eff: Efficiency = DEFAULT_EFFICIENCY) -> dict:
    """Everything `moelink plan` prints, as a JSON-ready dict."""
    hw, model = inp.hardware, inp.model
    dec, dec_ov = decode_at(inp, inp.ep, inp.batch_per_rank, eff)
    pre, pre_ov = prefill_at(inp, inp.ep, eff)
    setup = make_setup(inp, inp.ep, inp.batch_per_rank, dec_ov)
    rows = sweep(inp, eff)
    feasible = [r for r in rows if r["decode"]]
    best_dec = max(feasible, key=lambda r: r["decode"]["tokens_per_s_per_gpu"])["decode"] if feasible else None
    pre_rows = [r for r in rows if r["prefill_tokens_per_s_per_gpu"]]
    best_pre = max(pre_rows, key=lambda r: r["prefill_tokens_per_s_per_gpu"]) if pre_rows else None
    return {
        "model": model.name, "hardware": hw.name, "hardware_description": hw.description,
        "inputs": {"ep": inp.ep, "batch_per_rank": inp.batch_per_rank, "input_len": inp.input_len,
                   "output_len": inp.output_len, "prefill_chunk": inp.prefill_chunk, "itl_slo_ms": inp.itl_slo_ms,
                   "precision": inp.precision, "overlap": inp.overlap, "balance": balance_label(inp.balance),
                   "pattern": inp.pattern, "mtp_draft": inp.mtp_draft, "mtp_accept": inp.mtp_accept},
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
        "sweep": rows,
    }


def with_hardware(inp: PlanInputs, hw: HardwareProfile) -> PlanInputs:
    """The same question on other hardware (EP clipped to what it can hold)."""
    return replace(inp, hardware=hw, ep=min(inp.ep, hw.max_ep))
