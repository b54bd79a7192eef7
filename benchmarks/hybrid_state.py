"""Linear attention's fixed state against full attention's growing KV (issue 42): a Qwen3-Next / Qwen3.5-shaped hybrid
(gated DeltaNet on 3 layers of 4, gated full attention on the 4th) beside a Qwen3-MoE of the same active size.

    python -m moelink.benchmarks.hybrid_state [--cpu-smoke] [--json OUT] [--size cpu|gpu] [--layers N]
        [--lengths 2048,8192,32768] [--batches 1,8] [--prompt 512] [--output 64] [--repeats 3] [--time-budget-s S]

Three parts, one JSON (written after each part, so a run stopped early keeps what it measured):

1. memory (analytic, no device): per sequence, the linear layers' state (conv + recurrent, kv_sizing.
   state_bytes_per_sequence) and the full layers' KV per token (kv_sizing.kv_cache_bytes_per_token), from
   moelink's own config reader on config.json files that transformers' config classes write, for the published
   shapes (Qwen3-Next-80B-A3B: 36 linear + 12 full layers; Qwen3-30B-A3B: 48 GQA layers; bf16) at 4k, 32k and
   128k tokens of context, and for the two measured models. Active parameters per token (no embeddings): the
   engine's model built on the meta device, routed experts counted top_k / num_experts.
2. decode: LLM.generate of `batch` prompts of --prompt random token ids, --output new tokens each (greedy, EOS
   ignored); decode tok/s = batch x (output - 1) / (end - the last request's first token), the prefill excluded.
3. prefill: one prompt of each --lengths, one new token; time per prompt token at each length, and the growth
   (per-token time at the longest / at the shortest) per model. Unchunked: max_num_batched_tokens is the longest
   prompt, so each prompt is one engine step (its full-attention layers attend over the whole prompt at once).
Beside each wall time, this process's CPU time (all its threads) over the same work (decode: the generate's less a
prefill-only generate of the same batch shape): on a CPU shared with other jobs the wall time also counts the waits
for a core, the CPU time does not (the JSON records the load average at every point).

Decode replays CUDA graphs where the engine captures them (on a GPU); the JSON's decode_graph_sizes says, per model,
at which batch sizes (an empty list: every decode step ran eagerly).

Both models are alive side by side and measured in turn at every point (hybrid, then MoE, `repeats` times): on a
shared machine both see the same load. Every number is the best of its repeats (prefill: fewer at long lengths,
at most 16k prompt tokens per point); the JSON keeps every sample. Random weights (`load_format="dummy"`), prefix
caching off (every prompt is computed).

The measured pair (config.json only, one size per device): the same hidden, vocabulary, experts, top-k and expert
widths, and no shared expert (the hybrid's MoE block is the MoE model's: what differs is the token mixer); the
attention widths matched as the formats allow: the hybrid's full layers have the MoE model's q / kv heads (plus
Qwen3-Next's output gate, one more q-wide projection), its linear layers take q and k of the kv width (key heads
x key dim = kv heads x head dim) and v and the gate z of the q width (value heads x value dim = q heads x head dim).
- cpu (float32): hidden 256, 4 layers (3 linear + 1 full vs 4 full), 16 experts top-4 of width 256, 8 q / 2 kv
  heads of 32, linear 2 key / 8 value heads of 32.
- gpu (bfloat16): hidden 2048, 16 layers (12 linear + 4 full vs 16 full), Qwen3-30B-A3B's experts (128 top-8 of
  width 768) and attention (32 q / 4 kv heads of 128), linear 4 key / 32 value heads of 128 (Qwen3-Next-80B-A3B's
  32 value heads: its recurrent state per layer).
--cpu-smoke: a toy pair and toy lengths on CPU (seconds): checks the script, not speed.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

from moelink.engine.api.provenance import git_commit, write_result

RESULTS = Path(__file__).resolve().parent / "results"
CONTEXTS = (4096, 32768, 131072)
PREFILL_TOKENS_PER_POINT = 32768  # repeats of a prefill point: at most this many prompt tokens (at least one run)

# The published shapes, as transformers' config classes take them (config.json fields).
QWEN3_NEXT_80B_A3B = dict(
    hidden_size=2048, intermediate_size=5120, num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=2,
    head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
    linear_value_head_dim=128, linear_conv_kernel_dim=4, full_attention_interval=4, num_experts=512,
    num_experts_per_tok=10, moe_intermediate_size=512, shared_expert_intermediate_size=512, norm_topk_prob=True,
    decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936, max_position_embeddings=262144,
    rope_parameters=dict(rope_type="default", rope_theta=10_000_000.0, partial_rotary_factor=0.25),
    tie_word_embeddings=False)
QWEN3_30B_A3B = dict(
    hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
    head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
    decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936, max_position_embeddings=40960,
    rope_parameters=dict(rope_type="default", rope_theta=1_000_000.0), tie_word_embeddings=False)
REAL = {"Qwen3-Next-80B-A3B": ("qwen3_next", QWEN3_NEXT_80B_A3B), "Qwen3-30B-A3B": ("qwen3_moe", QWEN3_30B_A3B)}


def pair(hidden: int, layers: int, vocab: int, experts: int, top_k: int, inter: int, q_heads: int, kv_heads: int,
         head_dim: int, max_pos: int) -> dict[str, tuple[str, dict]]:
    """The measured pair (module docstring): the hybrid's linear layers take key heads x key dim = the kv width
    and value heads x value dim = the q width."""
    assert layers % 4 == 0
    common = dict(hidden_size=hidden, num_hidden_layers=layers, vocab_size=vocab, num_experts=experts,
                  num_experts_per_tok=top_k, moe_intermediate_size=inter, intermediate_size=2 * inter,
                  norm_topk_prob=True, num_attention_heads=q_heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                  decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=max_pos,
                  tie_word_embeddings=False)
    hybrid = dict(common, linear_num_key_heads=kv_heads, linear_num_value_heads=q_heads, linear_key_head_dim=head_dim,
                  linear_value_head_dim=head_dim, linear_conv_kernel_dim=4, full_attention_interval=4,
                  shared_expert_intermediate_size=0)
    return {"hybrid": ("qwen3_next", hybrid), "moe": ("qwen3_moe", common)}


SIZES = {
    "cpu": dict(pair=pair(256, 4, 1024, 16, 4, 256, 8, 2, 32, 65536), dtype="float32",
                lengths=(2048, 8192, 32768), batches=(1, 8), prompt=512, output=64, repeats=3, decode_repeats=5),
    "gpu": dict(pair=pair(2048, 16, 151936, 128, 8, 768, 32, 4, 128, 65536), dtype="bfloat16",
                lengths=(2048, 8192, 32768), batches=(1, 8), prompt=512, output=64, repeats=3, decode_repeats=3),
    "smoke": dict(pair=pair(64, 4, 256, 4, 2, 64, 4, 2, 16, 1024), dtype="float32",
                  lengths=(64, 256), batches=(1, 2), prompt=32, output=6, repeats=1, decode_repeats=1),
}
NAMES = {"hybrid": "Qwen3-Next-shaped hybrid (3 gated DeltaNet : 1 gated full attention)",
         "moe": "Qwen3-MoE (full GQA attention on every layer)"}


# -- config.json directories and what moelink reads from them ------------------------------------------------------
def write_config(out: Path, model_type: str, fields: dict) -> Path:
    """config.json as transformers' own config class writes it (no weights, no tokenizer)."""
    import transformers

    cls, arch = {"qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM"),
                 "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM")}[model_type]
    cfg = getattr(transformers, cls)(**fields)
    cfg.architectures = [arch]
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out)
    return out


