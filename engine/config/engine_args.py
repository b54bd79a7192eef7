"""EngineArgs: every user-facing engine option in one validated place, turned into per-concern configs."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Union, cast

import torch

from moelink.scheduler.config import CacheConfig, SchedulerConfig

from .model import KV_CACHE_DTYPES, ModelConfig
from .parallel import ParallelConfig
from ..models.dsa_config import INDEX_CACHE_DTYPES
from .quantization import ONLINE_METHODS
from .checkpoint_headers import check_checkpoint
from .graph_config import CudaGraphConfig
from .grammar_config import (DEFAULT_GRAMMAR_COMPILE_TIMEOUT_S, DEFAULT_GRAMMAR_COMPILE_WORKERS, DEFAULT_MAX_GRAMMAR_CHARS,
                             DEFAULT_MAX_QUEUED_GRAMMAR_COMPILES, GrammarConfig)
from ..models.mla_config import MLAConfig
from ..models.gated_deltanet_config import LinearAttentionConfig
from ..models.mamba1_config import Mamba1Config
from ..models.mamba2_config import Mamba2Config
from ..models.short_conv_config import ShortConvConfig
from .kv_sizing import driver_num_kv_blocks, kv_sliding_window, state_pool_bytes
from .model_source import resolve_model_dir
from .multimodal import MultimodalConfig
from .timeouts import (DEFAULT_HEARTBEAT_TIMEOUT_S, DEFAULT_REJOIN_DELAY_S, DEFAULT_STEP_TIMEOUT_S, check_rejoin,
                       check_seconds)
from ..models.compressed_attention_config import CompressedAttentionConfig, check_ring_rollback
from .speculative import SpeculativeConfig
from .tensor_parallel import check_tensor_parallel
from .batch_invariant import from_env as batch_invariant_from_env, resolve_kernels
from .lora import LoRAConfig, lora_config
from .worker_config import LOAD_FORMATS, WorkerConfig
from .generation_defaults import check_generation_config, generation_defaults

if TYPE_CHECKING:  # typing only (tests/test_layering.py TYPING_SEAMS): the configuration runs without the contract
    from ..contract.kv_connector import KVConnectorFactory, TensorParallelKVConnector

logger = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig  # per rank: each rank has its own KV pool
    scheduler: SchedulerConfig  # per rank
    parallel: ParallelConfig
    device: torch.device  # the device type every rank uses (a rank's own index is set by its worker)
    kernels: str
    load_progress: bool
    # With cache.num_kv_blocks None, how full each rank's device may get once the KV cache is in.
    gpu_memory_utilization: float = 0.9
    cuda_graph: CudaGraphConfig = CudaGraphConfig()  # decode batch sizes captured as CUDA graphs (none: eager)
    load_format: str = "auto"  # engine/worker_config.LOAD_FORMATS; "dummy": random weights, no tokenizer needed
    skip_warmup: bool = False  # start without compiling every kernel variant first (engine/rank/warmup.py)
    # Moves KV between engines (prefill/decode disaggregation): engine/contract/kv_connector.py. None: none.
    kv_connector: KVConnectorFactory | None = None
    # Speculative decoding (engine/config/speculative.py); None: off.
    speculative: Optional[SpeculativeConfig] = None
    # Bounds on structured-output grammar compiles (engine/config/grammar_config.py).
    grammar: GrammarConfig = GrammarConfig()
    # Seeds requests that carry none (EngineArgs.seed); None: they sample from the ranks' generators.
    seed: Optional[int] = None
    # Rollout routing replay: every rank records its steps' routed experts (EngineArgs.enable_return_routed_experts).
    return_routed_experts: bool = False
    lora: LoRAConfig | None = None  # LoRA adapters (EngineArgs.enable_lora); None: off
    # RL control calls taken (EngineArgs.enable_weight_updates; engine/rl/control.py).
    enable_weight_updates: bool = False
    # What a multimodal checkpoint may be sent, and its rank's encoder cache (engine/config/multimodal.py).
    multimodal: MultimodalConfig = MultimodalConfig()
    # A CPU engine's cores left to the serving processes beside it (EngineArgs.cpu_reserved_cores).
    cpu_reserved_cores: int = 0
    # The checkpoint's sampling defaults (EngineArgs.generation_config; engine/config/generation_defaults.py): the
    # SamplingParams fields a request leaves out; empty: SamplingParams' own.
    sampling_defaults: dict = field(default_factory=dict)

    def worker_config(self) -> WorkerConfig:
        """What every rank's Worker gets: the only place a WorkerConfig is made from the engine's config."""
        return WorkerConfig(
            model=self.model, device=self.device, block_size=self.cache.block_size,
            num_kv_blocks=self.cache.num_kv_blocks, kernels=self.kernels,
            cuda_graph_sizes=self.cuda_graph.batch_sizes, load_progress=self.load_progress,
            gpu_memory_utilization=self.gpu_memory_utilization, world_size=self.parallel.world_size,
            comm_timeout_s=self.parallel.comm_timeout_s,
            two_batch_overlap=self.parallel.enable_two_batch_overlap and self.parallel.world_size > 1,
            async_scheduling=self.scheduler.async_scheduling, load_format=self.load_format,
            kv_connector=self.kv_connector, speculative=self.speculative,
            num_state_slots=self.cache.num_state_slots, num_state_checkpoints=self.cache.num_state_checkpoints,
            tensor_parallel_size=self.parallel.tensor_parallel_size, return_routed_experts=self.return_routed_experts,
            lora=self.lora, multimodal=self.multimodal, cpu_reserved_cores=self.cpu_reserved_cores)


@dataclass
class EngineArgs:
    """Options named as in vLLM where the concept is the same."""

    # A local checkpoint directory or a Hugging Face repo id ('org/name'), kept as the user gave it: the
    # served model name defaults to it. `model_path()` is the local directory everything reads.
    model: str
    dtype: str = "auto"
    max_model_len: Optional[int] = None
    max_num_seqs: int = 256
    max_num_batched_tokens: Optional[int] = None
    block_size: int = 16
    num_kv_blocks: Optional[int] = None
    kv_cache_memory_bytes: Optional[int] = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    # A model with linear-attention layers: prefix-cache checkpoints of their per-sequence state (scheduler/
    # hybrid_cache.py); None: max_num_seqs // 4 (0 without prefix caching). Each holds one sequence's state.
    num_state_checkpoints: Optional[int] = None
    device: str = "auto"
    kernels: str = "auto"
    # On a CPU device (one rank), cores the engine's compute leaves to the processes serving beside it (the HTTP
    # front, the gateway, the gRPC threads, the tokenizer): torch's intra-op threads are the cores this process may
    # run on less these, at least one. vLLM's VLLM_CPU_NUM_OF_RESERVED_CPU. `moelink serve` reserves 1; offline, 0
    # (every core computes); OMP_NUM_THREADS set in the environment wins.
    cpu_reserved_cores: int = 0
    # "auto": the checkpoint's generation_config.json gives the sampling fields a request leaves out (vLLM's
    # --generation-config auto, its default); "vllm": SamplingParams' own defaults.
    generation_config: str = "auto"
    load_progress: bool = False
    expert_parallel_size: int = 1
    # Ranks per tensor-parallel group (vLLM's --tensor-parallel-size / -tp; ParallelConfig.tensor_parallel_size).
    tensor_parallel_size: int = 1
    executor: str = "auto"
    ray_address: Optional[str] = None
    all_to_all: str = "auto"
    num_redundant_experts: int = 0
    eplb_interval: int = 0
    eplb_staging_mb: Optional[float] = None
    # all_to_all="two_level" only: ranks per NVLink domain (consecutive ranks; 72 on a GB200 NVL72), overriding
    # the node map read from the Ray placement group; ep_node_ids gives each rank's node number outright (for
    # tests and simulation: several "nodes" on one machine).
    ep_nvlink_domain_size: Optional[int] = None
    ep_node_ids: Optional[list[int]] = None
    # Per-rank block of a low-latency (decode) dispatch on torch_padded / nccl; None: max_num_seqs.
    ep_decode_capacity: Optional[int] = None
    # Watchdogs of a multi-rank engine, in seconds: a model step that runs longer than step_timeout
    # (the first one, which compiles kernels: at least 600 s), or a rank silent for heartbeat_timeout,
    # fails the engine (health NOT_SERVING, in-flight requests end with the reason).
    step_timeout: float = DEFAULT_STEP_TIMEOUT_S
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT_S
    # Decode steps replay CUDA graphs (on CUDA with the Triton kernels) unless enforce_eager;
    # cuda_graph_sizes: the padded batch sizes captured (default: 1, 2, 4, 8, 16, ... max_num_seqs).
    enforce_eager: bool = False
    cuda_graph_sizes: Optional[list[int]] = None
    # For a repo id: the branch, tag or commit hash to serve (default: the repo's default branch), and the
    # Hugging Face cache directory to read and download into (default: HF_HUB_CACHE, ~/.cache/huggingface/hub).
    revision: Optional[str] = None
    download_dir: Optional[str] = None
    # "fp8": block-quantize a float checkpoint's linears and experts at load (128x128 blocks, halving weight
    # memory against bf16); None runs the checkpoint as published (an FP8 checkpoint runs FP8 either way).
    quantization: Optional[str] = None
    # The [rows, columns] block of weights quantized at load (default [128, 128], as every FP8 release).
    fp8_block_size: Optional[list[int]] = None
    # "fp8" (= "fp8_e4m3"): the KV cache in one byte per value with a per-layer scale (twice the tokens of a
    # bf16 cache in the same memory); "auto": the model's dtype.
    kv_cache_dtype: str = "auto"
    # DeepSeek Sparse Attention's indexer key cache: "auto" (fp8 keys with a float32 scale per 128 values when
    # kv_cache_dtype is fp8, else the model's dtype), "fp8" or "model" (engine/models/dsa_config.py).
    index_cache_dtype: str = "auto"
    # Each step as two micro-batches (split by sequences, balanced by tokens) whose attention and experts run
    # while the other's all-to-all is in flight (engine/rank/step_plan.py). Expert parallelism only: at
    # expert_parallel_size 1 there is no all-to-all, and steps run as one batch (logged once).
    enable_two_batch_overlap: bool = False
    # The overlapped step loop (vLLM's async scheduling): the host schedules and prepares step N+1 while the
    # device runs step N; sampled tokens stay on the device and feed the next step there, and the host learns
    # them a step later (stop checks, streaming). False: the serial loop (schedule, run, wait, update).
    async_scheduling: bool = True
    # Survive a lost EP rank at EP N-1 instead of failing (ParallelConfig.elastic_ep; EP >= 3).
    elastic_ep: bool = True
    # A replacement rank rejoins after a loss, back to EP N (ParallelConfig.ep_rejoin; None: with elastic_ep),
    # started ep_rejoin_delay_s after the loss.
    ep_rejoin: Optional[bool] = None
    ep_rejoin_delay_s: float = DEFAULT_REJOIN_DELAY_S
    # Where the weights come from: "auto" / "safetensors" (the checkpoint's files), or "dummy": random weights
    # made on the device from config.json alone (no safetensors read, no tokenizer needed), to benchmark a
    # model without downloading it. Dummy outputs are meaningless.
    load_format: str = "auto"
    # Start serving without first compiling and running every kernel variant a step can hit (engine/rank/warmup.py):
    # a faster restart, whose first requests pay the compiles (seconds each on a cold cache).
    skip_warmup: bool = False
    # A KV connector (engine/contract/kv_connector.py's `KVConnectorFactory`): each rank's scheduler loads a
    # request's prompt KV through it instead of computing it, and saves the prompt KV it computes. An object, not a
    # command-line flag: the in-host reference is engine/kv_transfer/inhost.py. None: no connector.
    kv_connector: KVConnectorFactory | None = None  # checked in __post_init__ (its two methods)
    # Speculative decoding, as vLLM's --speculative-config: JSON text, a dict or a SpeculativeConfig
    # (engine/config/speculative.py), e.g. '{"method": "ngram", "num_speculative_tokens": 3}'. None: off. It runs
    # the serial step loop (drafts need the tokens just emitted): async_scheduling is turned off, logged once.
    speculative_config: Union[str, dict, SpeculativeConfig, None] = None  # a SpeculativeConfig after __post_init__
    # Share sequence slots and each step's tokens fairly among clients (scheduler/fairness.py; who a client is:
    # engine/server/client_identity.py), preempting a client above its share for one below it that waits. False:
    # first come, first served.
    client_fairness: bool = True
    # A stream's outputs its consumer may leave untaken before its sequence stops being scheduled (until the
    # consumer catches up; SchedulerConfig.max_undelivered_outputs). 0: no limit.
    max_undelivered_outputs: int = 64
    # Structured output's grammar compiles (engine/core/grammar_compile.py): a compile running longer than
    # grammar_compile_timeout seconds fails naming the field; a spec longer than max_grammar_chars, or one
    # arriving while max_queued_grammar_compiles wait, is refused; grammar_compile_workers processes compile.
    grammar_compile_timeout: float = DEFAULT_GRAMMAR_COMPILE_TIMEOUT_S
    max_grammar_chars: int = DEFAULT_MAX_GRAMMAR_CHARS
    max_queued_grammar_compiles: int = DEFAULT_MAX_QUEUED_GRAMMAR_COMPILES
    grammar_compile_workers: int = DEFAULT_GRAMMAR_COMPILE_WORKERS
    # Start the compile processes with the engine rather than at the first grammar (`moelink serve` does).
    grammar_prestart: bool = False
    # vLLM's --seed: a request without a seed of its own samples with one drawn from this seed and its arrival
    # order (engine/core/llm_engine.py), so the same requests in the same order sample the same tokens. None: off.
    seed: Optional[int] = None
    # Rollout routing replay (vLLM's and SGLang's --enable-return-routed-experts): every step records the experts each
    # token was routed to, so that a request with SamplingParams.return_routed_experts gets them back
    # (CompletionOutput.routed_experts; moe/routing_capture.py). Off: such requests are refused.
    enable_return_routed_experts: bool = False
    # A request's tokens and logprobs bitwise the same in any batch (engine/config/batch_invariant.py; vLLM's
    # VLLM_BATCH_INVARIANT=1 turns it on too). Off: the batch decides the reduction order, to the last bits.
    batch_invariant: bool = False
    # LoRA adapters (vLLM's --enable-lora, --max-loras, --max-lora-rank, --max-cpu-loras; engine/config/lora.py,
    # docs/lora.md): requests name an adapter (LoRARequest); off, such requests are refused.
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: Optional[int] = None
    # vLLM's --lora-target-modules: the module names (suffixes, e.g. o_proj, qkv_proj, experts) LoRA runs on; an
    # adapter's other targets are skipped, as vLLM's are. None: every target.
    lora_target_modules: Optional[list[str]] = None
    # RL control calls (docs/rl.md: weight updates, a trainer's process group, pause / continue): refused unless on,
    # naming this flag (--enable-weight-updates); a server takes them only with it.
    enable_weight_updates: bool = False
    # vLLM's --limit-mm-per-prompt: per modality, the most items one prompt may carry ({"image": 16, "video": 0} by
    # default; both 0 serves a multimodal checkpoint as its text model, its vision tower not loaded).
    limit_mm_per_prompt: Optional[dict] = None
    # The most pixels (width x height) one image, or one video frame, may have (engine/config/multimodal.py's
    # default: 32 MP).
    mm_max_pixels: Optional[int] = None

    def __post_init__(self) -> None:
        def bad(field: str, allowed: str):
            raise ValueError(f"{field}={getattr(self, field)!r} is invalid: {allowed}.")

        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            bad("seed", "must be an integer or None")
        if not isinstance(self.enable_weight_updates, bool):
            bad("enable_weight_updates", "must be True or False")

        for name in ("num_kv_blocks", "kv_cache_memory_bytes", "max_num_batched_tokens", "max_model_len"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                bad(name, "must be a positive integer or None")
        if self.num_kv_blocks is not None and self.kv_cache_memory_bytes is not None:
            bad("kv_cache_memory_bytes", "give either num_kv_blocks or kv_cache_memory_bytes, not both")
        if not 0 < self.gpu_memory_utilization <= 1:
            bad("gpu_memory_utilization", "must be in (0, 1]")
        if self.cuda_graph_sizes is not None and not isinstance(self.cuda_graph_sizes, (list, tuple)):
            bad("cuda_graph_sizes", "must be a list of positive batch sizes or None")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            bad("device", "must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if not isinstance(self.model, str) or not self.model:
            bad("model", "must be a local checkpoint directory or a Hugging Face repo id ('org/name')")
        for name in ("revision", "download_dir"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                bad(name, "must be a non-empty string or None")
        if self.download_dir is not None and os.path.exists(self.download_dir) and not os.path.isdir(self.download_dir):
            bad("download_dir", "must be a directory (it is created when missing)")
        check_seconds("step_timeout", self.step_timeout)
        check_seconds("heartbeat_timeout", self.heartbeat_timeout)
        check_rejoin(self.ep_rejoin, self.ep_rejoin_delay_s, self.elastic_ep)
        if self.quantization is not None and self.quantization not in ONLINE_METHODS:
            bad("quantization", f"choose from {', '.join(ONLINE_METHODS)} or None")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            bad("kv_cache_dtype", f"choose from {', '.join(map(repr, KV_CACHE_DTYPES))}")
        if self.index_cache_dtype not in INDEX_CACHE_DTYPES:
            bad("index_cache_dtype", f"choose from {', '.join(map(repr, INDEX_CACHE_DTYPES))}")
        if self.load_format not in LOAD_FORMATS:
            bad("load_format", f"choose from {', '.join(map(repr, LOAD_FORMATS))}")
        if not isinstance(self.skip_warmup, bool):
            bad("skip_warmup", "must be True or False")
        if isinstance(self.cpu_reserved_cores, bool) or not isinstance(self.cpu_reserved_cores, int) \
                or self.cpu_reserved_cores < 0:
            bad("cpu_reserved_cores", "must be an integer >= 0")
        check_generation_config(self.generation_config)
        if not isinstance(self.client_fairness, bool):
            bad("client_fairness", "must be True or False")
        if isinstance(self.max_undelivered_outputs, bool) or not isinstance(self.max_undelivered_outputs, int) \
                or self.max_undelivered_outputs < 0:
            bad("max_undelivered_outputs", "must be an integer >= 0 (0: no limit)")
        if self.kv_connector is not None and not all(
                callable(getattr(self.kv_connector, m, None)) for m in ("scheduler_side", "worker_side")):
            bad("kv_connector", "must be None or a KV connector factory (scheduler_side(rank), worker_side(rank))")
        self.grammar_config()  # validated here, where the user set it
        if self.enable_lora:  # the limits too (the modes LoRA runs with are checked with the model's config)
            LoRAConfig(self.max_loras, self.max_lora_rank, self.max_cpu_loras, target_modules=self._target_modules())
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)

    def _target_modules(self) -> Optional[tuple]:
        """lora_target_modules as LoRAConfig takes it (a tuple), checked there; without enable_lora it is refused."""
        given = self.lora_target_modules
        if given is None:
            return None
        if not self.enable_lora:
            raise ValueError("lora_target_modules is set without enable_lora: it restricts the adapters an engine "
                             "started with --enable-lora runs (add it, or leave --lora-target-modules out).")
        return tuple(given) if isinstance(given, (list, tuple)) else given

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            if not torch.cuda.is_available() and self.expert_parallel_size > 1:
                # The driver decides the ranks' device; a CPU-only driver in front of a GPU
                # cluster would otherwise ask Ray for CPU bundles without a word.
                logger.warning("device='auto' resolved to CPU because this process sees no GPU: the %d ranks "
                               "will run on CPUs. Pass --device cuda to use the cluster's GPUs.",
                               self.expert_parallel_size)
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} is invalid: CUDA is not available on this machine.")
        return dev

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(expert_parallel_size=self.expert_parallel_size, executor=self.executor,
                              ray_address=self.ray_address, all_to_all=self.all_to_all,
                              num_redundant_experts=self.num_redundant_experts, eplb_interval=self.eplb_interval,
                              eplb_staging_mb=self.eplb_staging_mb, step_timeout_s=self.step_timeout,
                              heartbeat_timeout_s=self.heartbeat_timeout, ep_decode_capacity=self.ep_decode_capacity,
                              ep_nvlink_domain_size=self.ep_nvlink_domain_size, ep_node_ids=self.ep_node_ids,
                              enable_two_batch_overlap=self.enable_two_batch_overlap, elastic_ep=self.elastic_ep,
                              ep_rejoin=self.ep_rejoin, ep_rejoin_delay_s=self.ep_rejoin_delay_s,
                              tensor_parallel_size=self.tensor_parallel_size)

    def model_path(self) -> str:
        """The local directory of `model`: itself, or a repo id's snapshot from the Hugging Face cache
        (downloaded first unless the hub is offline). Done before anything reads config.json."""
        return resolve_model_dir(self.model, self.revision, self.download_dir, weights=self.load_format != "dummy")

    def create_engine_config(self) -> EngineConfig:
        parallel = self.parallel_config()
        if parallel.enable_two_batch_overlap and parallel.world_size == 1:
            logger.info("enable_two_batch_overlap has no effect at expert_parallel_size=1 (no all-to-all to "
                        "overlap): steps run as one batch.")
        path = self.model_path()
        model_cfg = ModelConfig.from_pretrained(path, self.dtype, self.max_model_len, quantization=self.quantization,
                                                kv_cache_dtype=self.kv_cache_dtype, fp8_block_size=self.fp8_block_size,
                                                index_cache_dtype=self.index_cache_dtype)
        if path != self.model:
            model_cfg.model_id = self.model
        elif model_cfg.model != path:
            # A directory as typed ("./builtin-model", "models//x/"): pathlib normalized it, and the argument as given
            # is the name vLLM serves (and this server's default served name): kept.
            model_cfg.model = path
        if self.load_format != "dummy":
            check_checkpoint(model_cfg)  # headers against config.json, before any rank sizes a tensor from either
        spec = self.speculative_config
        assert spec is None or isinstance(spec, SpeculativeConfig)  # parsed by __post_init__
        if spec is not None:
            spec.check_model(model_cfg.num_nextn_predict_layers, model_cfg.architecture, model_cfg.hf_config)
            # An EAGLE-3 head's directory, fetched and checked against this model before anything is sized.
            spec = spec.resolve_draft_model(model_cfg, self.download_dir, weights=self.load_format != "dummy")
        check_tensor_parallel(model_cfg, parallel.tensor_parallel_size, parallel.experts_split_by_tp)
        kv_connector = self.kv_connector
        if parallel.tensor_parallel_size > 1:
            kv_connector = self._check_tp_features(parallel, model_cfg, spec)
        if parallel.expert_world_size > model_cfg.num_experts + parallel.num_redundant_experts:
            raise ValueError(
                f"expert_parallel_size={parallel.expert_world_size} is invalid: the model has "
                f"{model_cfg.num_experts} experts (+{parallel.num_redundant_experts} redundant), fewer than ranks."
            )
        device = self.resolve_device()
        # The budget must hold at least one whole sequence's worth of chunks: vLLM's default of 8192,
        # but never below max_num_seqs so every running request can decode each step.
        budget = self.max_num_batched_tokens or max(8192, self.max_num_seqs)
        async_scheduling = self.async_scheduling
        if self.speculative_config is not None and async_scheduling:
            logger.info("speculative decoding runs the serial step loop: async scheduling is off.")
            async_scheduling = False
        drafts = {} if spec is None else dict(  # the verify work drafts may cost (scheduler/draft_control.py)
            spec_min_draft_acceptance=spec.min_draft_acceptance, spec_max_verify_fraction=spec.max_verify_fraction,
            spec_probe_interval=spec.draft_probe_interval)
        lora = lora_config(self.enable_lora, self.max_loras, self.max_lora_rank, self.max_cpu_loras,
                           parallel=parallel, kv_connector=self.kv_connector, target_modules=self._target_modules(),
                           attention=model_cfg.attention, quantization=model_cfg.quantization,
                           architecture=model_cfg.architecture)
        sched = SchedulerConfig(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=budget,
                                max_model_len=model_cfg.max_model_len, async_scheduling=async_scheduling,
                                client_fairness=self.client_fairness, max_loras=lora.max_loras if lora else 0,
                                max_undelivered_outputs=self.max_undelivered_outputs,
                                **drafts)
        slots, ckpts = self._state_slots(model_cfg, spec)
        cache = CacheConfig(block_size=self.block_size, num_kv_blocks=self._num_blocks(model_cfg, device, spec),
                            enable_prefix_caching=self.enable_prefix_caching,
                            num_state_slots=slots, num_state_checkpoints=ckpts,
                            sliding_window=kv_sliding_window(model_cfg),
                            block_hash_lookahead=1 if spec is not None and spec.runs_on_device else 0)
        graphs = CudaGraphConfig.resolve(self.enforce_eager, self.cuda_graph_sizes, self.max_num_seqs, device)
        kernels = resolve_kernels(self.batch_invariant or batch_invariant_from_env(), self.kernels, model_cfg,
                                  tensor_parallel_size=parallel.tensor_parallel_size,
                                  expert_parallel_size=self.expert_parallel_size,
                                  index_cache_dtype=self.index_cache_dtype)
        return EngineConfig(model_cfg, cache, sched, parallel, device, kernels, self.load_progress,
                            self.gpu_memory_utilization, graphs, self.load_format,
                            skip_warmup=self.skip_warmup, kv_connector=kv_connector,
                            speculative=spec, grammar=self.grammar_config(), seed=self.seed,
                            return_routed_experts=self._routed_experts(parallel), lora=lora,
                            enable_weight_updates=self.enable_weight_updates, multimodal=self.multimodal_config(),
                            cpu_reserved_cores=self.cpu_reserved_cores,
                            sampling_defaults=generation_defaults(model_cfg.model, self.generation_config))

    def multimodal_config(self) -> MultimodalConfig:
        kw = {} if self.mm_max_pixels is None else {"max_pixels": self.mm_max_pixels}
        return MultimodalConfig(limit_mm_per_prompt=self.limit_mm_per_prompt, **kw)

    def _routed_experts(self, parallel: ParallelConfig) -> bool:
        """enable_return_routed_experts, checked against the layout: under TP with EP over the world each rank of a
        TP group routes its own slice of the tokens (engine/tp/experts.py), which no rank's record holds whole."""
        if not isinstance(self.enable_return_routed_experts, bool):
            raise ValueError(f"enable_return_routed_experts={self.enable_return_routed_experts!r} is invalid: must be "
                             "True or False.")
        if self.enable_return_routed_experts and parallel.tensor_parallel_size > 1 and not parallel.experts_split_by_tp:
            raise ValueError(f"enable_return_routed_experts is not supported with tensor_parallel_size="
                             f"{parallel.tensor_parallel_size} and expert_parallel_size={self.expert_parallel_size}: "
                             "each TP rank routes a slice of the tokens; serve with TP alone (experts split by TP) "
                             "or EP alone.")
        return self.enable_return_routed_experts

    def _check_tp_features(self, parallel: ParallelConfig, model_cfg: ModelConfig, spec: SpeculativeConfig | None):
        """What tensor parallelism does not compose with yet, refused naming the flags (docs/tensor-parallelism.md);
        returns the KV connector the engine runs with. Speculative decoding runs under TP (engine/spec/proposer/__init__.py):
        host drafts on every rank, the MTP layers (DeepSeek's, Qwen3-Next / Qwen3.5's) split like a main layer, an
        EAGLE-3 head replicated. A KV connector is bound to the TP layout (`for_tensor_parallel`): the remote one
        (engine/kv_transfer/tp_shard.py) saves or loads each rank's own heads, the offload tiers
        (engine/kv_transfer/offload.py) keep each rank's own cache and report a transfer once the group has it."""
        kvc, tp = self.kv_connector, parallel.tensor_parallel_size
        if kvc is None:
            return None
        if not callable(getattr(kvc, "for_tensor_parallel", None)):
            raise ValueError(f"kv_connector={type(kvc).__name__} is not supported with tensor_parallel_size={tp}: "
                             "a TP rank's KV is its heads' only; the connectors bound to a TP layout are "
                             "RemoteKVConnector (prefill/decode disaggregation, engine/kv_transfer/remote.py), "
                             "OffloadKVConnector (the offload tiers) and WithOffload (both).")
        kinds = {type(a).__name__ for a in (*model_cfg.layer_attention, model_cfg.attention)
                 if not isinstance(a, (LinearAttentionConfig, Mamba1Config, Mamba2Config, ShortConvConfig))}  # (state groups)
        # The tiers copy each rank's own blocks whatever their kind; only a transfer between engines maps heads.
        if len(kinds) > 1 and getattr(kvc, "name", None) != "offload":
            raise ValueError(f"kv_connector (prefill/decode disaggregation) is not supported for "
                             f"{model_cfg.architecture} with tensor_parallel_size={tp}: its layers mix KV kinds "
                             f"({', '.join(sorted(kinds))}), and a rank's KV shard is one kind's.")
        # Whole on every rank, no heads to name: MLA's latent; DeepSeek-V4's one shared KV head, compressed entries
        # and index keys (engine/models/deepseek_v4/attention.py keeps them whole under TP).
        latent = isinstance(model_cfg.attention, (MLAConfig, CompressedAttentionConfig))
        # A hybrid model's states move rank to rank between engines of one TP size (checked per load).
        bound = cast("TensorParallelKVConnector", kvc)  # has it: checked above (the config imports no protocol)
        return bound.for_tensor_parallel(tp, 0 if latent else model_cfg.attention.num_kv_heads,
                                         states=bool(model_cfg.state_layers), world_size=parallel.world_size)

    def grammar_config(self) -> GrammarConfig:
        return GrammarConfig(workers=self.grammar_compile_workers, max_queued=self.max_queued_grammar_compiles,
                             timeout_s=self.grammar_compile_timeout, max_spec_chars=self.max_grammar_chars,
                             prestart=self.grammar_prestart)

    def _state_slots(self, model_cfg: ModelConfig, spec) -> tuple[int, int]:
        """(state slots, state checkpoints) of a model with linear-attention layers (scheduler/hybrid_cache.py): a
        slot per sequence that may run, and a quarter as many prefix-cache checkpoints (each holds a whole
        sequence's state: ~75 MB for Qwen3-Next-80B); (0, 0) for other models."""
        if not model_cfg.state_layers:
            return 0, 0
        if model_cfg.hyper_connections is not None:  # one residual stream for an EAGLE-3 head, not several
            model_cfg.hyper_connections.check_speculative(spec, model_cfg.architecture)
        # Compressed-attention layers: which drafts their window and compressor rings can be rolled back from.
        check_ring_rollback(spec, model_cfg.layer_attention, model_cfg.architecture)
        if spec is not None and spec.runs_eagle3:
            raise ValueError(f"speculative_config.method={spec.method!r} is not supported for "
                             f"{model_cfg.architecture} yet: EAGLE-3 heads are not built for linear-attention "
                             "models; method 'mtp' (the checkpoint's own MTP module) or 'ngram' is.")
        ckpts = self.num_state_checkpoints
        if ckpts is None:
            ckpts = self.max_num_seqs // 4
        if isinstance(ckpts, bool) or not isinstance(ckpts, int) or ckpts < 0:
            raise ValueError(f"num_state_checkpoints={ckpts!r} is invalid: must be an integer >= 0 (None: "
                             "max_num_seqs // 4).")
        return self.max_num_seqs, ckpts if self.enable_prefix_caching else 0

    def _num_blocks(self, model_cfg: ModelConfig, device: torch.device, spec) -> int | None:
        slots, ckpts = self._state_slots(model_cfg, spec)
        return driver_num_kv_blocks(model_cfg, self.block_size, self.num_kv_blocks, self.kv_cache_memory_bytes,
                                    device.type, self.max_num_seqs,
                                    spec.draft_kv_bytes_per_token(model_cfg) if spec else 0,
                                    state_pool_bytes(model_cfg, slots, ckpts))
