"""Engine flags of the `moelink` subcommands that build an engine (`generate`, `serve`), named as vLLM names
them, and the `EngineArgs` they make. Its own module so that the gRPC front's CLI and the top-level CLI share
it without importing each other."""
from __future__ import annotations

import argparse

from ..config.grammar_config import (DEFAULT_GRAMMAR_COMPILE_TIMEOUT_S, DEFAULT_GRAMMAR_COMPILE_WORKERS,
                                     DEFAULT_MAX_GRAMMAR_CHARS, DEFAULT_MAX_QUEUED_GRAMMAR_COMPILES)
from .vllm_flag_table import row
from .vllm_flags import (add_vllm_engine_flags, apply_vllm_engine_flags, human_int, kv_cache_dtype_flag,
                         max_model_len_flag)
from ..config.timeouts import DEFAULT_HEARTBEAT_TIMEOUT_S, DEFAULT_REJOIN_DELAY_S, DEFAULT_STEP_TIMEOUT_S, FIRST_STEP_TIMEOUT_S


# comm.backends.ALL_TO_ALL_NAMES spelled out: importing moelink.comm loads torch, which building the parser (and
# `moelink serve --help`) must not wait for; tests/comm/test_backends.py checks that the two lists agree.
ALL_TO_ALL_NAMES = ("auto", "none", "torch", "torch_padded", "nccl", "two_level")


# The expert-parallel size: one long flag, vLLM's name, and its short alias. `-ep` is no prefix of another flag;
# `--ep` (how `moelink plan` and the benchmarks spell it) is accepted as well: argparse takes an exact match
# before abbreviations, so it never reads as an ambiguous prefix of --ep-rejoin, --eplb-interval, ...
EP_FLAGS = ("--expert-parallel-size", "-ep", "--ep")


def add_ep_flag(p: argparse.ArgumentParser, default: int, help: str, dest: str = "expert_parallel_size") -> None:
    """The expert-parallel size flag, spelled the same way by every subcommand that takes one."""
    p.add_argument(*EP_FLAGS, dest=dest, type=int, default=default, metavar="N", help=help)


# vLLM's spelling of the tensor-parallel size, long and short.
TP_FLAGS = ("--tensor-parallel-size", "-tp")


def add_tp_flag(p: argparse.ArgumentParser, default: int = 1, dest: str = "tensor_parallel_size") -> None:
    """The tensor-parallel size flag (docs/tensor-parallelism.md)."""
    p.add_argument(*TP_FLAGS, dest=dest, type=int, default=default, metavar="N",
                   help="ranks per tensor-parallel group (consecutive ranks of one node) that split attention, dense "
                        "MLPs, embedding and LM head; the experts stay in EP over every rank (default %(default)d)")