def read_config(path: Path, dtype: str, max_model_len: int | None = None):
    from moelink.engine.config.model import ModelConfig

    return ModelConfig.from_pretrained(str(path), dtype=dtype, max_model_len=max_model_len)


def param_counts(cfg) -> dict:
    """Parameters of the engine's model for `cfg`, built on the meta device: all of them, and those one token
    reads without the embedding and LM head (routed experts counted top_k / num_experts of them)."""
    from moelink.engine.models.registry import arch_spec
    from moelink.engine.models.moe_decoder import MoEDecoderForCausalLM
    from moelink.kernels.ops import ReferenceKernels

    model = MoEDecoderForCausalLM(cfg, arch_spec(cfg.architecture), ReferenceKernels(), torch.device("meta"))
    total = routed = embed = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if name.endswith(("w13_EFD", "w2_EDI")):
            routed += p.numel()
        elif name in ("embed_tokens", "lm_head") or name.endswith(("embed_tokens.weight", "lm_head.weight")):
            embed += p.numel()
    active = total - routed - embed + routed * cfg.top_k // cfg.num_experts
    return dict(total_params=total, active_params_per_token_no_embeddings=active)


def memory_row(name: str, cfg, contexts=CONTEXTS) -> dict:
    """One model's memory per sequence: the linear layers' state (fixed) and the full layers' KV (per token)."""
    from moelink.engine.config import kv_sizing

    state = kv_sizing.state_bytes_per_sequence(cfg)
    kv_tok = kv_sizing.kv_cache_bytes_per_token(cfg)
    linear = list(cfg.linear_layers)
    la = cfg.attention_for(linear[0]) if linear else None
    return dict(model=name, dtype=str(cfg.dtype).removeprefix("torch."), layers=cfg.num_layers,
                linear_layers=len(linear), full_layers=cfg.num_layers - len(linear),
                state_bytes_per_sequence=state,
                state_bytes_per_layer=la.state_bytes_per_sequence(cfg.dtype) if la else 0,
                kv_bytes_per_token=kv_tok,
                per_sequence={str(c): dict(state_bytes=state, kv_bytes=kv_tok * c, total_bytes=state + kv_tok * c)
                              for c in contexts},
                **param_counts(cfg))


