"""The one architecture registry: each `architectures` name of config.json moelink knows, and what it is.

Everything that depends on the architecture reads it from here: which names run (engine/config/model.py), the
checkpoint's weight names and the attention kind (engine/models: `ArchSpec`), multi-head latent attention
(engine/config/hf_readers.py), MXFP4 experts as published (engine/config/quantization.py). No torch: config reading imports
it. Routing and shapes are config.json facts, read by engine/config/hf_readers.py, not registry entries.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchSpec:
    """What an architecture chooses beyond its config.json: the attention kind it runs (its config must say
    the same) and its checkpoint's names (routing and shapes are ModelConfig's business)."""

    attention: str  # the model's attention kind: "gqa", "mla", "dsv4" (its layers may add "linear")
    moe_prefix: str  # "mlp" (Qwen3, DeepSeek, GLM) or "block_sparse_moe" (Mixtral) in the per-expert layout
    expert_names: tuple[str, str, str]  # on-disk names of (gate, up, down) per expert
    shared_experts: str = "shared_experts"  # under moe_prefix: mlp.shared_experts.{gate,up,down}_proj
    router: str = "gate"  # the router linear under moe_prefix ("router" for gpt-oss, with a bias)
    # The noaux_tc correction bias under moe_prefix: beside the router's weight (DeepSeek-V3, GLM, MiMo) or beside
    # the router itself (MiniMax-M2: block_sparse_moe.e_score_correction_bias).
    correction_bias: str = "gate.e_score_correction_bias"
    sinks: str = "sinks"  # GQA's per-head attention sinks under self_attn (MiMo-V2-Flash: attention_sink_bias)
    # Checkpoint tensors under these prefixes belong to no layer the engine builds (MiMo-V2-Flash's own MTP
    # layers, `model.mtp.*`): never read, counted in one log line at load.
    unread_prefixes: tuple[str, ...] = ()
    # (published name ending, the ending transformers 5 writes with save_original_format=False): a tensor the
    # checkpoint does not hold under the first is read under the second (MiMo-V2-Flash's sinks).
    weight_aliases: tuple[tuple[str, str], ...] = ()
    # "gpt_oss": the only expert layout is fused, transposed and interleaved (see engine/models/moe_decoder._gpt_oss_plan).
    expert_layout: str = "auto"
    # The decoder's block kinds (engine/models/blocks/, a family's own registered from its package): the layer's
    # residual wiring, the sparse layers' FFN ("": routed experts, with shared ones where n_shared_experts > 0), the
    # ends of the residual stream, and how the checkpoint's names and formats map onto the blocks' plans.
    residual: str = "prenorm"
    ffn: str = ""
    embedding: str = "plain"
    head: str = "plain"
    checkpoint: str = "hf"

    @property
    def latent_attention(self) -> bool:
        """Multi-head latent attention: every query head attends to keys and values of its own, decompressed
        from one latent, so there are as many kv heads as query heads whatever num_key_value_heads says."""
        return self.attention == "mla"


MTP_LAYOUTS = ("nextn", "qwen", "dsv4")


@dataclass(frozen=True)
class Architecture:
    """One config.json `architectures` name moelink knows."""

    name: str
    spec: ArchSpec | None  # None: moelink reads its config but cannot build the model yet
    # transformers' model_type whose config class reads this architecture's config.json when the file's own
    # model_type is not transformers' (Kimi K2's `kimi_k2`): named here, never looked up by inverting
    # transformers' architecture table, where several model_types share one class (transformers 5.24 maps
    # DeepseekV3ForCausalLM to both deepseek_v3 and sarvam_mla, and the last one listed won).
    model_type: str = ""
    # Its experts run in MXFP4 as published (gpt-oss's layout: gate/up interleaved rows, expert biases).
    mxfp4_experts: bool = False
    # Its checkpoints may carry DeepSeek-V3's next-n prediction (MTP) layers (config.json's
    # num_nextn_predict_layers; engine/spec/heads/mtp.py).
    mtp_layers: bool = False
    # Where and how those layers are stored: "nextn" (DeepSeek-V3's `model.layers.{num_hidden_layers + i}.*`,
    # engine/spec/heads/mtp.py), "qwen" (Qwen3-Next / Qwen3.5's top-level `mtp.*`, config.json's
    # mtp_num_hidden_layers; engine/spec/heads/qwen_mtp.py) or "dsv4" (DeepSeek-V4's top-level `mtp.{i}.*` over the
    # hyper-connection streams; engine/models/deepseek_v4/mtp.py).
    mtp_layout: str = "nextn"

    def __post_init__(self) -> None:
        if self.mtp_layout not in MTP_LAYOUTS:
            raise ValueError(f"Architecture {self.name}: mtp_layout={self.mtp_layout!r} is invalid: choose from "
                             f"{', '.join(map(repr, MTP_LAYOUTS))}.")

    @property
    def runnable(self) -> bool:
        return self.spec is not None


_PROJ = ("gate_proj", "up_proj", "down_proj")

REGISTRY: dict[str, Architecture] = {a.name: a for a in (
    Architecture("Qwen3MoeForCausalLM", ArchSpec("gqa", moe_prefix="mlp", expert_names=_PROJ), model_type="qwen3_moe"),
    Architecture("MixtralForCausalLM", ArchSpec("gqa", moe_prefix="block_sparse_moe", expert_names=("w1", "w3", "w2")),
                 model_type="mixtral"),
    # DeepSeek-V3/R1, Kimi K2, Mistral Large 3 (DeepSeek-V3 format); DeepSeek-V2 / V2-Lite.
    Architecture("DeepseekV3ForCausalLM", ArchSpec("mla", moe_prefix="mlp", expert_names=_PROJ), model_type="deepseek_v3",
                 mtp_layers=True),
    Architecture("DeepseekV2ForCausalLM", ArchSpec("mla", moe_prefix="mlp", expert_names=_PROJ), model_type="deepseek_v2"),
    # DeepSeek Sparse Attention (engine/config/sparse_attention.py): DeepSeek-V3.2 and GLM-5 (GLM-MoE-DSA) are MLA with a
    # lightning indexer per layer (GLM-5's "shared" layers reuse the previous one's selection) and DeepSeek-V3's MoE.
    Architecture("DeepseekV32ForCausalLM", ArchSpec("mla", moe_prefix="mlp", expert_names=_PROJ),
                 model_type="deepseek_v32", mtp_layers=True),
    Architecture("GlmMoeDsaForCausalLM", ArchSpec("mla", moe_prefix="mlp", expert_names=_PROJ),
                 model_type="glm_moe_dsa", mtp_layers=True),
    # GLM-4.5 / 4.6: GQA with partial rotary and the DeepSeek-V3 MoE block.
    Architecture("Glm4MoeForCausalLM", ArchSpec("gqa", moe_prefix="mlp", expert_names=_PROJ), model_type="glm4_moe",
                 mtp_layers=True),
    # Qwen3-Next-80B-A3B: gated DeltaNet on three layers of four, gated full attention on the fourth, a shared expert
    # with a sigmoid gate beside the routed ones.
    Architecture("Qwen3NextForCausalLM", ArchSpec("gqa", moe_prefix="mlp", expert_names=_PROJ,
                                                  shared_experts="shared_expert"), model_type="qwen3_next",
                 mtp_layers=True, mtp_layout="qwen"),
    # Qwen3.5-MoE's text model (Qwen3.5-397B-A17B, -122B-A10B, -35B-A3B): Qwen3-Next's layers with split linear-attention
    # projections; published inside Qwen3_5MoeForConditionalGeneration checkpoints (TEXT_MODEL_OF).
    Architecture("Qwen3_5MoeForCausalLM", ArchSpec("gqa", moe_prefix="mlp", expert_names=_PROJ,
                                                   shared_experts="shared_expert"), model_type="qwen3_5_moe_text",
                 mtp_layers=True, mtp_layout="qwen"),
    # gpt-oss-20b / 120b: GQA with sinks and sliding windows, fused experts with biases, MXFP4 as published.
    Architecture("GptOssForCausalLM", ArchSpec("gqa", moe_prefix="mlp", expert_names=_PROJ, router="router",
                                               expert_layout="gpt_oss"), model_type="gpt_oss", mxfp4_experts=True),
    # MiniMax-M2 / M2.1: GQA with q/k RMSNorm over all heads and partial rotary; sigmoid routing with a correction
    # bias beside the router, experts named as Mixtral's.
    Architecture("MiniMaxM2ForCausalLM", ArchSpec("gqa", moe_prefix="block_sparse_moe", expert_names=("w1", "w3", "w2"),
                                                  correction_bias="e_score_correction_bias"), model_type="minimax_m2"),
    # DeepSeek-V4 (Flash, Pro; engine/config/dsv4.py): MQA with sinks over a sliding window and compressed entries
    # (CSA / HCA), hyper-connections, hash-routed first MoE layers, sqrtsoftplus routing; its checkpoint names are
    # the published ones (attn.wq_a, ffn.experts.{e}.w1, hc_attn_fn, ...), which save_pretrained writes back.
    Architecture("DeepseekV4ForCausalLM", ArchSpec("dsv4", moe_prefix="ffn", expert_names=("w1", "w3", "w2"),
                                                   correction_bias="gate.bias", residual="hyper", ffn="token_routed",
                                                   embedding="hc_streams", head="hc_head", checkpoint="published"),
                 model_type="deepseek_v4",
                 mtp_layers=True, mtp_layout="dsv4"),
    # MiMo-V2-Flash: full and sliding-window GQA layers with kv heads, sinks and rope of their own (per-layer
    # attention configs), values narrower than q/k; DeepSeek-V3 routing without shared experts; its MTP layers
    # (model.mtp.*, a layout of their own) are not read.
    Architecture("MiMoV2FlashForCausalLM", ArchSpec("gqa", moe_prefix="mlp", expert_names=_PROJ,
                                                    sinks="attention_sink_bias", unread_prefixes=("model.mtp.",),
                                                    weight_aliases=(("self_attn.attention_sink_bias",
                                                                     "self_attn.sinks"),)),
                 model_type="mimo_v2_flash"),
)}

# model_types that published checkpoints carry for an architecture above, and the transformers model_type that
# reads them. Applied whatever the installed transformers registers under the alias (the checkpoint's own
# code, which such files name in auto_map, is never run): Kimi K2 / K2 Thinking, and the text model of
# Kimi K2.5 (`kimi_k25`'s text_config), are DeepSeek-V3.
MODEL_TYPE_ALIASES: dict[str, str] = {"kimi_k2": "deepseek_v3"}

# Multimodal checkpoints whose text model is an architecture above: config.json's `text_config` is that model's
# config (Kimi K2.5: DeepSeek-V3 with `model_type: kimi_k2`). Read by ModelConfig.text_model_config.
TEXT_MODEL_OF: dict[str, str] = {"KimiK25ForConditionalGeneration": "DeepseekV3ForCausalLM",
                                 "Qwen3_5MoeForConditionalGeneration": "Qwen3_5MoeForCausalLM"}
# Where the text model's "model." tensors live in such a checkpoint, for the wrappers moelink serves as their text
# model (the vision tower's tensors are not read; a request with an image is refused where requests are checked).
# Kimi K2.5 (transformers' kimi_k25 conversion mapping: `language_model.model` -> `model.language_model`,
# `language_model.lm_head` -> `lm_head`): the text model is `language_model.model.*`, its head
# `language_model.lm_head.weight` (checkpoint_headers.text_model_name maps both), beside `vision_tower.*` and
# `mm_projector.*`.
TEXT_WEIGHTS_PREFIX: dict[str, str] = {"Qwen3_5MoeForConditionalGeneration": "model.language_model.",
                                       "KimiK25ForConditionalGeneration": "language_model.model."}

# Views of the registry, by what callers ask.
SUPPORTED_ARCHITECTURES = tuple(n for n, a in REGISTRY.items() if a.runnable)
CONFIG_ONLY_ARCHITECTURES = tuple(n for n, a in REGISTRY.items() if not a.runnable)
MLA_ARCHITECTURES = tuple(n for n, a in REGISTRY.items() if a.runnable and a.spec.latent_attention)
MXFP4_ARCHITECTURES = tuple(n for n, a in REGISTRY.items() if a.mxfp4_experts)
MTP_ARCHITECTURES = tuple(n for n, a in REGISTRY.items() if a.mtp_layers)
# Sparse attention (a lightning indexer beside MLA): the architectures whose readers build MLAConfig.indexer.
DSA_ARCHITECTURES = ("DeepseekV32ForCausalLM", "GlmMoeDsaForCausalLM")

__all__ = ["ArchSpec", "Architecture", "CONFIG_ONLY_ARCHITECTURES", "DSA_ARCHITECTURES", "MLA_ARCHITECTURES", "MODEL_TYPE_ALIASES",
           "MTP_ARCHITECTURES", "MXFP4_ARCHITECTURES", "REGISTRY", "SUPPORTED_ARCHITECTURES", "TEXT_MODEL_OF",
           "TEXT_WEIGHTS_PREFIX"]