def _mm_limits(text: str) -> dict:
    """--limit-mm-per-prompt's value (engine/config/multimodal.py parses it; argparse shows its message)."""
    from ..config.multimodal import parse_limit_mm_per_prompt

    try:
        return parse_limit_mm_per_prompt(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine flags, named as vLLM names them, one group of concerns after the other (the order `--help` shows)."""
    _add_model_args(p)
    _add_memory_args(p)
    _add_parallel_args(p)
    _add_step_loop_args(p)
    _add_request_feature_args(p)
    _add_lora_args(p)
    add_vllm_engine_flags(p)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """What is served and in what precision: the checkpoint, its dtype and quantization, the KV cache's
    dtype, the longest sequence, a multimodal model's image limits."""
    p.add_argument("model", help="a local Hugging Face checkpoint directory, or a Hugging Face repo id ('org/name'): "
                                 "read from the Hugging Face cache, downloaded when missing unless HF_HUB_OFFLINE=1")
    p.add_argument("--revision", default=None,
                   help="for a repo id: the branch, tag or commit hash to serve (default: the repo's default branch)")
    p.add_argument("--download-dir", default=None, metavar="DIR",
                   help="for a repo id: the Hugging Face cache to read and download into (default: HF_HUB_CACHE, "
                        "~/.cache/huggingface/hub)")
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"],
                   help="auto / safetensors: read the checkpoint's weights; dummy: random weights made on the device "
                        "from config.json alone (nothing else needed, no tokenizer: token-id prompts), to benchmark a "
                        "model without downloading it; outputs are meaningless")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16 or float64")
    p.add_argument("--max-model-len", type=max_model_len_flag, default=None, metavar="TOKENS",
                   help="longest sequence (prompt + output) a request may have, 32k = 32000 and 32K = 32768 as vLLM "
                        "reads them (default: the model's max_position_embeddings); a request past it is refused")
    p.add_argument("--quantization", "-q", default=None, choices=["fp8"],
                   help="fp8: block-quantize a float checkpoint's weights at load (W8A8, 128x128 blocks); "
                        "default: run the checkpoint as published (FP8 checkpoints run FP8)")
    p.add_argument("--fp8-block-size", type=int, nargs=2, default=None, metavar=("BN", "BK"),
                   help="with --quantization fp8: the weight block (default 128 128)")
    p.add_argument("--kv-cache-dtype", default="auto", type=kv_cache_dtype_flag,
                   help="fp8 (= fp8_e4m3): the KV cache in one byte per value with a per-layer scale, twice the "
                        "tokens of a bf16 cache in the same memory; auto: the model's dtype")
    p.add_argument("--index-cache-dtype", default="auto", choices=["auto", "fp8", "model"],
                   help="DeepSeek Sparse Attention's indexer key cache: fp8 (e4m3 keys, a float32 scale per 128 "
                        "values), model (the model's dtype); auto: fp8 with --kv-cache-dtype fp8, else model")
    p.add_argument("--limit-mm-per-prompt", type=_mm_limits, default=None, metavar="JSON",
                   help="a multimodal checkpoint's images and videos per prompt, as vLLM takes them ('{\"image\": "
                        "4, \"video\": 1}' or image=4,video=1; images 16 and video 0 by default; both 0 serves its "
                        "text model, the vision tower not loaded; docs/multimodal.md)")
    p.add_argument("--mm-max-pixels", type=int, default=None, metavar="N",
                   help="the most pixels (width x height) one image, or one frame of a video, may have (default "
                        "33554432)")


