"""Text reports of `moelink plan`: one layout in detail, a hardware comparison, the calibration table."""
from __future__ import annotations

from .calibration import TOLERANCE, VALIDATION_MAE, Result, format_table, summary
from .offload_tier import format_offload


def _bd(breakdown: dict) -> str:
    items = sorted(((k, v) for k, v in breakdown.items() if abs(v) >= 0.05), key=lambda kv: -abs(kv[1]))
    return " | ".join(f"{k} {v:,.1f}" for k, v in items)


def format_plan(res: dict) -> str:
    """Human-readable plan for one hardware profile."""
    i, d, p, m = res["inputs"], res["decode"], res["prefill"], res["memory"]
    fits = m["max_batch_per_rank"] >= i["batch_per_rank"]
    lines = [f"{res['model']} on {res['hardware']} ({res['hardware_description']})"] + format_answer(res) + [
        _setup_heading(res.get("setup", "asked"), fits) + ":",
        f"EP {i['ep']}, decode batch {i['batch_per_rank']}/rank, input {i['input_len']}, output {i['output_len']}, "
        f"prefill chunk {i['prefill_chunk']}/rank, precision {i['precision']}, dispatch once per {i['pattern']}, "
        f"balance {i['balance']}" + (f", MTP {i['mtp_draft']} @ {i['mtp_accept']:.2f}" if i["mtp_draft"] else ""),
        f"memory: weights {m['weights_per_rank_gb']:.1f} GB/rank; KV fits {m['max_batch_per_rank']} sequences/rank "
        f"at {i['input_len'] + i['output_len']} tokens",
    ]
    if not fits and res.get("setup", "asked") == "asked":
        lines.append(f"  DOES NOT FIT: batch {i['batch_per_rank']}/rank needs more KV than EP {i['ep']} leaves "
                     f"({m['max_batch_per_rank']} sequences/rank); timing shown anyway")
    lines += [
        f"decode : {d['tokens_per_s_per_gpu']:>9,.0f} output tok/s/GPU  step {d['step_ms']:.1f} ms, ITL "
        f"{d['itl_ms']:.1f} ms ({d['tokens_per_s_per_user']:.1f} tok/s/user), overlap {d['overlap']}, "
        f"expert imbalance {d['expert_imbalance']:.2f}",
        f"         ms/step: {_bd(d['breakdown_ms'])}",
        f"prefill: {p['tokens_per_s_per_gpu']:>9,.0f} input tok/s/GPU   chunk {p['chunk_ms']:.1f} ms, overlap "
        f"{p['overlap']}, expert imbalance {p['expert_imbalance']:.2f}",
        f"         ms/chunk: {_bd(p['breakdown_ms'])}",
    ]
    b, bp = res["best_decode_under_slo"], res["best_prefill"]
    if b:
        lines.append(f"best decode with ITL <= {i['itl_slo_ms']:g} ms: EP {b['ep']}, batch {b['batch_per_rank']}/rank, "
                     f"{b['tokens_per_s_per_gpu']:,.0f} tok/s/GPU ({b['tokens_per_s_per_user']:.1f} tok/s/user, "
                     f"overlap {b['overlap']})")
    else:
        lines.append(f"best decode with ITL <= {i['itl_slo_ms']:g} ms: no EP size/batch meets it")
    if bp:
        lines.append(f"best prefill: EP {bp['ep']}, {bp['tokens_per_s_per_gpu']:,.0f} tok/s/GPU")
    lines += format_handoff(res)
    lines += format_offload(res)
    lines += format_cost(res)
    lines += format_assumptions(res)
    lines.append("EP sweep:  EP | decode batch | decode tok/s/GPU | ITL ms | prefill tok/s/GPU")
    for r in res["sweep"]:
        dd, pre = r["decode"], r["prefill_tokens_per_s_per_gpu"]
        dec_txt = (f"{dd['batch_per_rank']:>12} | {dd['tokens_per_s_per_gpu']:>16,.0f} | {dd['itl_ms']:>6.1f}"
                   if dd else f"{'-':>12} | {'does not fit / ITL':>16} | {'-':>6}")
        lines.append(f"         {r['ep']:>3} | {dec_txt} | {pre:>17,.0f}" if pre else
                     f"         {r['ep']:>3} | {dec_txt} | {'does not fit':>17}")
    return "\n".join(lines)


