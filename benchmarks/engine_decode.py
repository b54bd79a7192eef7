"""Decode step time of a Qwen3-30B-A3B- or DeepSeek-V2-Lite-shaped model (random bf16 weights) against its
memory floor.

    python -m moelink.benchmarks.engine_decode [--model qwen3-30b-a3b|deepseek-v2-lite] [--batches 1,16,64,256]
        [--context 1024] [--layers auto] [--graphs] [--fp8]

Models (config.json facts, read by the engine's own config reader and built by its model class):
- qwen3-30b-a3b: GQA (32 query / 4 kv heads of 128), 128 routed experts top-8 of I=768, hidden 2048, 48 layers.
- deepseek-v2-lite: MLA (16 heads, no q LoRA, latent 512 + rope key 64 cached per token), 64 routed experts
  top-6 of I=1408 plus 2 shared experts, the first layer dense (intermediate 10944), hidden 2048, 27 layers.

`--fp8`: the model as its published FP8 checkpoint holds it (Qwen3-30B-A3B-FP8, DeepSeek's FP8 release format:
`quantization_config` fp8 e4m3, dynamic activations, 128 x 128 blocks): projections, dense MLPs, shared and routed
experts e4m3 with block scales (random values, fan-in scaled scales); the floor counts their bytes.

Every sequence of the batch has `--context` tokens cached and decodes one more.
Timed on the device (CUDA events, median over steps): one model step as the
engine's model runner runs it, i.e. embedding → decoder layers (Triton
kernels via the same selector the engine uses) → final norm → LM head on the
batch's rows → greedy argmax. Host-side scheduling and metadata building are
not included (they are the same for every kernel backend). With --graphs the
step is also timed as the engine decodes on a GPU: the batch's CUDA graph
(engine/rank/cuda_graph.py) replayed after the step's inputs are copied in.

Memory floor: the bytes one step must read at least (attention and router
weights, the experts the batch actually routed to, counted per layer in an
untimed pass, embedding rows, the LM head, and the K/V of every cached token),
over the device-to-device copy bandwidth measured in the same run. The ratio
step / floor says how far from memory-bound the step is (1.0 is the floor).

--kernel-times: per batch, a few more steps under torch.profiler, device time a step by kernel family (moe,
attention, matmul, norm, other) and by kernel: which launches hold a step above its floor.

If the model's layers and the largest batch's KV cache do not fit, fewer layers are
built and the output says so; the full-model step is then extrapolated as
head + layers × (measured per-layer time), with the head (embedding, final norm,
LM head) timed separately.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch

from moelink.engine.api.provenance import write_result
from moelink.kernels.step_memo import STEP_MEMO

from .moe_kernels import RESULTS, Timer, measure_ceilings, require_cuda, run_meta
from .step_floor import estimate_layer_bytes, kv_bytes_per_token, num_experts

QWEN3_30B_A3B = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, moe_intermediate_size=768,
                     intermediate_size=6144, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                     vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960,
                     decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False, eos_token_id=151645)
SMOKE = dict(QWEN3_30B_A3B, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=64, moe_intermediate_size=128, num_experts=16, num_experts_per_tok=4, vocab_size=1024,
             max_position_embeddings=4096)
# deepseek-ai/DeepSeek-V2-Lite's config.json (the fields the engine reads).
DEEPSEEK_V2_LITE = dict(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", hidden_size=2048,
                        intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
                        num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6,
                        first_k_dense_replace=1, moe_layer_freq=1, kv_lora_rank=512, q_lora_rank=None,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, topk_method="greedy", n_group=1,
                        topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0, scoring_func="softmax",
                        vocab_size=102400, max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000,
                        rope_scaling=dict(type="yarn", factor=40, beta_fast=32, beta_slow=1, mscale=0.707,
                                          mscale_all_dim=0.707, original_max_position_embeddings=4096),
                        attention_bias=False, tie_word_embeddings=False, bos_token_id=100000, eos_token_id=100001)
# Small enough for the CPU interpreter; keeps V2-Lite's structure (a dense first layer, shared experts, MLA
# without q LoRA, YaRN).
SMOKE_DSV2 = dict(DEEPSEEK_V2_LITE, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16,
                  num_experts_per_tok=4, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                  vocab_size=1024, max_position_embeddings=4096, bos_token_id=0, eos_token_id=1)
MODELS = {"qwen3-30b-a3b": (QWEN3_30B_A3B, SMOKE, "Qwen3-30B-A3B"),
          "deepseek-v2-lite": (DEEPSEEK_V2_LITE, SMOKE_DSV2, "DeepSeek-V2-Lite")}
SMOKE_BATCHES, SMOKE_CONTEXT = (1, 4), 64
KERNEL_TIME_STEPS = 5  # --kernel-times: steps profiled per batch (the mean a step is recorded)
STEPS, SMOKE_STEPS = 20, 3  # (the smoke checks the script, not the timing: a median of 3 steps is enough)
BLOCK = 16


# A published FP8 checkpoint's quantization_config (Qwen3-30B-A3B-FP8, DeepSeek-V3): `--fp8`.
FP8_QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def random_weights(module: torch.nn.Module) -> None:
    """Random parameters as a loader would leave them: norm weights 1, float weights fan-in scaled (activations
    stay O(1) through the layers), FP8 weights random e4m3 values with fan-in scaled block scales; then every
    submodule's after-load step (MLA's kv_b_proj held float: engine/models/linear.py)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.dtype == torch.float8_e4m3fn:
                p.copy_(torch.randn(p.shape, device=p.device).clamp(-8, 8).to(p.dtype))
            elif name.endswith("scale_inv"):  # [.., N / Bn, K / Bk] block scales: fan-in K ~ their columns x Bk
                p.fill_((p.shape[-1] * FP8_QUANT["weight_block_size"][1]) ** -0.5)
            elif p.dtype.is_floating_point:
                p.normal_(0.0, p.shape[-1] ** -0.5)
        for sub in module.modules():
            if sub is not module and hasattr(sub, "process_weights_after_loading"):
                sub.process_weights_after_loading()