def _add_memory_args(p: argparse.ArgumentParser) -> None:
    """How much runs at once and in how much memory: sequences and tokens per step, the KV cache's blocks
    and share of device memory, the prefix cache, the device."""
    p.add_argument("--max-num-seqs", type=int, default=256,
                   help="most sequences running at once on each rank (a step's decode batch; default %(default)s)")
    p.add_argument("--max-num-batched-tokens", type=human_int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", "--num-gpu-blocks-override", type=int, default=None)
    p.add_argument("--kv-cache-memory-bytes", type=human_int, default=None)
    p.add_argument("--gpu-memory-utilization", "--device-memory-utilization", type=float, default=0.9,
                   metavar="FRACTION",
                   help="fraction of each GPU's memory the engine may fill: weights, activations, then the KV cache "
                        "takes what is left up to it (default %(default)s; ignored with --num-kv-blocks)")
    p.add_argument("--no-enable-prefix-caching", "--disable-prefix-caching", dest="enable_prefix_caching",
                   action="store_false")
    p.add_argument("--device", default="auto")


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    """Expert and tensor parallelism: the group sizes, the Ray cluster, the all-to-all, redundant experts
    and online load balancing."""
    # -ep: vLLM's short for --enable-expert-parallel, bare, and moelink's size with a number (add_vllm_engine_flags).
    p.add_argument(*(f for f in EP_FLAGS if f != "-ep"), dest="expert_parallel_size", type=int, default=1, metavar="N",
                   help="ranks for data-parallel attention + expert-parallel MoE (Ray beyond 1); with -tp, the whole "
                        "world (a multiple of -tp)")
    add_tp_flag(p)
    p.add_argument("--cpu-reserved-cores", type=int, default=None, metavar="N",
                   help="a CPU engine leaves N cores to the processes serving beside it (HTTP front, gateway, "
                        "tokenizer): its torch threads are the cores it may use less N, at least 1 (vLLM's "
                        "VLLM_CPU_NUM_OF_RESERVED_CPU; OMP_NUM_THREADS in the environment wins); default: 1 for "
                        "`serve`, 0 offline")
    p.add_argument("--executor", default="auto", choices=("auto", "inprocess", "mp", "ray"),
                   help="where the ranks run: inprocess (one rank in this process), mp (one rank in a process of its "
                        "own, its forward beside the server's front and streaming: docs/serving.md#the-rank-process), "
                        "ray (Ray actors); auto (default): mp for `serve` at one rank, inprocess offline, Ray beyond")
    p.add_argument("--ray-address", default=None,
                   help="join this Ray cluster ('auto' = the one `ray start` made); default: start a local one")
    p.add_argument("--all-to-all", default="auto", choices=ALL_TO_ALL_NAMES)
    p.add_argument("--num-redundant-experts", type=int, default=0)
    p.add_argument("--eplb-interval", type=int, default=0, metavar="STEPS",
                   help="online expert load balancing: every STEPS engine steps, re-place the experts (and the "
                        "redundant copies) from the last STEPS steps' expert load and move weights to match; 0: off")
    p.add_argument("--eplb-staging-mb", type=float, default=None, metavar="MIB",
                   help="online EPLB: the most expert weight one rank stages in one move chunk (MiB); a plan "
                        "with a layer over it is refused; default: the largest expert x its slots per rank")
    p.add_argument("--ep-nvlink-domain-size", type=int, default=None, metavar="N",
                   help="with --all-to-all two_level: N consecutive ranks share an NVLink domain (8: HGX node, 72: "
                        "GB200 NVL72); default: one domain per Ray node, read from the placement group")
    p.add_argument("--ep-decode-capacity", type=int, default=None, metavar="TOKENS",
                   help="tokens per rank of a low-latency (decode or speculative verify) dispatch on the "
                        "fixed-capacity all-to-alls (torch_padded, nccl): fixed buffers, no counts exchange, CUDA-graph "
                        "safe; larger or mixed steps run high-throughput, sized from the step (default: --max-num-seqs, "
                        "times 1 + k with k speculative tokens)")


def _add_step_loop_args(p: argparse.ArgumentParser) -> None:
    """How the step loop runs and what ends it: overlap, timeouts, a lost rank (elastic EP, rejoin), CUDA
    graphs, warm-up."""
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="overlap the host's work for step N+1 (scheduling, inputs, sampling set-up, outputs) with "
                        "the device's step N (default on; --no-async-scheduling: the serial loop)")
    p.add_argument("--enable-two-batch-overlap", action="store_true",
                   help="expert parallelism: run each step as two micro-batches whose attention and experts "
                        "overlap each other's all-to-all (no effect at --expert-parallel-size 1)")
    p.add_argument("--step-timeout", type=float, default=DEFAULT_STEP_TIMEOUT_S, metavar="SECONDS",
                   help="a model step running longer than this is a hang: the engine fails (health NOT_SERVING, "
                        "requests end with the reason); the first step, which compiles kernels, gets at least "
                        f"{FIRST_STEP_TIMEOUT_S:.0f} s (default {DEFAULT_STEP_TIMEOUT_S:.0f})")
    p.add_argument("--heartbeat-timeout", type=float, default=DEFAULT_HEARTBEAT_TIMEOUT_S, metavar="SECONDS",
                   help="an expert-parallel rank that answers no heartbeat for this long (frozen, wedged, "
                        f"unreachable) fails the engine, busy or idle (default {DEFAULT_HEARTBEAT_TIMEOUT_S:.0f})")
    p.add_argument("--elastic-ep", action=argparse.BooleanOptionalAction, default=True,
                   help="survive a lost expert-parallel rank: drop it, re-place the experts on the survivors "
                        "(reloaded from the checkpoint), recompute the requests and go on at EP N-1 when >= 2 "
                        "ranks survive (default); --no-elastic-ep, or EP 2, fails the engine on a lost rank")
    p.add_argument("--ep-rejoin", action=argparse.BooleanOptionalAction, default=None,
                   help="after a lost rank, start a replacement in its place, pre-load its experts in the background "
                        "and admit it at a step boundary: back to EP N, unfinished requests recomputed (default: on "
                        "with --elastic-ep)")
    p.add_argument("--ep-rejoin-delay-s", type=float, default=DEFAULT_REJOIN_DELAY_S, metavar="SECONDS",
                   help=f"how long after a rank loss the replacement is started (default {DEFAULT_REJOIN_DELAY_S:g})")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=False,
                   help="never replay CUDA graphs (default: decode steps on CUDA replay captured graphs)")
    p.add_argument("--cuda-graph-sizes", "--cudagraph-capture-sizes", type=int, nargs="+", default=None, metavar="N",
                   help="decode batch sizes to capture (default: 1 2 4 8, every 8 to 64, every 16 to 256, every 32 "
                        "to 512, capped at --max-num-seqs; larger batches decode eagerly)")
    p.add_argument("--skip-warmup", action="store_true",
                   help="serve without first compiling and running every kernel variant a request can hit (a "
                        "faster restart; the first requests then pay the compiles)")


