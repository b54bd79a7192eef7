"""LoRAConfig: the adapter limits of an engine started with enable_lora (vLLM's --max-loras, --max-lora-rank,
--max-cpu-loras), and the serving modes LoRA does not compose with yet, refused naming the flag (docs/lora.md)."""
from __future__ import annotations

from dataclasses import dataclass

# vLLM's allowed ranks are powers of two up to 512; any rank up to the limit is read here (padded to it).
MAX_LORA_RANK_LIMIT = 512
# The most slots one table may have under DP attention (engine/lora/slot_table.py): a dispatched token's slot + 1 is
# a column of its hidden state, exact in bfloat16 up to 256.
MAX_TABLE_SLOTS = 256


@dataclass(frozen=True)
class LoRAConfig:
    """max_loras: adapters a step may mix (device slots on every rank); max_lora_rank: the largest adapter rank
    (the slots' width: smaller adapters are zero-padded); max_cpu_loras: adapters each rank keeps read in host
    memory (an LRU; None: max_loras)."""

    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    # Data-parallel attention groups (schedulers): above 1, every rank holds the driver's one slot table of
    # max_loras x this slots (engine/lora/slot_table.py), so that a dispatched token's slot means one adapter anywhere.
    data_parallel_size: int = 1
    # vLLM's --lora-target-modules: the model's modules LoRA runs on, by name or name suffix (`o_proj`, vLLM's
    # packed `qkv_proj` / `gate_up_proj` for their pieces, `experts` for the routed experts); an adapter's targets
    # outside them are skipped (engine/lora/adapter.py in_target_modules). None: every target.
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        def positive(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1

        if not positive(self.max_loras):
            raise ValueError(f"max_loras={self.max_loras!r} is invalid: must be an integer >= 1.")
        if not positive(self.max_lora_rank) or self.max_lora_rank > MAX_LORA_RANK_LIMIT:
            raise ValueError(f"max_lora_rank={self.max_lora_rank!r} is invalid: must be an integer in "
                             f"[1, {MAX_LORA_RANK_LIMIT}].")
        if self.max_cpu_loras is not None and (not positive(self.max_cpu_loras)
                                               or self.max_cpu_loras < self.max_loras):
            raise ValueError(f"max_cpu_loras={self.max_cpu_loras!r} is invalid: must be None or an integer >= "
                             f"max_loras={self.max_loras}.")
        tm = self.target_modules
        if tm is not None and (not isinstance(tm, tuple) or not tm
                               or not all(isinstance(t, str) and t and len(t) <= 256 for t in tm)):
            raise ValueError(f"lora_target_modules={tm!r} is invalid: must be a non-empty list of module names "
                             "(e.g. q_proj o_proj, vLLM's qkv_proj, experts) or None.")
        if not positive(self.data_parallel_size):
            raise ValueError(f"LoRAConfig data_parallel_size={self.data_parallel_size!r} is invalid: must be an "
                             "integer >= 1.")
        if self.num_slots > MAX_TABLE_SLOTS:  # a token's slot travels as a float column of its dispatch (moe/layer.py)
            raise ValueError(f"max_loras={self.max_loras} is invalid with {self.data_parallel_size} data-parallel "
                             f"ranks: their slot table (max_loras x ranks) must be at most {MAX_TABLE_SLOTS} slots.")

    @property
    def num_slots(self) -> int:
        """Device slots each rank holds: max_loras, or the driver's table of every data-parallel rank's."""
        return self.max_loras * self.data_parallel_size

    @property
    def cpu_loras(self) -> int:
        return self.max_cpu_loras if self.max_cpu_loras is not None else self.max_loras


def lora_config(enable_lora, max_loras, max_lora_rank, max_cpu_loras, *, parallel, kv_connector=None,
                attention, quantization=None, target_modules=None, architecture: str = "") -> LoRAConfig | None:
    """EngineArgs' LoRA fields as one LoRAConfig, or None without enable_lora; what LoRA does not run with yet is
    refused naming the flag (never silently served without the adapter)."""
    if not isinstance(enable_lora, bool):
        raise ValueError(f"enable_lora={enable_lora!r} is invalid: must be True or False.")
    if not enable_lora:
        return None
    cfg = LoRAConfig(max_loras, max_lora_rank, max_cpu_loras, parallel.data_parallel_size, target_modules)
    # Under EP (DP attention) every rank runs its own requests' adapters on its attention and dense linears, under
    # TP on its shards of them; routed experts' adapters are refused there (routed_lora_refusal).
    # Speculative decoding is served (docs/lora.md#how-it-runs): a verify step's 1 + k rows of a request carry its
    # slot (plan_lora_step repeats it over the query length), the drafter runs with none (the runner clears the
    # step's slots after the main forward).
    if parallel.enable_two_batch_overlap and parallel.world_size > 1:
        raise ValueError("enable_lora is not supported with enable_two_batch_overlap set yet: LoRA runs without "
                         "two-batch overlap for now (docs/lora.md#limits).")
    # A connector serves adapters only where it keys KV by the request's cache salt (the adapter is part of it):
    # the offload tiers by the salted block hashes, PD transfer by the salted key (engine/kv_transfer/auth.py).
    # One keyed by anything else (the in-host reference keys by request id) could hand A's KV to B's request.
    if kv_connector is not None and getattr(kv_connector, "keys_kv_by_cache_salt", False) is not True:
        raise ValueError(f"enable_lora is not supported with kv_connector={type(kv_connector).__name__}: it does not "
                         "key KV by the request's cache salt (its adapter); LoRA runs with RemoteKVConnector, "
                         "OffloadKVConnector and WithOffload (docs/lora.md#limits).")
    if quantization is not None and getattr(quantization, "online", False):
        raise ValueError("enable_lora is not supported with quantization (online FP8) yet: adapters run on float "
                         "weights (docs/lora.md#limits).")
    if attention.kind not in ("gqa", "mla"):
        raise ValueError(f"enable_lora is not supported for {attention.kind} attention yet: LoRA runs on GQA and "
                         "MLA models (Qwen3-MoE, Mixtral, DeepSeek-V3, ...) for now (docs/lora.md#limits).")
    if getattr(attention, "q_scale", 1.0) != 1.0 or getattr(attention, "latent_scale", 1.0) != 1.0:
        # Folded into q_b_proj's weights at load (LongCat-Flash): an adapter's delta would miss the fold.
        raise ValueError("enable_lora is not supported for an MLA model with q_scale / latent_scale yet "
                         "(LongCat-Flash): docs/lora.md#limits.")
    from .architectures import REGISTRY

    arch = REGISTRY.get(architecture)
    if arch is not None and arch.lora_refused:  # the family says why (Architecture.lora_refused)
        raise ValueError(f"enable_lora is not supported for {architecture} yet: {arch.lora_refused} "
                         f"(docs/lora.md#limits).")
    return cfg


def routed_lora_refusal(parallel, architecture: str = "") -> str | None:
    """What adapters on the routed experts are refused under, or None where they are served (one rank, experts
    held as gate / up / down; under EP each rank its local experts' A / B, a token's slot carried with its dispatch;
    under TP every expert's channel slice; gpt-oss's float experts too, gate_up's B rows read in the load's
    de-interleaving order: engine/lora/adapter.py): refused under TP and EP together (the token-sliced block), with
    online EPLB or elastic EP (experts move between ranks, their A / B would have to follow), and for an
    architecture whose experts are laid out otherwise on disk (w1 / w3 / w2 served for Mixtral, whose transformers
    module is Qwen's layout under `mlp.experts`: engine/lora/adapter.py experts_name; not yet for the others of those
    names, MiniMax-M2, ..., untested against peft). Quantized experts (gpt-oss's
    MXFP4) are no targets: the adapter's check refuses them (no float routed experts)."""
    from .architectures import REGISTRY

    arch = REGISTRY.get(architecture)
    spec = arch.spec if arch is not None else None
    names = tuple(spec.expert_names) if spec is not None else ()
    if arch is not None and spec is not None and (
            spec.expert_layout not in ("auto", "gpt_oss")
            or not (names == ("gate_proj", "up_proj", "down_proj")
                    or (names == ("w1", "w3", "w2") and architecture == "MixtralForCausalLM"))):
        return f"{architecture}'s expert layout"
    if parallel.tensor_parallel_size > 1 and not parallel.experts_split_by_tp:  # EP over the world, token-sliced
        return (f"tensor_parallel_size={parallel.tensor_parallel_size} with "
                f"expert_parallel_size={parallel.expert_parallel_size}")
    if parallel.world_size > 1 and not parallel.experts_split_by_tp:
        # Online EPLB and elastic EP move experts between ranks: their A / B would have to move with them.
        if parallel.eplb_interval:
            return f"eplb_interval={parallel.eplb_interval}"
        if parallel.elastic_ep and parallel.world_size >= 3:  # a loss recovers from 3 ranks up (ray_runtime.py)
            return f"elastic_ep=True at expert_parallel_size={parallel.world_size} (pass elastic_ep=False)"
    return None