def build_model(hf: dict, num_layers: int, device, kernels_name: str, max_len: int):
    """The engine's model class, random weights (`random_weights`); config read the engine's way (from a
    config.json)."""
    from moelink.engine.config.model import ModelConfig
    from moelink.engine.models.registry import ARCHITECTURES, MoEDecoderForCausalLM
    from moelink.kernels.ops import select_kernels

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(dict(hf, num_hidden_layers=num_layers)))
        cfg = ModelConfig.from_pretrained(d, dtype="bfloat16", max_model_len=max_len)
    kernels = select_kernels(device, kernels_name)
    torch.manual_seed(0)
    model = MoEDecoderForCausalLM(cfg, ARCHITECTURES[cfg.architecture], kernels, device)
    random_weights(model)
    model.process_weights_after_loading()  # as the loader ends (the checkpoint kind's own step)
    return cfg, model.eval(), kernels


def routed_tensors(moe) -> list[torch.Tensor]:
    """A MoE layer's per-expert tensors (leading dim the local experts: w13_EFD, w2_EDI and a quantized format's
    scales), which a step reads only for the experts its batch routes to."""
    return [t for t in moe.parameters() if t.dim() >= 3 and t.shape[0] == moe.w13_EFD.shape[0]]


def one_expert_bytes(moe) -> int:
    """Bytes of one routed expert of a MoE layer a step reads when routed to it: its gate, up and down rows (not the
    zero rows an FP8 stack holds between gate and up where I is no multiple of the block: fp8.up_row), and their
    block scales where FP8."""
    w2 = moe.w2_EDI
    D, I = w2.shape[1], w2.shape[2]
    scales = sum(t[0].numel() * t.element_size() for t in routed_tensors(moe) if t is not moe.w13_EFD and t is not w2)
    return 2 * I * D * moe.w13_EFD.element_size() + D * I * w2.element_size() + scales