def _add_request_feature_args(p: argparse.ArgumentParser) -> None:
    """What requests may ask for beyond plain generation: speculative decoding, fair shares among
    clients, RL weight updates, structured outputs (grammars), routed experts, batch-invariant results."""
    p.add_argument("--speculative-config", "-sc", default=None, metavar="JSON",
                   help="speculative decoding, as vLLM spells it: '{\"method\": \"ngram\", "
                        "\"num_speculative_tokens\": 3}' (prompt lookup; prompt_lookup_max / prompt_lookup_min "
                        "too; min_draft_acceptance, max_verify_fraction, draft_probe_interval bound the verify "
                        "work). Runs the serial step loop (default: off)")
    p.add_argument("--client-fairness", action=argparse.BooleanOptionalAction, default=True,
                   help="share sequence slots and each step's tokens fairly among clients (the peer's host, then its "
                        "connection; with --api-key, the x-client-id metadata a caller sends), preempting a client "
                        "above its share for one below it that waits (default: on; off: first come, first served)")
    p.add_argument("--max-undelivered-outputs", type=int, default=64, metavar="N",
                   help="outputs of one sequence its client may leave unread (a stream nobody reads) before the "
                        "sequence stops being scheduled, keeping its KV, until the client reads them down to half "
                        "(default: 64; 0: no limit)")
    p.add_argument("--enable-weight-updates", action="store_true",
                   help="take RL control calls: weight updates (from disk, tensors, a trainer's process group), "
                        "pause / continue generation (docs/rl.md); refused without it (default: off)")
    p.add_argument("--grammar-compile-timeout", type=float, default=DEFAULT_GRAMMAR_COMPILE_TIMEOUT_S,
                   metavar="SECONDS", help="a structured-output grammar (JSON schema, regex, EBNF, choice) that takes "
                   "longer to compile is refused naming its field (default %(default)g)")
    p.add_argument("--max-grammar-chars", type=int, default=DEFAULT_MAX_GRAMMAR_CHARS, metavar="N",
                   help="refuse a longer schema, regex, grammar or choice list before compiling it (default %(default)d)")
    p.add_argument("--max-queued-grammar-compiles", type=int, default=DEFAULT_MAX_QUEUED_GRAMMAR_COMPILES,
                   metavar="N", help="refuse (RESOURCE_EXHAUSTED) a new grammar while this many wait to compile "
                   "(default %(default)d)")
    p.add_argument("--grammar-compile-workers", type=int, default=DEFAULT_GRAMMAR_COMPILE_WORKERS, metavar="N",
                   help="processes that compile grammars, one compile each at a time (default %(default)d)")
    p.add_argument("--enable-return-routed-experts", dest="enable_return_routed_experts", action="store_true",
                   default=False, help=row("--enable-return-routed-experts").says)
    p.add_argument("--disable-return-routed-experts", dest="enable_return_routed_experts", action="store_false",
                   help="do not record routed experts (the default)")
    p.add_argument("--batch-invariant", "--enable-deterministic-inference", action="store_true",
                   help="a request's tokens and logprobs bitwise the same whatever else is in the batch, and a "
                        "decode step's logprob equal to the re-prefilled prompt logprob (docs/rl.md; vLLM's "
                        "VLLM_BATCH_INVARIANT=1 too). GQA, MLA, DSA, gated-DeltaNet and KDA models, one rank or expert-parallel; slower kernels")