def _setup_heading(shown: str, fits: bool) -> str:
    """What the detailed block is: the setup asked for (--ep / --batch-per-rank), else the best setup that fits
    (plan_cli.plan_shown), else the defaults (nothing fits). Only a setup the user asked for is headlined as not
    fitting: defaults nobody asked for are no setup to warn about."""
    if shown == "best":
        return "the best setup that fits, in detail (pass --ep / --batch-per-rank for another)"
    if shown == "defaults":
        return ("the defaults, in detail (no setup fits the ITL target; pass --ep / --batch-per-rank for another)"
                + ("" if fits else ", hypothetical: their KV does not fit"))
    return "the setup asked for" if fits else "the setup asked for (DOES NOT FIT: details below are hypothetical)"


def format_answer(res: dict) -> list[str]:
    """The first screen's answer: the best setup that fits (decode under the ITL target, prefill) and its price,
    before the setup asked for, which may not fit (issue 48: the first block was a setup that did not fit while
    the $/M line below it belonged to another)."""
    i, b, bp, c = res["inputs"], res["best_decode_under_slo"], res["best_prefill"], res.get("cost") or {}
    if not b or not bp:
        why = "no EP size/batch meets the ITL target" if not b else "no EP size fits the prompt's prefill"
        return [f"BEST SETUP THAT FITS: none ({why} at ITL <= {i['itl_slo_ms']:g} ms): no price"]
    lines = [f"BEST SETUP THAT FITS (ITL <= {i['itl_slo_ms']:g} ms): decode EP {b['ep']} x batch "
             f"{b['batch_per_rank']}/rank, {b['tokens_per_s_per_gpu']:,.0f} output tok/s/GPU, ITL {b['itl_ms']:.1f} ms; "
             f"prefill EP {bp['ep']}, {bp['tokens_per_s_per_gpu']:,.0f} input tok/s/GPU"]
    if c.get("usd_per_m_output") is not None:
        lines.append(f"  ${c['usd_per_m_output']:.3f} per M output tokens, ${c['usd_per_m_input']:.3f} per M input "
                     f"tokens at ${c['gpu_hour_usd']:.2f}/GPU-hour (this setup; cost block below)")
    return lines