def expert_bytes(model) -> int:
    """`one_expert_bytes` of the model's first MoE layer: what a step reads of each expert its batch routes to."""
    return one_expert_bytes(next(layer.moe for layer in model.layers if layer.moe is not None))


def layer_bytes(layer) -> int:
    """Bytes of one built decoder layer's parameters but its routed experts (attention, norms, router, shared
    experts, or the dense MLP of a dense layer): every step reads all of them."""
    routed = {id(t) for t in routed_tensors(layer.moe)} if layer.moe is not None else set()
    return sum(p.numel() * p.element_size() for p in layer.parameters() if id(p) not in routed)


def kv_bytes(cfg, tokens: int, layers: int) -> int:
    """The cache one step reads: per token and layer what the attention kind stores (GQA: K and V per kv head;
    MLA: one latent and rope key)."""
    return tokens * layers * cfg.attention.kv_bytes_per_token(cfg.cache_dtype)


def pick_layers(hf: dict, max_batch: int, context: int, device) -> int:
    if device.type != "cuda":
        return hf["num_hidden_layers"]
    free, _ = torch.cuda.mem_get_info(device)
    dense, expert = estimate_layer_bytes(hf)
    kv_per_token = kv_bytes_per_token(hf)
    per_layer = dense + num_experts(hf) * expert + kv_per_token * max_batch * (context + BLOCK)
    head = 2 * hf["vocab_size"] * hf["hidden_size"] * 2
    usable = int(free * 0.92) - head - (4 << 30)  # 4 GiB for activations, workspaces, the allocator
    return max(1, min(hf["num_hidden_layers"], usable // per_layer))


def decode_inputs(cfg, batch: int, context: int, device, caches):
    """Metadata of one decode step: every sequence has `context` tokens cached and adds one."""
    from moelink.engine.models.layers import ForwardContext
    from moelink.kernels.attention import AttentionMetadata

    seq_len = context + 1
    nb = -(-seq_len // BLOCK)
    tables_SM = torch.arange(batch * nb, dtype=torch.int32, device=device).view(batch, nb)
    slots_T = (tables_SM[:, context // BLOCK].long() * BLOCK + context % BLOCK)
    meta = AttentionMetadata(
        query_start_loc_S1=torch.arange(batch + 1, dtype=torch.int32, device=device),
        seq_lens_S=torch.full((batch,), seq_len, dtype=torch.int32, device=device),
        block_tables_SM=tables_SM, slot_mapping_T=slots_T, query_lens=[1] * batch, seq_lens=[seq_len] * batch,
        max_query_len=1, max_seq_len=seq_len, null_block=caches[0][0].shape[0] - 1)
    ids_T = torch.randint(0, cfg.vocab_size, (batch,), device=device)
    pos_T = torch.full((batch,), context, dtype=torch.long, device=device)
    return ids_T, pos_T, ForwardContext(meta, caches)


def count_touched_experts(model, kernels, args) -> list[int]:
    """Untimed pass: distinct experts routed to in each MoE layer (host syncs are fine here), read from the
    `topk_ids_TK` argument of the experts' op (float or FP8: the MoE family's signatures, kernels/ops_moe.py)."""
    import inspect

    from moelink.kernels.ops_moe import MoEKernels

    seen: list[int] = []
    saved = {op: getattr(kernels, op) for op in ("fused_moe", "fused_moe_fp8")}

    def spy(op):
        sig, inner = inspect.signature(getattr(MoEKernels, op)), saved[op]

        def run(*a, **kw):
            seen.append(int(torch.unique(sig.bind(None, *a, **kw).arguments["topk_ids_TK"]).numel()))
            return inner(*a, **kw)
        return run

    for op in saved:
        setattr(kernels, op, spy(op))
    try:
        model(*args)
    finally:
        for op, inner in saved.items():
            setattr(kernels, op, inner)
    return seen


def engine_graph_step(model, caches, args_, batch, device):
    """One decode step through the engine's graph for this batch size, as a callable: host copy-in of the step's
    inputs, replay, LM head, argmax (None where the kernels or the batch have no graph). On CPU the capture is
    stood in by a re-run (smoke only)."""
    from moelink.engine.rank.cuda_graph import CudaGraphCapture, DecodeGraphs, EagerReplay

    if model.layers[0].self_attn.kernels.name != "triton":
        print("  (--graphs needs the Triton kernels: not timed)")
        return None
    ids_T, pos_T, ctx = args_
    meta = ctx.attn
    backend = CudaGraphCapture(device) if device.type == "cuda" else EagerReplay()
    graphs = DecodeGraphs(model, caches, (batch,), meta.block_tables_SM.shape[1], meta.null_block,
                          device, backend)
    graphs.capture_all()
    if batch not in graphs.steps:
        return None
    # Host-side inputs, as the model runner holds them (untimed: the runner builds them for eager steps too).
    host = (ids_T.tolist(), pos_T.cpu().numpy(), meta.slot_mapping_T.cpu().numpy(), list(meta.seq_lens),
            meta.block_tables_SM.cpu().numpy())
    return lambda: model.compute_logits(graphs.run(*host)).argmax(-1)


def time_engine_graph(model, caches, args_, batch, device, timer, steps) -> float | None:
    """Median step time through the engine's decode graph for this batch size (`engine_graph_step`)."""
    step = engine_graph_step(model, caches, args_, batch, device)
    if step is None:
        return None
    return timer(step, [()], iters=steps, warmup=2 if device.type == "cuda" else 0)  # (CPU: nothing to warm up)


def profile_step(step, device, steps: int = KERNEL_TIME_STEPS) -> dict:
    """`steps` runs of `step` under torch.profiler: device microseconds a step by kernel family and the top kernels
    (benchmarks/kernel_profile.py; a graph's kernel nodes are traced one by one)."""
    from .kernel_profile import kernel_times

    res = kernel_times(lambda: [step() for _ in range(steps)], device.type)
    return {k: {name: round(us / steps, 1) for name, us in v.items()} for k, v in res.items()}


def turn_on_tiny(max_pairs: int) -> Path:
    """The float fused MoE's tiny path (kernels/triton_moe_tiny.py) on for calls of up to `max_pairs` (token,
    expert) pairs, with DEFAULT_TINY_FLOAT's blocks where a bucket has no TINY entry: what a tuned config with a
    TINY entry does, measured before a tuner writes one (issue 80's batch-1 decode). A copy of kernels/configs/ with
    the entries added to every float table (default.json, interpreter.json, the tuned E=..,N=..,device_name=..
    files) becomes this process's config directory; the other formats' files are copied as they are."""
    import shutil

    from moelink.kernels import moe_config

    tiny = {**moe_config.DEFAULT_TINY_FLOAT.to_dict(), "max_pairs": max_pairs}
    root = Path(tempfile.mkdtemp(prefix="moelink-tiny-configs-"))
    for src in moe_config.CONFIG_DIR.glob("*.json"):
        float_table = src.name in ("default.json", "interpreter.json") or src.name.startswith("E=")
        if not float_table:
            shutil.copy(src, root / src.name)
            continue
        data = json.loads(src.read_text())
        for cfg in data["configs"].values():
            cfg.setdefault("TINY", tiny)
        (root / src.name).write_text(json.dumps(data, indent=1))
    moe_config.CONFIG_DIR = root
    return root


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-30b-a3b", choices=sorted(MODELS), help="model shape (random weights)")
    ap.add_argument("--batches", default=None,
                    help=f"comma list of decode batch sizes (default 1,16,64,256; {','.join(map(str, SMOKE_BATCHES))} "
                         "with --cpu-smoke)")
    ap.add_argument("--context", type=int, default=1024, help="cached tokens per sequence")
    ap.add_argument("--layers", default="auto", help="decoder layers to build ('auto': as many as fit, up to the model's)")
    ap.add_argument("--steps", type=int, default=None,
                    help=f"timed steps per batch size (median reported; default {STEPS}, {SMOKE_STEPS} with --cpu-smoke)")
    ap.add_argument("--graphs", action="store_true",
                    help="also time the step as the engine runs decode on CUDA: its captured graph for the batch "
                         "(engine/rank/cuda_graph.py), inputs copied in each step (needs the Triton kernels)")
    ap.add_argument("--kernel-times", action="store_true",
                    help=f"per batch, {KERNEL_TIME_STEPS} more steps under torch.profiler (the graph step with --graphs): "
                         "device microseconds a step by kernel family (kernel_family_us) and by kernel (kernel_us)")
    ap.add_argument("--kernels", default="auto", choices=["auto", "triton", "cpu_native", "reference"], help="kernel backend")
    ap.add_argument("--tiny-max-pairs", type=int, default=None,
                    help="turn the float MoE's tiny GEMV path on for calls of up to N (token, expert) pairs "
                    "(DEFAULT_TINY_FLOAT's blocks where the tuned table has no TINY entry)")
    ap.add_argument("--fp8", action="store_true",
                    help="the model's FP8 checkpoint: e4m3 weights in 128 x 128 blocks (FP8_QUANT), random values")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/engine_decode_<gpu>.json)")
    ap.add_argument("--cpu-smoke", action="store_true", help="a tiny model on CPU: checks the script only")
    return ap


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    if args.tiny_max_pairs is not None:
        turn_on_tiny(args.tiny_max_pairs)
    batches = [int(b) for b in (args.batches or "1,16,64,256").split(",")]
    args.steps = args.steps or (SMOKE_STEPS if args.cpu_smoke else STEPS)
    full_hf, smoke_hf, model_name = MODELS[args.model]
    if args.fp8:
        full_hf, smoke_hf = (dict(h, quantization_config=FP8_QUANT) for h in (full_hf, smoke_hf))
        model_name += "-FP8"
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the Triton kernels are defined (--kernels triton)
        device, hf, context = torch.device("cpu"), smoke_hf, SMOKE_CONTEXT
        batches = batches if args.batches else list(SMOKE_BATCHES)
    else:
        device, hf, context = require_cuda("engine_decode"), full_hf, args.context
    full_layers = hf["num_hidden_layers"]
    layers = pick_layers(hf, max(batches), context, device) if args.layers == "auto" else int(args.layers)
    note = "" if layers == full_layers else (
        f"built {layers} of {full_layers} layers (memory); full-model step extrapolated as head + {full_layers} x per-layer time")
    if note:
        print(note)
    timer = Timer(device)
    ceilings = measure_ceilings(device, timer)
    cfg, model, kernels = build_model(hf, layers, device, args.kernels, context + BLOCK)
    max_blocks = max(batches) * -(-(context + 1) // BLOCK)
    # Each layer's cache tensors as the attention kind lays them out (GQA: K and V; MLA: one latent tensor),
    # with the null block last, as the model runner allocates them.
    shapes = cfg.attention.cache_shapes(max_blocks, BLOCK)
    caches = [tuple(torch.randn(shape, dtype=cfg.dtype, device=device) * 0.5 for shape in shapes)
              for _ in range(layers)]
    for layer_caches in caches:  # the null block (last) stays zero, as the runner keeps it
        for t in layer_caches:
            t[-1].zero_()
    dense_bytes = sum(layer_bytes(layer) for layer in model.layers)
    expert = expert_bytes(model)
    rows = []
    with torch.inference_mode():
        for B in batches:
            args_ = decode_inputs(cfg, B, context, device, caches)
            touched = count_touched_experts(model, kernels, args_)
            def step(ids, pos, ctx):  # an engine step: the step's memos start empty (the runner clears them)
                STEP_MEMO.clear()
                return model.compute_logits(model(ids, pos, ctx)).argmax(-1)

            warm = 3 if device.type == "cuda" else 0  # the CPU smoke has nothing to warm up
            t = timer(step, [args_], iters=args.steps, warmup=warm)
            graph_step = engine_graph_step(model, caches, args_, B, device) if args.graphs else None
            t_graph = None if graph_step is None else timer(graph_step, [()], iters=args.steps, warmup=warm)
            x = torch.randn(B, cfg.hidden_size, dtype=cfg.dtype, device=device)
            t_head = timer(lambda: model.compute_logits(model.norm(torch.nn.functional.embedding(args_[0], model.embed_tokens) + x)).argmax(-1),
                           [()], iters=args.steps, warmup=warm)
            per_layer = max(0.0, t - t_head) / layers
            t_full = t_head + full_layers * per_layer
            bytes_layers = dense_bytes + sum(touched) * expert + kv_bytes(cfg, B * (context + 1), layers)
            bytes_head = (cfg.vocab_size + B) * cfg.hidden_size * 2
            mean_touched = statistics.mean(touched)
            bytes_full = bytes_layers * full_layers / layers + bytes_head  # the built layers' mix, scaled
            floor = (bytes_layers + bytes_head) / (ceilings["copy_GBps"] * 1e9)
            floor_full = bytes_full / (ceilings["copy_GBps"] * 1e9)
            row = dict(batch=B, context=context, layers=layers, step_ms=t * 1e3, tokens_per_s=B / t,
                       graph_step_ms=None if t_graph is None else t_graph * 1e3,
                       graph_tokens_per_s=None if t_graph is None else B / t_graph,
                       graph_step_over_floor=None if t_graph is None else t_graph / floor,
                       floor_ms=floor * 1e3, step_over_floor=t / floor, head_ms=t_head * 1e3, per_layer_ms=per_layer * 1e3,
                       experts_touched_per_layer=mean_touched, bytes_read_floor=bytes_layers + bytes_head,
                       full_model_step_ms=t_full * 1e3, full_model_tokens_per_s=B / t_full, full_model_floor_ms=floor_full * 1e3)
            if args.kernel_times:  # where the step's device time is: the graph step's kernels (eager without one)
                row.update(profile_step(graph_step or (lambda: step(*args_)), device),
                           kernel_times_of="graph" if graph_step else "eager")
            rows.append(row)
            print(f"batch {B:>4}: step {t * 1e3:8.3f} ms ({layers} layers), {B / t:9.1f} tok/s, floor {floor * 1e3:7.3f} ms, "
                  f"step/floor {t / floor:5.2f}; {mean_touched:.0f} experts/layer; "
                  f"{full_layers}-layer estimate {t_full * 1e3:.2f} ms = {B / t_full:.0f} tok/s", flush=True)
            if t_graph is not None:
                print(f"            graph step {t_graph * 1e3:8.3f} ms, {B / t_graph:9.1f} tok/s, step/floor {t_graph / floor:5.2f}",
                      flush=True)
    result = dict(benchmark="engine_decode", **run_meta(device),
                  model=f"{model_name} shape, random {'e4m3 (128 x 128 blocks)' if args.fp8 else 'bf16'} weights",
                  model_key=args.model, fp8=args.fp8,
                  kernels=kernels.name, tiny_max_pairs=args.tiny_max_pairs,
                  note=note or f"all {full_layers} layers built", ceilings=ceilings, results=rows)
    tag = ("cpu_smoke" if args.cpu_smoke else result["device"].replace(" ", "_")) + (
        "" if args.model == "qwen3-30b-a3b" else f"_{args.model}") + ("_fp8" if args.fp8 else "")
    print(f"wrote {write_result(args.out or RESULTS / f'engine_decode_{tag}.json', result)}")
    return result


if __name__ == "__main__":
    main()