def _add_lora_args(p: argparse.ArgumentParser) -> None:
    """vLLM's LoRA engine flags (docs/lora.md); `serve` adds --lora-modules (engine/server/cli.py)."""
    p.add_argument("--enable-lora", dest="enable_lora", action="store_true", default=False,
                   help=row("--enable-lora").says)
    p.add_argument("--disable-lora", dest="enable_lora", action="store_false", help="serve no adapters (the default)")
    p.add_argument("--max-loras", type=int, default=1, metavar="N", help=row("--max-loras").says)
    p.add_argument("--max-lora-rank", type=int, default=16, metavar="R", help=row("--max-lora-rank").says)
    p.add_argument("--max-cpu-loras", type=int, default=None, metavar="N", help=row("--max-cpu-loras").says)
    p.add_argument("--lora-target-modules", nargs="+", default=None, metavar="MODULE",
                   help=row("--lora-target-modules").says)


def engine_args_from(ns: argparse.Namespace):
    apply_vllm_engine_flags(ns)  # vLLM's spellings folded into moelink's fields first (before torch loads)
    from ..config.engine_args import EngineArgs

    return EngineArgs(
        model=ns.model, dtype=ns.dtype, max_model_len=ns.max_model_len, max_num_seqs=ns.max_num_seqs,
        max_num_batched_tokens=ns.max_num_batched_tokens, block_size=ns.block_size, num_kv_blocks=ns.num_kv_blocks,
        kv_cache_memory_bytes=ns.kv_cache_memory_bytes, gpu_memory_utilization=ns.gpu_memory_utilization,
        enable_prefix_caching=ns.enable_prefix_caching, device=ns.device, load_progress=ns.use_tqdm_on_load,
        expert_parallel_size=ns.expert_parallel_size, tensor_parallel_size=ns.tensor_parallel_size,
        ray_address=ns.ray_address, all_to_all=ns.all_to_all, executor=ns.executor,
        num_redundant_experts=ns.num_redundant_experts, eplb_interval=ns.eplb_interval,
        eplb_staging_mb=ns.eplb_staging_mb,
        ep_nvlink_domain_size=ns.ep_nvlink_domain_size,
        ep_decode_capacity=ns.ep_decode_capacity,
        enforce_eager=ns.enforce_eager,
        cpu_reserved_cores=ns.cpu_reserved_cores if ns.cpu_reserved_cores is not None else 0,
        generation_config=getattr(ns, "generation_config", "auto"),
        cuda_graph_sizes=ns.cuda_graph_sizes, step_timeout=ns.step_timeout, heartbeat_timeout=ns.heartbeat_timeout,
        revision=ns.revision, download_dir=ns.download_dir, quantization=ns.quantization,
        fp8_block_size=ns.fp8_block_size, kv_cache_dtype=ns.kv_cache_dtype, index_cache_dtype=ns.index_cache_dtype,
        enable_two_batch_overlap=ns.enable_two_batch_overlap, elastic_ep=ns.elastic_ep,
        async_scheduling=ns.async_scheduling,
        ep_rejoin=ns.ep_rejoin, ep_rejoin_delay_s=ns.ep_rejoin_delay_s, load_format=ns.load_format,
        skip_warmup=ns.skip_warmup, speculative_config=ns.speculative_config, client_fairness=ns.client_fairness,
        max_undelivered_outputs=ns.max_undelivered_outputs,
        enable_weight_updates=ns.enable_weight_updates,
        grammar_compile_timeout=ns.grammar_compile_timeout, max_grammar_chars=ns.max_grammar_chars,
        max_queued_grammar_compiles=ns.max_queued_grammar_compiles, grammar_compile_workers=ns.grammar_compile_workers,
        seed=getattr(ns, "engine_seed", None),  # serve's --seed (generate's --seed is per request)
        batch_invariant=ns.batch_invariant, enable_return_routed_experts=ns.enable_return_routed_experts,
        limit_mm_per_prompt=ns.limit_mm_per_prompt, mm_max_pixels=ns.mm_max_pixels,
        enable_lora=ns.enable_lora, max_loras=ns.max_loras, max_lora_rank=ns.max_lora_rank,
        max_cpu_loras=ns.max_cpu_loras, lora_target_modules=ns.lora_target_modules,
    )