def format_comparison(results: dict) -> str:
    """One line per hardware: best decode under the ITL target and best prefill, per GPU."""
    first = next(iter(results.values()))
    i = first["inputs"]
    lines = [f"{first['model']}: input {i['input_len']}, output {i['output_len']}, precision {i['precision']}, "
             f"ITL <= {i['itl_slo_ms']:g} ms, dispatch once per {i['pattern']}, balance {i['balance']}",
             "| hardware | decode EP | batch/GPU | decode tok/s/GPU | tok/s/user | prefill EP | prefill tok/s/GPU "
             "| $/GPU-h | $/M output | $/M input | prefill:decode GPUs |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for hw, res in results.items():
        b, bp = res["best_decode_under_slo"], res["best_prefill"]
        dec = (f"{b['ep']} | {b['batch_per_rank']} | {b['tokens_per_s_per_gpu']:,.0f} | {b['tokens_per_s_per_user']:.1f}"
               if b else "- | - | - | -")
        pre = f"{bp['ep']} | {bp['tokens_per_s_per_gpu']:,.0f}" if bp else "- | -"
        c = res.get("cost") or {}
        cost = (f"{c['gpu_hour_usd']:.2f} | {c['usd_per_m_output']:.3f} | {c['usd_per_m_input']:.3f} | "
                f"{c['prefill_to_decode_gpus']:.2f}" if c.get("usd_per_m_output") is not None else "- | - | - | -")
        lines.append(f"| {hw} | {dec} | {pre} | {cost} |")
    return "\n".join(lines)


def format_calibration(results: list[Result]) -> str:
    bad = [r for r in results if not r.ok]
    mean_abs = sum(abs(r.error) for r in results) / len(results)
    summary_line = (f"{len(results)} published results, mean |error| {mean_abs:.1%}, "
                    + ("all within ±{:.0%}".format(TOLERANCE) if not bad else f"{len(bad)} outside ±{TOLERANCE:.0%}"))
    per_split = [f"{split}: {s['rows']} rows, mean |error| {s['mean_abs_error']:.1%}, worst {s['max_abs_error']:.1%}"
                 + (f" (validation target <= {VALIDATION_MAE:.0%})" if split == "validation" else "")
                 for split, s in summary(results).items()]
    notes = [f"- {r.row.id} [{r.row.split}]: {r.row.source}" + (f"; assumed: {r.row.assumed}" if r.row.assumed else "")
             + (f"; note: {r.row.note}" if r.row.note else "") for r in results]
    return "\n".join([format_table(results), "", summary_line] + per_split + ["", "Sources and assumptions:"] + notes)


def format_handoff(res: dict) -> list[str]:
    """Disaggregated serving: the KV handoff per request and the time-to-first-token it is part of."""
    h = res.get("kv_handoff")
    if not h:
        return []
    return [f"KV handoff: {h['bytes_per_request'] / 2**20:,.1f} MiB per request; save {h['save_ms']:.1f} ms, wire "
            f"{h['wire_ms']:.1f} ms ({h['transport_gbps']:.2f} GB/s: {h['transport_source']}) with the load "
            f"({h['load_ms']:.1f} ms) pipelined behind it layer by layer: {h['ttft_added_ms']:.1f} ms; "
            f"{h['gpu_gather_ms']:.2f} ms of GPU time per side (the copies run beside the steps); a "
            f"device-to-device transport over {h['link']} would take {h['device_to_device_at_link_ms']:.1f} ms",
            f"  TTFT ~ {h['ttft_ms']:,.0f} ms = prefill chunk {h['ttft_prefill_ms']:,.0f} + handoff "
            f"{h['ttft_added_ms']:.0f} + first decode {h['ttft_first_decode_ms']:.0f} "
            f"(handoff {h['handoff_share_of_ttft']:.1%})"]


def format_cost(res: dict) -> list[str]:
    """Dollars at the best decode point under the ITL target and the best prefill EP."""
    c = res.get("cost")
    if not c:
        return []
    head = (f"cost at ${c['gpu_hour_usd']:.2f}/GPU-hour ({c['price_source']}), utilization {c['utilization']:.0%}, "
            f"prefix-cache hits {c['prefix_hit']:.0%}, of the best setup that fits:")
    if c["usd_per_m_output"] is None:
        return [head, "  no decode layout meets the ITL target or no prefill fits: no price"]
    if c.get("note"):
        return [head, f"  ${c['usd_per_m_output']:.3f} per M output tokens ({c['note']})"]
    return [head,
            f"  ${c['usd_per_m_output']:.3f} per M output tokens (decode GPUs), ${c['usd_per_m_input']:.3f} per M "
            f"input tokens (prefill GPUs); ${c['usd_per_m_output_all_gpus']:.3f} per M output tokens counting both",
            f"  {c['gpu_seconds_per_request']:.3f} GPU-s per request; prefill:decode GPUs = "
            f"{c['prefill_to_decode_gpus']:.2f} : 1 balances the two pools"]


def format_assumptions(res: dict) -> list[str]:
    """The engine's features with their status, and every assumption of the prediction."""
    e = res.get("engine")
    if not e:
        return []
    lines = [f"features (engine {e['name']}; [x] = this prediction assumes it):"]
    lines += [f"  [{'x' if f.get('used', True) else ' '}] {f['feature']}: {f['status']}"
              + (f" ({f['evidence']})" if f["evidence"] else "") for f in e["features"]]
    lines.append("assumptions:")
    lines += [f"  - {a}" for a in res.get("assumptions", [])]
    return lines
