"""What an architecture is to moelink: `ArchSpec` (the decoder's block kinds and the checkpoint's names) and
`Architecture` (one config.json `architectures` name). The entries themselves are the families' own
(engine/models/<family>/config.py); engine/config/architectures.py gathers them into the registry. No torch: the
families' config modules import this, and config reading imports them.
"""
from __future__ import annotations

from dataclasses import dataclass

# The per-expert checkpoint names most families share: (gate, up, down).
PROJ = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ArchSpec:
    """What an architecture chooses beyond its config.json: the attention kind it runs (its config must say
    the same) and its checkpoint's names (routing and shapes are ModelConfig's business)."""

    attention: str  # the model's attention kind: "gqa", "mla", "compressed" (its layers may add "linear")
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
    # Engine layers per checkpoint layer: 2 where one transformers layer is two attention sublayers, each an engine
    # layer with its own cache (LongCat-Flash: model.layers.{j} holds engine layers 2j and 2j + 1).
    sublayers: int = 1

    @property
    def latent_attention(self) -> bool:
        """Multi-head latent attention: every query head attends to keys and values of its own, decompressed
        from one latent, so there are as many kv heads as query heads whatever num_key_value_heads says."""
        return self.attention == "mla"


# The MTP layouts of the draft heads (engine/spec/heads/); any other is a family's own, registered by its kinds.py
# (engine/models/blocks/mtp.py: DeepSeek-V4's own), and a name nobody registered is refused when the head is built.
MTP_LAYOUTS = ("nextn", "qwen")


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
    # engine/spec/heads/mtp.py), "qwen" (Qwen3-Next / Qwen3.5's top-level `mtp.*`, config.json's mtp_num_hidden_layers;
    # engine/spec/heads/qwen_mtp.py) or a family's own, registered by its kinds.py (DeepSeek-V4's: top-level `mtp.{i}.*`
    # over the hyper-connection streams; engine/models/deepseek_v4/mtp.py).
    mtp_layout: str = "nextn"
    # The MTP modules its checkpoints hold when config.json counts none (LongCat-Flash's and Hy4's configs name no
    # count and their releases ship one, as vLLM reads them): 0 for the others, whose files say.
    mtp_unstated: int = 0
    # Why speculative method "mtp" is refused for it though its release publishes MTP weights (the field or
    # tensors moelink cannot build faithfully from the locked transformers): "" where it is served or absent.
    mtp_refused: str = ""
    # config.json hidden_act values its reader builds (the MLPs' gated activation: MoEConfig.activation /
    # dense_activation); every other value is refused when the config is read. Kimi K3's "situ" besides SiLU.
    hidden_acts: tuple[str, ...] = ("silu",)
    # Why enable_lora is refused for it (its weights or rows are rewritten at load, or named so, that an adapter's
    # delta would miss it, untested against peft: Granite-MoE's folded multipliers, ...): "" where LoRA runs.
    lora_refused: str = ""
    # Another registry name of the same model (vLLM's or SGLang's spelling, a text-only name of a multimodal
    # release, a checkpoint whose tensor names differ): the name whose model this one builds and whose model_type
    # transformers maps (MiMoV2ForCausalLM: MiMoV2FlashForCausalLM's, its q/k/v fused). "" for a model's own name.
    alias_of: str = ""
    # rope_parameters.rope_type values beyond the common ones (rope_config.ROPE_TYPES) its reader builds, from
    # rope_config.FAMILY_ROPE_TYPES: Llama 4's "llama3". Every other family refuses them when its config is read.
    rope_types: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.mtp_unstated, int) or self.mtp_unstated < 0:
            raise ValueError(f"Architecture {self.name}: mtp_unstated={self.mtp_unstated!r} is invalid: an integer >= 0.")
        if self.mtp_refused and self.mtp_layers:
            raise ValueError(f"Architecture {self.name}: mtp_refused is set, so mtp_layers must be False.")
        if not isinstance(self.mtp_layout, str) or not self.mtp_layout.isidentifier():
            raise ValueError(f"Architecture {self.name}: mtp_layout={self.mtp_layout!r} is invalid: choose from "
                             f"{', '.join(map(repr, MTP_LAYOUTS))} or a layout a family registers "
                             f"(engine/models/blocks/mtp.py).")

    @property
    def runnable(self) -> bool:
        return self.spec is not None


__all__ = ["ArchSpec", "Architecture", "MTP_LAYOUTS", "PROJ"]