def analytic(tmp: Path) -> dict:
    rows = {name: memory_row(name, read_config(write_config(tmp / "real" / name, mt, fields), "bfloat16"))
            for name, (mt, fields) in REAL.items()}
    h, m = rows["Qwen3-Next-80B-A3B"], rows["Qwen3-30B-A3B"]
    ratio = {str(c): h["per_sequence"][str(c)]["total_bytes"] / m["per_sequence"][str(c)]["total_bytes"]
             for c in CONTEXTS}
    return dict(models=rows, hybrid_over_moe_bytes_per_sequence=ratio)


# -- the engines ----------------------------------------------------------------------------------------------------
def engine_kwargs(cfg, size: dict, device: str, max_len: int, batch_tokens: int) -> dict:
    from moelink.engine.config import kv_sizing

    max_seqs = max(size["batches"])
    block = 16
    tokens = max(max_len, max_seqs * (size["prompt"] + size["output"]))
    blocks = 2 * (-(-tokens // block)) + 2 * max_seqs
    kv_bytes = blocks * kv_sizing.kv_cache_bytes_per_block(cfg, block) + kv_sizing.state_pool_bytes(cfg, max_seqs, 0)
    return dict(dtype=size["dtype"], load_format="dummy", device=device, max_model_len=max_len, max_num_seqs=max_seqs,
                max_num_batched_tokens=batch_tokens, enable_prefix_caching=False, block_size=block,
                kv_cache_memory_bytes=int(kv_bytes))


def decode_graph_sizes(llm) -> list[int] | None:
    """The decode batch sizes the engine replays as CUDA graphs ([]: every decode step eager), read from the one-rank
    executor's model runner; None where it cannot be read."""
    runner = getattr(getattr(getattr(llm.engine, "executor", None), "worker", None), "runner", None)
    sizes = getattr(runner, "graph_sizes", None)
    return None if sizes is None else [int(b) for b in sizes]


def _params(n: int):
    from moelink.engine import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)


def time_decode(llm, batch: int, prompt: int, output: int, rng: random.Random, vocab: int) -> dict:
    """Wall: one generate of `output` tokens, its decode from the last first token to the end. CPU time (this
    process's, all threads): that generate's less the same batch's prefill alone (a generate of one token on other
    prompts of the same length, run first), over the same output - 1 tokens per sequence."""
    def prompts():
        return [[rng.randrange(3, vocab) for _ in range(prompt)] for _ in range(batch)]

    c0 = time.process_time()
    llm.generate(prompts(), _params(1), use_tqdm=False)
    prefill_cpu = time.process_time() - c0
    c0, t0 = time.process_time(), time.monotonic()  # (the engine stamps first tokens with time.monotonic)
    res = llm.generate(prompts(), _params(output), use_tqdm=False)
    t1, cpu = time.monotonic(), time.process_time() - c0
    assert all(len(r.outputs[0].token_ids) == output for r in res)
    first = max(r.metrics["first_token_time"] for r in res)
    decode_cpu = max(cpu - prefill_cpu, 1e-9)
    return dict(total_s=t1 - t0, ttft_s=first - t0, decode_s=t1 - first,
                decode_tok_s=batch * (output - 1) / (t1 - first), total_cpu_s=cpu, prefill_cpu_s=prefill_cpu,
                decode_cpu_s=decode_cpu, decode_tok_per_cpu_s=batch * (output - 1) / decode_cpu)


def time_prefill(llm, length: int, rng: random.Random, vocab: int) -> dict:
    """Wall time of one prompt's prefill (and its one sampled token), and this process's CPU time over it (all its
    threads: on a CPU shared with other work the wall time also holds the waits for a core, the CPU time not)."""
    prompt = [rng.randrange(3, vocab) for _ in range(length)]
    c0, t0 = time.process_time(), time.perf_counter()
    res = llm.generate([prompt], _params(1), use_tqdm=False)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert len(res[0].outputs[0].token_ids) == 1
    return dict(s=dt, ms_per_token=dt / length * 1e3, cpu_s=cpu, cpu_ms_per_token=cpu / length * 1e3)


def best(samples: list[dict], key: str) -> dict:
    return min(samples, key=lambda s: s[key])


def best_decode(samples: list[dict]) -> dict:
    """The fastest run by wall time, and the least decode CPU time (each the best of its own)."""
    c = best(samples, "decode_cpu_s")
    return dict(best(samples, "decode_s"), decode_cpu_s=c["decode_cpu_s"],
                decode_tok_per_cpu_s=c["decode_tok_per_cpu_s"], samples=samples)


def best_prefill(samples: list[dict]) -> dict:
    """The fastest run's wall time and the least CPU time (each the best of its own)."""
    b = best(samples, "s")
    c = best(samples, "cpu_s")
    return dict(s=b["s"], ms_per_token=b["ms_per_token"], cpu_s=c["cpu_s"], cpu_ms_per_token=c["cpu_ms_per_token"],
                samples=samples)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


# -- report -----------------------------------------------------------------------------------------------------------
def _bytes(b: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:,.1f} {unit}"
    return f"{b:.0f} B"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def print_memory(title: str, rows: dict, ratio: dict | None = None) -> None:
    print(f"\n{title}: memory per sequence = linear layers' state + full layers' KV x context (kv_sizing)")
    print("| model | dtype | layers (linear+full) | state / sequence | KV / token | " +
          " | ".join(f"at {c // 1024}k" for c in CONTEXTS) + " | active params / token (no embeddings) |")
    print("|---|---|---|---|---|" + "---|" * len(CONTEXTS) + "---|")
    for r in rows.values():
        print(f"| {r['model']} | {r['dtype']} | {r['layers']} ({r['linear_layers']}+{r['full_layers']}) | "
              f"{_bytes(r['state_bytes_per_sequence'])} | {_bytes(r['kv_bytes_per_token'])} | " +
              " | ".join(_bytes(r["per_sequence"][str(c)]["total_bytes"]) for c in CONTEXTS) +
              f" | {_count(r['active_params_per_token_no_embeddings'])} |")
    if ratio:
        print("hybrid / full-attention bytes per sequence: " + ", ".join(
            f"at {int(c) // 1024}k {v:.3f}" for c, v in ratio.items()))


def print_decode(rows: list[dict]) -> None:
    print("\ndecode (best of repeats): tok/s after the prefill (wall), and tokens per second of the process's CPU time")
    print("| batch | prompt | output | hybrid tok/s | MoE tok/s | hybrid / MoE | hybrid tok/CPU-s | MoE tok/CPU-s | "
          "hybrid / MoE |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        h, m = r["hybrid"], r["moe"]
        print(f"| {r['batch']} | {r['prompt']} | {r['output']} | {h['decode_tok_s']:.1f} | {m['decode_tok_s']:.1f} | "
              f"{r['hybrid_over_moe_tok_s']:.3f} | {h['decode_tok_per_cpu_s']:.1f} | {m['decode_tok_per_cpu_s']:.1f} | "
              f"{r['hybrid_over_moe_tok_per_cpu_s']:.3f} |")


def print_prefill(rows: list[dict], growth: dict) -> None:
    print("\nprefill of one prompt (unchunked, best of repeats): wall time, and ms per prompt token by wall time "
          "and by the process's CPU time")
    print("| prompt tokens | runs | hybrid s | MoE s | hybrid / MoE | hybrid ms/token | MoE ms/token | "
          "hybrid CPU ms/token | MoE CPU ms/token |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        h, m = r["hybrid"], r["moe"]
        print(f"| {r['length']} | {r['repeats']} | {h['s']:.3f} | {m['s']:.3f} | {r['hybrid_over_moe_time']:.3f} | "
              f"{h['ms_per_token']:.4f} | {m['ms_per_token']:.4f} | {h['cpu_ms_per_token']:.4f} | "
              f"{m['cpu_ms_per_token']:.4f} |")
    if growth:
        print(f"per-token time growth {growth['from']} -> {growth['to']} tokens: wall hybrid {growth['hybrid']:.2f}x, "
              f"MoE {growth['moe']:.2f}x; CPU time hybrid {growth['hybrid_cpu_time']:.2f}x, "
              f"MoE {growth['moe_cpu_time']:.2f}x")


# -- main -------------------------------------------------------------------------------------------------------------
def _ints(s: str | None) -> tuple[int, ...] | None:
    return None if s is None else tuple(int(x) for x in s.split(",") if x)


def main(argv=None) -> dict:
    args = _parse_args(argv)
    t_start = time.monotonic()
    device = args.device or ("cpu" if args.cpu_smoke or not torch.cuda.is_available() else "cuda")
    size_name = "smoke" if args.cpu_smoke else (args.size or ("gpu" if device.startswith("cuda") else "cpu"))
    size, models = _workload(args, size_name)
    parts = [p for p in args.parts.split(",") if p]
    max_len = max(max(size["lengths"]), size["prompt"] + size["output"]) + 16
    for _, f in models.values():
        f["max_position_embeddings"] = max(f["max_position_embeddings"], max_len)
    batch_tokens = max(max(size["lengths"]), max(size["batches"]) * size["prompt"])
    if device.startswith("cuda"):
        dev_name = torch.cuda.get_device_name()
    else:
        dev_name = platform.processor() or platform.machine() or "cpu"
    tag = "cpu_smoke" if args.cpu_smoke else ("cpu" if device == "cpu" else dev_name.replace(" ", "_"))
    out = Path(args.json or RESULTS / f"hybrid_state_{tag}.json")
    result = dict(benchmark="hybrid_state", date=str(date.today()), commit=git_commit(), device=device,
                  device_name=dev_name, torch=torch.__version__, threads=torch.get_num_threads(),
                  cpu_smoke=args.cpu_smoke, size=size_name, dtype=size["dtype"],
                  models={k: dict(name=NAMES[k], model_type=mt, config=f) for k, (mt, f) in models.items()},
                  workload={k: size[k] for k in ("lengths", "batches", "prompt", "output", "repeats",
                                                 "decode_repeats")},
                  prefill_mode=f"unchunked: max_num_batched_tokens={batch_tokens} (each prompt in one step)",
                  timing="side by side in one process, hybrid then MoE at every point; best of repeats",
                  load_average_at_start=load_average(), notes=[], skipped=[])
    vocab = models["moe"][1]["vocab_size"]

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        paths = {k: write_config(tmp / k, mt, f) for k, (mt, f) in models.items()}
        cfgs = {k: read_config(p, size["dtype"], max_len) for k, p in paths.items()}
        measured = {k: memory_row(NAMES[k], c, CONTEXTS) for k, c in cfgs.items()}
        result["memory"] = dict(measured_models=measured)
        if "memory" in parts:
            result["memory"].update(analytic(tmp))
            print_memory("published shapes (bf16)", result["memory"]["models"],
                         result["memory"]["hybrid_over_moe_bytes_per_sequence"])
        print_memory(f"measured pair ({size['dtype']})", measured)
        write_result(out, result)
        if not {"decode", "prefill"} & set(parts):
            print(f"wrote {out}")
            return result

        from moelink.engine import LLM

        llms = {}
        try:
            for k in ("hybrid", "moe"):
                t0 = time.perf_counter()
                llms[k] = LLM(str(paths[k]), **engine_kwargs(cfgs[k], size, device, max_len, batch_tokens))
                llms[k].generate([[5] * 16] * 2, _params(2), use_tqdm=False)  # warm-up
                result.setdefault("engine_start_s", {})[k] = time.perf_counter() - t0
                result.setdefault("decode_graph_sizes", {})[k] = decode_graph_sizes(llms[k])
            rng = random.Random(0)

            def out_of_time(what: str) -> bool:
                if args.time_budget_s is not None and time.monotonic() - t_start > args.time_budget_s:
                    result["skipped"].append(what)
                    print(f"skipped {what}: past --time-budget-s {args.time_budget_s:.0f}", flush=True)
                    return True
                return False

            if "decode" in parts:
                _decode_points(llms, size, result, out, rng, vocab, out_of_time)
            if "prefill" in parts:
                _prefill_points(llms, size, result, out, rng, vocab, out_of_time)
        finally:
            for llm in llms.values():
                llm.shutdown()

    _print_summary(result, size_name, size, dev_name)
    result["wall_s"] = time.monotonic() - t_start
    print(f"wrote {write_result(out, result)}")
    return result


def _parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="toy models and lengths on CPU (seconds): the script only")
    ap.add_argument("--size", choices=["cpu", "gpu"], default=None,
                    help="the measured pair (default: gpu on a CUDA device, else cpu)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers of both models (a multiple of 4)")
    ap.add_argument("--lengths", default=None, help="prefill prompt lengths, comma list (default 2048,8192,32768)")
    ap.add_argument("--batches", default=None, help="decode batch sizes, comma list (default 1,8)")
    ap.add_argument("--prompt", type=int, default=None, help="decode prompt tokens (default 512)")
    ap.add_argument("--output", type=int, default=None, help="decode output tokens (default 64)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="runs per point, best reported (default: decode 5 on CPU, 3 on a GPU; prefill 3, fewer at "
                         "long prompts)")
    ap.add_argument("--parts", default="memory,decode,prefill", help="comma list of memory, decode, prefill")
    ap.add_argument("--time-budget-s", type=float, default=None,
                    help="start no measurement point after this many seconds from the start (the rest is skipped, "
                         "listed in the JSON)")
    ap.add_argument("--json", default=None, help="result path (default benchmarks/results/hybrid_state_<device>.json)")
    return ap.parse_args(argv)


def _workload(args: argparse.Namespace, size_name: str) -> tuple[dict[str, Any], dict]:
    """The size's workload with the command line's overrides, and the two models' configs ({name: (model_type,
    config.json fields)}); exits on a --layers the 3:1 layout cannot take."""
    size: dict[str, Any] = dict(SIZES[size_name])
    for k in ("lengths", "batches"):
        v = _ints(getattr(args, k))
        if v:
            size[k] = v
    for k in ("prompt", "output", "repeats"):
        if getattr(args, k) is not None:
            size[k] = getattr(args, k)
    if args.repeats is not None:
        size["decode_repeats"] = args.repeats
    models = {k: (mt, dict(f)) for k, (mt, f) in size["pair"].items()}
    if args.layers:
        if args.layers % 4:
            sys.exit("hybrid_state: --layers must be a multiple of 4 (3 linear : 1 full)")
        for _, f in models.values():
            f["num_hidden_layers"] = args.layers
    return size, models


def _decode_points(llms: dict, size: dict[str, Any], result: dict, out: Path, rng: random.Random, vocab: int,
                   out_of_time) -> None:
    """Decode throughput of both models at each batch size, best of decode_repeats (written after each point)."""
    result["decode"] = []
    for b in size["batches"]:
        if out_of_time(f"decode batch {b}"):
            continue
        samples = {k: [] for k in llms}
        for _ in range(size["decode_repeats"]):
            for k, llm in llms.items():
                samples[k].append(time_decode(llm, b, size["prompt"], size["output"], rng, vocab))
        row = dict(batch=b, prompt=size["prompt"], output=size["output"], load_average=load_average(),
                   **{k: best_decode(s) for k, s in samples.items()})
        row["hybrid_over_moe_tok_s"] = row["hybrid"]["decode_tok_s"] / row["moe"]["decode_tok_s"]
        row["hybrid_over_moe_tok_per_cpu_s"] = (row["hybrid"]["decode_tok_per_cpu_s"]
                                                / row["moe"]["decode_tok_per_cpu_s"])
        result["decode"].append(row)
        print(f"decode batch {b}: hybrid {row['hybrid']['decode_tok_s']:.1f} tok/s, MoE "
              f"{row['moe']['decode_tok_s']:.1f} tok/s, ratio {row['hybrid_over_moe_tok_s']:.3f}",
              flush=True)
        write_result(out, result)


def _prefill_points(llms: dict, size: dict[str, Any], result: dict, out: Path, rng: random.Random, vocab: int,
                    out_of_time) -> None:
    """One unchunked prefill of both models at each prompt length, and the per-token time's growth from the
    shortest to the longest (written after each point)."""
    result["prefill"] = []
    for n in size["lengths"]:
        if out_of_time(f"prefill {n}"):
            continue
        reps = max(1, min(size["repeats"], PREFILL_TOKENS_PER_POINT // n))
        samples = {k: [] for k in llms}
        for _ in range(reps):
            for k, llm in llms.items():
                samples[k].append(time_prefill(llm, n, rng, vocab))
        row = dict(length=n, repeats=reps, load_average=load_average(),
                   **{k: best_prefill(s) for k, s in samples.items()})
        row["hybrid_over_moe_time"] = row["hybrid"]["s"] / row["moe"]["s"]
        row["hybrid_over_moe_cpu_time"] = row["hybrid"]["cpu_s"] / row["moe"]["cpu_s"]
        result["prefill"].append(row)
        h, m = row["hybrid"], row["moe"]
        print(f"prefill {n}: hybrid {h['s']:.3f} s ({h['ms_per_token']:.4f} ms/token), "
              f"MoE {m['s']:.3f} s ({m['ms_per_token']:.4f} ms/token)", flush=True)
        rows = result["prefill"]
        if len(rows) > 1:
            result["prefill_growth"] = dict(
                **{"from": rows[0]["length"], "to": rows[-1]["length"]},
                **{k: rows[-1][k]["ms_per_token"] / rows[0][k]["ms_per_token"] for k in llms},
                **{f"{k}_cpu_time": rows[-1][k]["cpu_ms_per_token"] / rows[0][k]["cpu_ms_per_token"]
                   for k in llms})
        write_result(out, result)


def _print_summary(result: dict, size_name: str, size: dict[str, Any], dev_name: str) -> None:
    print(f"\n{NAMES['hybrid']} vs {NAMES['moe']}: size {size_name} ({size['dtype']}), device {dev_name}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, commit {result['commit']}")
    if result.get("decode"):
        print_decode(result["decode"])
        print("decode steps replayed as CUDA graphs: " + ", ".join(
            f"{k} {'at batch ' + ','.join(map(str, v)) if v else 'none (eager)' if v == [] else 'unknown'}"
            for k, v in result["decode_graph_sizes"].items()))
    if result.get("prefill"):
        print_prefill(result["prefill"], result.get("prefill_growth", {}))


if __name__ == "__main__":
    main()
