"""Dollars per token from predicted throughput: the price of a GPU-hour over the tokens it serves.

    $/M output tokens = gpu_hour_usd / (3600 * decode tok/s/GPU * utilization) * 1e6
    $/M input tokens  = gpu_hour_usd * (1 - prefix_hit) / (3600 * prefill tok/s/GPU * utilization) * 1e6

(prefill tok/s counts computed tokens: cached prefix tokens cost nothing here.) A request of ISL input
and OSL output tokens costs, in GPU-seconds,

    ISL * (1 - prefix_hit) / prefill rate + OSL / decode rate,

and a disaggregated deployment balances its pools with prefill:decode GPUs in the ratio of those two
terms. `utilization` is the average fraction of capacity the fleet serves (1.0: priced at capacity; a
fleet sized for peak traffic runs lower). Every price is an assumption (hardware.GPU_HOUR_USD) that
`--gpu-hour-usd` overrides.
"""
from __future__ import annotations


def usd_per_million(tokens_per_s_per_gpu: float, gpu_hour_usd: float, utilization: float = 1.0) -> float:
    """Dollars per million tokens served at `tokens_per_s_per_gpu` by GPUs rented at `gpu_hour_usd`."""
    if tokens_per_s_per_gpu <= 0:
        raise ValueError(f"tokens_per_s_per_gpu={tokens_per_s_per_gpu} must be > 0.")
    if gpu_hour_usd <= 0:
        raise ValueError(f"gpu_hour_usd={gpu_hour_usd} must be > 0.")
    if not 0 < utilization <= 1:
        raise ValueError(f"utilization={utilization} must be in (0, 1].")
    return gpu_hour_usd / 3600.0 / (tokens_per_s_per_gpu * utilization) * 1e6


def request_gpu_seconds(input_len: int, output_len: int, prefill_tps: float, decode_tps: float,
                        prefix_hit: float = 0.0) -> tuple[float, float]:
    """(prefill, decode) GPU-seconds one request costs: ISL(1-hit)/prefill rate and OSL/decode rate."""
    if prefill_tps <= 0 or decode_tps <= 0:
        raise ValueError(f"prefill_tps={prefill_tps} and decode_tps={decode_tps} must be > 0.")
    if not 0 <= prefix_hit < 1:
        raise ValueError(f"prefix_hit={prefix_hit} must be in [0, 1).")
    return input_len * (1.0 - prefix_hit) / prefill_tps, output_len / decode_tps


def cost_summary(inp, best_decode: dict | None, prefill_tps: float | None, handoff=None) -> dict | None:
    """The cost block of a plan: at the best decode point under the ITL target and the best prefill EP.
    `inp` is a plan.PlanInputs. None when no decode layout meets the target or no prefill fits. `handoff`
    (planner/kv_handoff.py, disaggregated serving): its device-host copies hold the prefill and decode GPUs."""
    price = inp.gpu_hour_usd if inp.gpu_hour_usd is not None else inp.hardware.gpu_hour_usd
    out = {"gpu_hour_usd": price, "price_source": "--gpu-hour-usd" if inp.gpu_hour_usd is not None
           else f"assumed for {inp.hardware.gpu.name} (planner/hardware.py GPU_HOUR_USD)",
           "utilization": inp.utilization, "prefix_hit": inp.prefix_hit}
    if not best_decode or not prefill_tps:
        return {**out, "usd_per_m_output": None, "usd_per_m_input": None}
    dec_tps = best_decode["tokens_per_s_per_gpu"]
    if inp.serving == "mixed":  # every GPU prefills and decodes: the output price carries the prompts too
        usd = usd_per_million(dec_tps, price, inp.utilization)
        return {**out, "usd_per_m_output": usd, "usd_per_m_input": 0.0, "gpu_seconds_per_request":
                inp.output_len / dec_tps, "usd_per_request": usd * inp.output_len / 1e6,
                "usd_per_m_output_all_gpus": usd, "prefill_to_decode_gpus": 0.0,
                "note": "mixed serving: prompts are processed on the same GPUs, priced into output tokens"}
    pre_s, dec_s = request_gpu_seconds(inp.input_len, inp.output_len, prefill_tps, dec_tps, inp.prefix_hit)
    if handoff is not None:
        pre_s, dec_s = pre_s + handoff.gather_s, dec_s + handoff.gather_s  # the copies run beside the steps
    per_request = (pre_s + dec_s) / inp.utilization * price / 3600.0
    return {**out,
            "usd_per_m_output": usd_per_million(dec_tps, price, inp.utilization),
            "usd_per_m_input": usd_per_million(prefill_tps, price, inp.utilization) * (1.0 - inp.prefix_hit),
            "gpu_seconds_per_request": pre_s + dec_s,
            "usd_per_request": per_request,
            "usd_per_m_output_all_gpus": per_request / inp.output_len * 1e6,
            "prefill_to_decode_gpus": pre_s / dec_s}
